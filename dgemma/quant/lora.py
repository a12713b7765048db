"""LoRA on a quantised base (QLoRA): the int8 / int4 codes stay frozen buffers, only float adapters train.

What this file is responsible for: turning a model quantised by :func:`dgemma.quant.apply.quantize_model`
into a trainable base for adapters whose saved form is an ordinary peft adapter of the *float* model, so that
``dgemma merge`` folds it into the float checkpoint unchanged.

* :class:`FrozenQuantizedLinear` / :class:`FrozenQuantizedExperts` (:func:`freeze` swaps them in, sharing the
  codes): the quantised modules as the frozen base of a trained model. Their products go through
  :class:`QuantizedProduct`: the forward pass is the inference product (CPU workspace kernels included, since
  it runs without autograd), the backward pass returns ``grad_x = grad_y @ W`` with ``W`` dequantised again.
  Nothing is saved for the backward pass but a reference to the codes (no dequantised weight is kept alive
  between forward and backward), and there is no weight gradient: the codes are integer buffers.
* :class:`LoraQuantizedLinear`: peft's ``lora.Linear`` over a :class:`FrozenQuantizedLinear`, registered with
  ``LoraConfig._register_custom_module``, so the linears' adapters are peft's own (names, init, forward).
* :class:`ExpertLora`: the experts' adapter. peft adapts the float ``Experts`` through ``target_parameters``
  (``ParamWrapper``, which needs a real ``nn.Parameter`` and merges a full ``[E, out, in]`` delta into it);
  here the same tensors are added as low-rank products in ``mm`` / ``grouped_mm``. Layout, as peft 0.21's
  ``ParamWrapper`` for a 3-D parameter ``W [E, out, in]`` (``Experts`` has no ``is_transposed``, so peft swaps
  the shape's last two sizes into in / out features):

  - ``lora_A.<adapter>``: ``nn.Linear(in, r * E)``, weight ``[r * E, in]``; rows ``e * r .. e * r + r`` are
    expert ``e``'s ``A_e [r, in]`` (``weight.view(E, r, in)[e]``);
  - ``lora_B.<adapter>``: ``nn.Linear(r * E, out)``, weight ``[out, r * E]``; column ``j * E + e`` is column
    ``j`` of expert ``e``'s ``B_e [out, r]`` (``weight.view(out, r, E)[:, :, e]``);
  - ``W_e + scaling * B_e @ A_e`` with ``scaling = alpha / r`` is the adapted weight (peft's ``get_delta_weight``:
    ``einsum("o r e, e r i -> e o i")``), so ``x @ W_e.T + scaling * (x @ A_e.T) @ B_e.T`` is the product.

  peft wraps the parameters of one module in the order ``Experts`` declares them, each wrapper around the
  previous one: ``experts.base_layer.lora_A`` is ``gate_up_proj``'s, ``experts.lora_A`` is ``down_proj``'s.
  :data:`NESTING` rebuilds that nesting, so the state-dict names are peft's (``tests/test_qlora.py`` compares
  them with a float model's peft adapter).

Needs peft (imported here at the top; :mod:`dgemma.train.lora` imports this file only for a quantised base).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from dgemma.model.moe import _GROUPED_MM, Experts
from dgemma.quant.modules import QuantizedExperts, QuantizedLinear, QuantizedWeight

DEQUANT_BYTES = 1 << 28  # the grouped path dequantises at most 256 MiB of an expert tensor at a time
NESTING = ("gate_up_proj", "down_proj")  # innermost first: Experts' declaration order, as peft nests them
ADAPTER = "default"


class QuantizedProduct(torch.autograd.Function):
    """``x [..., in] @ W[index].T`` for a frozen :class:`QuantizedWeight`; gradient for ``x`` only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: QuantizedWeight, index):
        ctx.weight, ctx.index, ctx.dtype = weight, index, x.dtype
        return weight.product(x, index)  # autograd is off in here: the inference path, kernels included

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w = ctx.weight.dequantize(grad.dtype, ctx.index)  # [out, in], transient
        return (grad @ w).to(ctx.dtype), None, None


def grouped_gemm(xs: torch.Tensor) -> bool:
    """Whether ``grouped_mm`` takes grouped GEMMs for ``xs`` (CUDA; elsewhere expert by expert)."""
    return xs.is_cuda and _GROUPED_MM is not None


