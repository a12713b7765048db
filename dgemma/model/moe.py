"""Mixture-of-experts block: router (softmax -> top-k -> renormalise -> per-expert gain) and experts.

Expert weights keep the checkpoint layout: ``gate_up_proj [E, 2I, d]`` (gate rows first, then up) and
``down_proj [E, d, I]``. Two expert paths compute the same thing:
``experts_reference`` (a loop over every (token, slot) pair, slow, obviously right) and
``Experts.forward`` (tokens grouped by expert, one matmul pair per expert hit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dgemma.config import ModelConfig
from dgemma.model.layers import rms_norm


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

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.gelu(gate, approximate="tanh") * up, self.down_proj[e])

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``x [N, d]``, ``weights/idx [N, k]`` -> ``[N, d]``: tokens grouped by expert.

        One gather puts the (token, slot) pairs in expert order, each expert runs on its contiguous slice,
        and one weighted ``index_add_`` scatters the results back.
        """
        n, k = idx.shape
        flat = idx.reshape(-1)  # [N*k]
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token_of = order // k  # token index of each sorted (token, slot) pair
        xs = x.index_select(0, token_of)  # [N*k, d], grouped by expert
        ys = torch.empty_like(xs)
        start = 0
        for e, c in enumerate(counts):
            if c:
                ys[start : start + c] = self._expert(e, xs[start : start + c])
                start += c
        ys = (ys * weights.reshape(-1)[order, None]).to(x.dtype)  # routing weights are fp32
        return torch.zeros_like(x).index_add_(0, token_of, ys)


def experts_reference(experts: Experts, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Slow path: each token's k experts one at a time (the test oracle for ``Experts.forward``)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(idx.shape[1]):
            e = int(idx[t, slot])
            out[t] += (experts._expert(e, x[t : t + 1])[0] * weights[t, slot]).to(x.dtype)
    return out
