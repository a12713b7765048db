"""Quantised stand-ins for the model's weight boundaries: ``nn.Linear``, ``Experts.mm`` / ``grouped_mm`` and the
tied embedding's readers. The model, the sampler and training call the same methods and never see codes.

Storage (buffers, so ``state_dict`` and ``.to(device)`` carry them; a later ``.to(dtype)`` would cast the bf16
scales, so do not call one on a quantised model): int8 or packed int4 codes plus bf16 scales,
:mod:`dgemma.quant.formats`. ``STORED`` maps each buffer to the checkpoint tensor it replaces (byte counts).

Compute, per call, in the activation's dtype; ``QuantizedWeight.fast`` (``None``: the choice below, ``False``:
the reference path, ``True``: int8's torch kernel for any dtype, the workspace path for int4) picks:

* the reference path (always available, always right; the only one under autograd and off the CPU):
  dequantise the weight (for the experts one expert's rows; for the embedding the rows read, or blocks of
  ``EMBED_BLOCK`` vocabulary rows) into a fresh tensor and matmul;
* int8 with ``fast=True`` only: ``torch.ops.aten._weight_int8pack_mm`` (int8 codes ``[N, K]`` contiguous, one
  scale per output row in the activation's dtype), which never materialises the float weight (3-8x faster
  than dequantising to bf16 and matmul on an AVX2 CPU, ``[M, 512] x [2048, 512]``, M = 1..1024, one thread),
  but crashes the process on an AVX-512/AMX Xeon (see ``_KERNEL_K_MULTIPLE``), so it is not the default;
* every other float product on the CPU, int8 and int4, fp32 or bf16: :mod:`dgemma.quant.kernels`, the same
  dequantised weight bit for bit but built in a reused per-thread workspace (int4 unpacked with int16 ops,
  no scale expansion), then one ``F.linear``; its products equal the reference path's. On an AVX2 CPU
  torch 2.13's kernels for these cases (``_weight_int8pack_mm`` with fp32, ``_weight_int4pack_mm_for_cpu``,
  ``_int_mm``) ran 16-70x slower than the fp32 matmul, so none is used (docs/BENCHMARKS.md,
  ``benchmarks/quant_step.py --kernels``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dgemma.model.moe import _GROUPED_MM, Experts
from dgemma.quant import formats, kernels

EMBED_BLOCK = 4096  # vocabulary rows dequantised at a time by the embedding's logits / soft embedding
_INT8_MM = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
# torch 2.13's kernel crashes the process (segmentation fault) on an AVX-512/AMX Xeon with bf16 activations:
# for K not a multiple of 16 (K = 8, 24, 40, 72, 100 crashed; 16 ... 192 in steps of 16 did not) and also in
# a whole model at other widths. So it is taken only when asked for (``fast=True``), and never for such K.
_KERNEL_K_MULTIPLE = 16


def uses_int8_kernel(x: torch.Tensor, fast: bool | None) -> bool:
    """Whether an int8 product with activations ``x`` takes ``_weight_int8pack_mm`` (module docstring).
    Never under autograd (the kernel has no derivative), nor for a width it crashes on."""
    if _INT8_MM is None or (torch.is_grad_enabled() and x.requires_grad) or x.shape[-1] % _KERNEL_K_MULTIPLE:
        return False
    return bool(fast)  # default (None): off, see _KERNEL_K_MULTIPLE


def int8_mm(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [..., K] @ (codes [N, K] * scale [N]).T -> [..., N]`` with the int8 kernel."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()  # [M, K]
    out = _INT8_MM(flat, codes, scale.to(x.dtype))  # [M, N]
    return out.view(*x.shape[:-1], codes.shape[0])


class QuantizedWeight(nn.Module):
    """One ``[..., out, in]`` weight in ``scheme`` (``int8`` or ``int4``); ``product`` is ``x @ W[index].T``."""

    def __init__(self, w: torch.Tensor, scheme: str, group_size: int | None = None):
        super().__init__()
        self.scheme, self.group_size = scheme, group_size or formats.GROUP_SIZE
        self.shape, self.width = tuple(w.shape), w.shape[-1]
        codes, scale = formats.quantize(w, scheme, self.group_size)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.fast: bool | None = None  # int8: None = the kernel where it pays (module docstring)

    def dequantize(self, dtype: torch.dtype, index=()) -> torch.Tensor:
        """``W[index]`` in ``dtype`` (``index``: leading indices, e.g. an expert, or ``()`` for all)."""
        codes, scale = self.codes[index], self.scale[index]
        if self.scheme == "int8":
            return formats.dequantize_int8(codes, scale, dtype)
        return formats.dequantize_int4(codes, scale, self.width, self.group_size, dtype)

    def product(self, x: torch.Tensor, index=()) -> torch.Tensor:
        """``x [..., in] @ W[index].T -> [..., out]`` (``W[index]`` two-dimensional)."""
        fast = self.fast is not False and kernels.supported(x, self.scheme)
        kernel = self.scheme == "int8" and uses_int8_kernel(x, self.fast)
        if not (fast or kernel):
            return F.linear(x, self.dequantize(x.dtype, index))
        # no indexing for a whole weight: a tensor index costs a few µs, a tenth of a small product
        codes, scale = (self.codes, self.scale) if index == () else (self.codes[index], self.scale[index])
        if kernel:
            return int8_mm(x, codes, scale)
        if self.scheme == "int8":
            return kernels.int8_linear(x, codes, scale)
        return kernels.int4_linear(x, codes, scale, self.width, self.group_size)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.scheme == "int4" else ""
        return f"shape={self.shape}, scheme={self.scheme}{group}"


class QuantizedLinear(nn.Module):
    """A bias-free ``nn.Linear`` stored quantised: ``forward(x [..., in]) -> [..., out]``."""

    STORED = {"q.codes": "weight", "q.scale": "weight"}

    def __init__(self, linear: nn.Linear, scheme: str, group_size: int):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("only bias-free linears are quantised (the model has no biases)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.q = QuantizedWeight(linear.weight, scheme, group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q.product(x)


class QuantizedExperts(Experts):
    """:class:`~dgemma.model.moe.Experts` with both expert tensors quantised expert by expert (each expert's
    rows with their own scales); only the weight boundary (``mm`` / ``grouped_mm``) differs, so the routing
    dispatch, the grouped / looped choice and the combine are the float module's."""

    STORED = {"gate_up.codes": "gate_up_proj", "gate_up.scale": "gate_up_proj",
              "down.codes": "down_proj", "down.scale": "down_proj"}

    def __init__(self, experts: Experts, scheme: str, group_size: int):
        nn.Module.__init__(self)  # not Experts.__init__: no float parameters
        self.num_experts, self.grouped = experts.num_experts, experts.grouped
        self.gate_up = QuantizedWeight(experts.gate_up_proj, scheme, group_size)  # [E, 2I, d]
        self.down = QuantizedWeight(experts.down_proj, scheme, group_size)  # [E, d, I]

    def weight(self, name: str) -> QuantizedWeight:
        return {"gate_up_proj": self.gate_up, "down_proj": self.down}[name]

    def mm(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        """``x [M, in] @ W[e].T -> [M, out]``: only expert ``e``'s rows are read (and dequantised)."""
        return self.weight(name).product(x, e)

    def grouped_mm(self, name: str, xs: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """``xs [M, in]`` sorted by expert, ``offs [E]`` int32 ends -> ``[M, out]``. On CUDA with a grouped GEMM:
        the whole tensor dequantised (one layer's experts in the activation dtype, transiently) and one
        grouped GEMM; elsewhere expert by expert through :meth:`mm` (a host read of ``offs``)."""
        w = self.weight(name)
        if xs.is_cuda and _GROUPED_MM is not None:
            return _GROUPED_MM(xs, w.dequantize(xs.dtype).transpose(-2, -1), offs=offs)
        parts, start = [], 0
        for e, end in enumerate(offs.tolist()):
            parts.append(self.mm(name, e, xs[start:end]))
            start = end
        return torch.cat(parts)


class Int8Embedding(nn.Module):
    """The tied ``[V, d]`` matrix in int8, one bf16 scale per vocabulary row; the readers of
    :class:`~dgemma.model.layers.TiedEmbedding` with the same signatures. Products come back in the compute
    dtype (``dtype``, the float model's)."""

    STORED = {"q.codes": "weight", "q.scale": "weight"}

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.compute_dtype = embedding.weight.dtype
        self.q = QuantizedWeight(embedding.weight, "int8")

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    @property
    def device(self) -> torch.device:
        return self.q.codes.device

    @property
    def row_bytes(self) -> int:
        """Bytes of one row as a product reads it: dequantised to ``dtype`` (the LM head's block size)."""
        return self.embedding_dim * torch.empty((), dtype=self.dtype).element_size()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lookup(ids)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids [...]`` -> ``[..., d]``: only those rows are dequantised."""
        return formats.dequantize_int8(self.q.codes[ids], self.q.scale[ids], self.dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """``h [..., d] @ E.T -> [..., V]`` in ``h``'s dtype."""
        if uses_int8_kernel(h, self.q.fast):
            return int8_mm(h, self.q.codes, self.q.scale)
        out = h.new_empty(*h.shape[:-1], self.num_embeddings)  # [..., V]
        for lo, hi, rows in self.blocks(h):
            out[..., lo:hi] = F.linear(h, rows)
        return out

    def logits_block(self, x: torch.Tensor, lo: int, hi: int, out: torch.Tensor) -> None:
        """Vocabulary columns ``lo:hi``: ``x [m, d] @ E[lo:hi].T`` written into ``out [m, hi - lo]`` (fp32)."""
        codes, scale = self.q.codes[lo:hi], self.q.scale[lo:hi]
        fast = self.fast_path(x)
        if uses_int8_kernel(x, self.q.fast):
            out.copy_(int8_mm(x, codes, scale))
        elif fast and (hi - lo) * self.embedding_dim > kernels.BLOCK_ELEMENTS:  # several workspace blocks
            out.copy_(kernels.int8_linear(x, codes, scale))
        else:
            rows = kernels.int8_weight(codes, scale, x.dtype) if fast else self.rows(lo, hi, x.dtype)  # [hi-lo, d]
            if x.dtype == torch.float32:
                torch.mm(x, rows.t(), out=out)
            else:
                out.copy_(F.linear(x, rows))

    def soft_embed(self, probs: torch.Tensor) -> torch.Tensor:
        """``probs [..., V] @ E -> [..., d]``, block by block of vocabulary rows, summed in fp32."""
        acc = torch.zeros(*probs.shape[:-1], self.embedding_dim, dtype=torch.float32, device=probs.device)
        for lo, hi, rows in self.blocks(probs):
            acc += (probs[..., lo:hi] @ rows).float()  # [..., hi - lo] @ [hi - lo, d]
        return acc.to(probs.dtype)

    def fast_path(self, x: torch.Tensor) -> bool:
        """Whether products with ``x`` dequantise into the per-thread workspace (:mod:`dgemma.quant.kernels`)."""
        return self.q.fast is not False and kernels.supported(x)

    def blocks(self, x: torch.Tensor):
        """``(lo, hi, rows [hi - lo, d])`` over the vocabulary in ``x``'s dtype: blocks of ``EMBED_BLOCK`` rows, or
        on the workspace path of at most ``kernels.BLOCK_ELEMENTS`` elements, each valid until the next one."""
        fast = self.fast_path(x)
        step = max(1, min(EMBED_BLOCK, kernels.BLOCK_ELEMENTS // self.embedding_dim)) if fast else EMBED_BLOCK
        for lo in range(0, self.num_embeddings, step):
            hi = min(lo + step, self.num_embeddings)
            if fast:
                yield lo, hi, kernels.int8_weight(self.q.codes[lo:hi], self.q.scale[lo:hi], x.dtype)
            else:
                yield lo, hi, self.rows(lo, hi, x.dtype)

    def rows(self, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
        """Vocabulary rows ``lo:hi`` dequantised: ``[hi - lo, d]``."""
        return formats.dequantize_int8(self.q.codes[lo:hi], self.q.scale[lo:hi], dtype)