def grouped_product(xs: torch.Tensor, weight: QuantizedWeight, offs: torch.Tensor, transpose: bool) -> torch.Tensor:
    """Rows of ``xs [M, K]`` sorted by expert (``offs [E]`` int32 ends) times their expert's ``W_e.T``
    (``transpose``) or ``W_e``, ``W [E, out, in]`` frozen: grouped GEMMs over runs of experts, each run
    dequantised on its own (at most ``DEQUANT_BYTES``, not the whole ``[E, out, in]`` tensor). One host read
    of ``offs``."""
    e, out_f, in_f = weight.shape
    step = max(1, DEQUANT_BYTES // (out_f * in_f * xs.element_size()))
    ends, parts = offs.tolist(), []
    for e0 in range(0, e, step):
        e1 = min(e, e0 + step)
        lo, hi = (ends[e0 - 1] if e0 else 0), ends[e1 - 1]
        if hi > lo:
            w = weight.dequantize(xs.dtype, slice(e0, e1))  # [e1 - e0, out, in]
            parts.append(_GROUPED_MM(xs[lo:hi], w.transpose(-2, -1) if transpose else w, offs=offs[e0:e1] - lo))
    width = out_f if transpose else in_f
    return torch.cat(parts) if parts else xs.new_zeros(0, width)


class GroupedQuantizedProduct(torch.autograd.Function):
    """The grouped GEMM (CUDA's path) over every expert of a frozen ``[E, out, in]`` weight; gradient for
    ``xs`` only (:func:`grouped_product` both ways)."""

    @staticmethod
    def forward(ctx, xs: torch.Tensor, weight: QuantizedWeight, offs: torch.Tensor):
        ctx.weight, ctx.dtype = weight, xs.dtype
        ctx.save_for_backward(offs)
        return grouped_product(xs, weight, offs, transpose=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (offs,) = ctx.saved_tensors  # grad [M, out] @ W_e [out, in]
        return grouped_product(grad.contiguous(), ctx.weight, offs, transpose=False).to(ctx.dtype), None, None


class FrozenQuantizedLinear(QuantizedLinear):
    """A :class:`QuantizedLinear` as a trained model's frozen base (same codes, same state-dict names)."""

    @classmethod
    def of(cls, linear: QuantizedLinear) -> "FrozenQuantizedLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features, new.q = linear.in_features, linear.out_features, linear.q
        return new

    @property
    def qweight(self) -> torch.Tensor:
        """The codes: where peft looks for a quantised layer's device (its adapters are put there)."""
        return self.q.codes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return QuantizedProduct.apply(x, self.q, ())


class FrozenQuantizedExperts(QuantizedExperts):
    """A :class:`QuantizedExperts` as a trained model's frozen base (same codes, same state-dict names)."""

    @classmethod
    def of(cls, experts: QuantizedExperts) -> "FrozenQuantizedExperts":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_experts, new.grouped = experts.num_experts, experts.grouped
        new.gate_up, new.down = experts.gate_up, experts.down
        return new

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self.weight(name).shape

    def mm(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        return QuantizedProduct.apply(x, self.weight(name), e)

    def grouped_mm(self, name: str, xs: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        if grouped_gemm(xs):
            return GroupedQuantizedProduct.apply(xs, self.weight(name), offs)
        return super().grouped_mm(name, xs, offs)  # expert by expert through self.mm


def freeze(model: nn.Module) -> nn.Module:
    """Swap (in place) every quantised linear and expert store of ``model`` for its frozen-base form."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is QuantizedLinear:
                setattr(module, name, FrozenQuantizedLinear.of(child))
            elif type(child) is QuantizedExperts:
                setattr(module, name, FrozenQuantizedExperts.of(child))
    return model


class LoraQuantizedLinear(PeftLoraLinear):
    """peft's LoRA ``Linear`` over a :class:`FrozenQuantizedLinear`: ``base(x) + scaling * B(A(dropout(x)))``.
    Merging needs float weights: merge the saved adapter into the float checkpoint (``dgemma merge``)."""

    def merge(self, *args, **kwargs) -> None:
        raise ValueError("a LoRA layer over quantised weights cannot be merged in place; merge the saved adapter "
                         "into the float checkpoint (dgemma merge)")

    def unmerge(self) -> None:  # nothing is ever merged
        return None


class ExpertLora(Experts, BaseTunerLayer):
    """One expert tensor's adapter around ``base_layer`` (a :class:`FrozenQuantizedExperts` or another
    :class:`ExpertLora`): ``mm`` / ``grouped_mm`` of ``parameter_name`` add ``scaling * (x @ A_e.T) @ B_e.T``
    (module docstring for the layout); the other tensor passes through. The routing dispatch is ``Experts``'.
    A peft tuner layer (``BaseTunerLayer``), so that peft saves its ``lora_A`` / ``lora_B`` with the adapter
    and its adapter switches (``disable_adapter``, ``set_adapter``) reach it."""

    adapter_layer_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: Experts, parameter_name: str, rank: int, alpha: float):
        nn.Module.__init__(self)  # not Experts.__init__: no float expert tensors
        self.base_layer, self.parameter_name = base_layer, parameter_name
        self.num_experts = base_layer.num_experts
        e, out_f, in_f = base_layer.shape_of(parameter_name)
        self.rank, self.in_features, self.out_features = rank, in_f, out_f
        self.scaling = {ADAPTER: alpha / rank}
        device = next(base_layer.buffers()).device
        self.lora_A = nn.ModuleDict({ADAPTER: nn.Linear(in_f, rank * e, bias=False, device=device)})
        self.lora_B = nn.ModuleDict({ADAPTER: nn.Linear(rank * e, out_f, bias=False, device=device)})
        nn.init.kaiming_uniform_(self.lora_A[ADAPTER].weight, a=math.sqrt(5))  # peft's default init
        nn.init.zeros_(self.lora_B[ADAPTER].weight)

    @property
    def grouped(self) -> bool | None:
        return self.base_layer.grouped

    @grouped.setter
    def grouped(self, value: bool | None) -> None:
        self.base_layer.grouped = value

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self.base_layer.shape_of(name)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A [E, r, in]`` and ``B [E, out, r]`` (views of the two weights)."""
        e, r = self.num_experts, self.rank
        a = self.lora_A[ADAPTER].weight.view(e, r, self.in_features)
        b = self.lora_B[ADAPTER].weight.view(self.out_features, r, e).permute(2, 0, 1)
        return a, b

    def delta(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """``scaling * (x [M, in] @ A_e.T) @ B_e.T -> [M, out]``."""
        a, b = self.factors()
        if not torch.is_autocast_enabled(x.device.type):  # under autocast F.linear casts (no fp32 copy of x)
            x = x.to(a.dtype)
        return F.linear(F.linear(x, a[e]), b[e]) * self.scaling[ADAPTER]

    def grouped_delta(self, xs: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """:meth:`delta` of every expert's rows of ``xs [M, in]`` (sorted by expert, ``offs [E]`` their ends):
        two grouped GEMMs on CUDA (when the rank's rows are 16-byte aligned), else expert by expert."""
        if grouped_gemm(xs) and (self.rank * xs.element_size()) % 16 == 0:
            a, b = self.factors()
            h = _GROUPED_MM(xs, a.to(xs.dtype).transpose(-2, -1), offs=offs)  # [M, r]
            out = _GROUPED_MM(h, b.to(xs.dtype).contiguous().transpose(-2, -1), offs=offs)  # [M, out]
            return out * self.scaling[ADAPTER]
        parts, start = [], 0
        for e, end in enumerate(offs.tolist()):
            parts.append(self.delta(e, xs[start:end]))
            start = end
        return torch.cat(parts)

    def adapts(self, name: str) -> bool:
        return name == self.parameter_name and not self.disable_adapters and ADAPTER in self.active_adapters

    def mm(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer.mm(name, e, x)
        return out + self.delta(e, x).to(out.dtype) if self.adapts(name) else out

    def grouped_mm(self, name: str, xs: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        out = self.base_layer.grouped_mm(name, xs, offs)
        return out + self.grouped_delta(xs, offs).to(out.dtype) if self.adapts(name) else out

    def merge(self, *args, **kwargs) -> None:
        LoraQuantizedLinear.merge(self)


def add_expert_lora(model: nn.Module, rank: int, alpha: float) -> int:
    """Wrap every :class:`FrozenQuantizedExperts` of ``model`` in one :class:`ExpertLora` per tensor of
    :data:`NESTING` (in place); returns how many expert stores were adapted."""
    n = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, FrozenQuantizedExperts):
                wrapped = child
                for parameter in NESTING:
                    wrapped = ExpertLora(wrapped, parameter, rank, alpha)
                setattr(module, name, wrapped)
                n += 1
    return n
