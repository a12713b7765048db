"""Mixture-of-experts block: router (softmax -> top-k -> renormalise -> per-expert gain) and experts.

Expert weights keep the checkpoint layout: ``gate_up_proj [E, 2I, d]`` (gate rows first, then up) and
``down_proj [E, d, I]``. Two expert paths compute the same thing:
``experts_reference`` (a loop over every (token, slot) pair, slow, obviously right) and
``Experts.forward`` (tokens grouped by expert). ``forward`` runs the grouped tokens either through one matmul
pair per expert hit (the loop: fast on CPU) or through two grouped GEMMs over all experts at once
(``torch.nn.functional.grouped_mm``: one kernel each and no host sync, the path for CUDA, where a loop over
128 experts would be thousands of small launches per step). ``Experts.grouped`` picks: ``None`` (default)
chooses the grouped GEMM for bf16 on CUDA, ``True``/``False`` force it (tests compare both with the
reference).

The weight boundary: :meth:`Experts.mm` and :meth:`Experts.grouped_mm` are the only readers of the two
expert tensors (``x @ W[e].T`` for one expert's rows, and the same for every expert's slice at once); the
routing dispatch, the activation and the combine around them read no weights. A quantised store replaces
those two methods and nothing else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dgemma.config import ModelConfig
from dgemma.model.layers import rms_norm

# The grouped GEMM: public in recent torch, private (same signature) since 2.8.
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.top_k_experts
        self.eps = cfg.rms_norm_eps
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))
        self.root_size = cfg.hidden_size**-0.5

    def forward(self, x: torch.Tensor):
        """``x [N, d]`` (the un-normalised residual) -> weights ``[N, k]`` and expert ids ``[N, k]``."""
        z = rms_norm(x, None, self.eps) * self.scale * self.root_size
        probs = F.softmax(self.proj(z), dim=-1, dtype=torch.float32)  # [N, E]
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        return w * self.per_expert_scale[idx], idx


class Experts(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, d, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts = e
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, i))
        self.grouped: bool | None = None  # None: grouped GEMM for bf16 on CUDA, the per-expert loop elsewhere

    # ---------------------------------------------------------------- the weight boundary
    def mm(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        """``x [M, in] @ W[e].T -> [M, out]`` for ``name`` ``"gate_up_proj"`` or ``"down_proj"``: the rows routed
        to expert ``e``."""
        return F.linear(x, getattr(self, name)[e])

    def grouped_mm(self, name: str, xs: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """``xs [M, in]`` sorted by expert, ``offs [E]`` int32 end of each expert's rows -> ``[M, out]``: each
        expert's rows times its ``W[e].T``, one grouped GEMM over all experts."""
        if _GROUPED_MM is None:
            raise RuntimeError("this torch has no grouped_mm; set Experts.grouped = False")
        return _GROUPED_MM(xs, getattr(self, name).transpose(-2, -1), offs=offs)

    # ---------------------------------------------------------------- routing dispatch (reads no weights)
    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e``'s gated MLP on its rows ``x [M, d]`` -> ``[M, d]``."""
        gate, up = self.mm("gate_up_proj", e, x).chunk(2, dim=-1)
        return self.mm("down_proj", e, F.gelu(gate, approximate="tanh") * up)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``x [N, d]``, ``weights/idx [N, k]`` -> ``[N, d]``: tokens grouped by expert.

        One gather puts the (token, slot) pairs in expert order, each expert runs on its contiguous slice,
        and :func:`combine` adds each token's k weighted results.
        """
        n, k = idx.shape
        flat = idx.reshape(-1)  # [N*k]
        order = torch.argsort(flat, stable=True)
        token_of = order // k  # token index of each sorted (token, slot) pair
        xs = x.index_select(0, token_of)  # [N*k, d], grouped by expert
        if self.uses_grouped(x.device, x.dtype):
            # [E] counts without bincount, which reads max(flat) back to the host on CUDA (a sync per layer)
            counts = torch.zeros(self.num_experts, dtype=torch.int32, device=x.device)
            counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
            ys = self._grouped(xs, torch.cumsum(counts, 0, dtype=torch.int32))
        else:
            ys = self._looped(xs, torch.bincount(flat, minlength=self.num_experts).tolist())
        ys = (ys * weights.reshape(-1)[order, None]).to(x.dtype)  # [N*k, d]; routing weights are fp32
        return combine(ys, order, k, gather=x.is_cuda)

    def uses_grouped(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether ``forward`` takes the grouped GEMM for inputs on ``device`` in ``dtype``."""
        if self.grouped is not None:
            return self.grouped
        return device.type == "cuda" and dtype == torch.bfloat16 and _GROUPED_MM is not None  # bf16 kernels

    def _looped(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        # torch.cat, not slice assignment: under autograd each assigned slice would copy the whole gradient
        parts, start = [], 0
        for e, c in enumerate(counts):
            if c:
                parts.append(self.expert(e, xs[start : start + c]))
                start += c
        return parts[0] if len(parts) == 1 else torch.cat(parts) if parts else torch.empty_like(xs)

    def _grouped(self, xs: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """``xs [M, d]`` sorted by expert, ``offs [E]`` int32 end of each expert's rows -> ``[M, d]``."""
        gate, up = self.grouped_mm("gate_up_proj", xs, offs).chunk(2, dim=-1)  # [M, I] each
        return self.grouped_mm("down_proj", F.gelu(gate, approximate="tanh") * up, offs)


def combine(ys: torch.Tensor, order: torch.Tensor, k: int, gather: bool) -> torch.Tensor:
    """Each token's k results ``ys [N*k, d]`` (in expert order: row i is pair ``order[i]``) summed: ``[N, d]``.

    ``gather`` (the CUDA path): back to (token, slot) order, then a sum over the slots accumulated in fp32.
    Otherwise one ``index_add_``: on the CPU it adds in a fixed order and is 2-7% faster than the gather
    (small preset, 256-1024 tokens); on CUDA it adds with atomics, whose order, and so whose bf16 rounding,
    changes from run to run (on an H200 the same seed gave other tokens).
    """
    n = ys.shape[0] // k
    if gather:
        unsort = torch.empty_like(order).scatter_(0, order, torch.arange(n * k, device=ys.device))
        return ys.index_select(0, unsort).view(n, k, -1).sum(1, dtype=torch.float32).to(ys.dtype)
    return ys.new_zeros(n, ys.shape[1]).index_add_(0, order // k, ys)


def experts_reference(experts: Experts, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Slow path: each token's k experts one at a time (the test oracle for ``Experts.forward``)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(idx.shape[1]):
            e = int(idx[t, slot])
            out[t] += (experts.expert(e, x[t : t + 1])[0] * weights[t, slot]).to(x.dtype)
    return out
