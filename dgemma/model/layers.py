"""Building blocks of the DiffusionGemma text stack: RMSNorm, RoPE, gated MLP, attention, the tied embedding.

Numerics follow spec section 3.2-3.5: RMSNorm in fp32 with a plain ``w`` (no ``1 + w``), the power -0.5
instead of rsqrt, tanh-GELU, attention scale 1.0 (q/k RMS norms replace 1/sqrt(d)), K = V on full layers,
scale-free RMS norm on V, rotate-half RoPE with ``proportional`` partial rotation on full layers.
Attention takes its keys, values and mask as arguments; the model decides where they come from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dgemma.config import LayerSpec, ModelConfig, RopeSpec


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMS-normalise the last dim in fp32, scale by ``weight`` (if any), return in ``x``'s dtype.

    The weight is promoted to fp32 inside the multiply (exact, so the same bits as ``weight.float()``)
    rather than by a cast kernel of its own: a decoder pass of the 26B config has about 270 weighted norms,
    and on a GPU each kernel costs its launch however small it is. (Writing the bf16 result from the same
    multiply, ``out=``, saves one more kernel but was 10% slower on the CPU, so it is not done.)
    """
    xf = x.float()
    out = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        out = out * weight
    return out.type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(spec: RopeSpec, head_dim: int) -> torch.Tensor:
    """Inverse frequencies, length ``head_dim // 2`` for proportional RoPE (zeros = unrotated pairs)."""
    if spec.rope_type == "proportional":
        n_rot = int(spec.partial_rotary_factor * head_dim // 2)
        rotated = 1.0 / (spec.theta ** (torch.arange(0, 2 * n_rot, 2, dtype=torch.float) / head_dim))
        inv = torch.cat([rotated, torch.zeros(head_dim // 2 - n_rot)])
    else:  # default: rotate the first `dim` dims, exponent over `dim`
        dim = int(head_dim * spec.partial_rotary_factor)
        inv = 1.0 / (spec.theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    return inv / spec.factor


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables ``[B, T, 2 * len(inv_freq)]`` for integer ``positions [B, T]``, computed in fp32."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)  # [B, T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on ``x [B, T, H, D]``; a table shorter than D leaves the tail dims untouched."""
    d = cos.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    half = d // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    out = rot * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out if rest.shape[-1] == 0 else torch.cat([out, rest], dim=-1)


class GatedMLP(nn.Module):
    """``down(gelu_tanh(gate(x)) * up(x))``: the dense "shared expert" and the self-conditioning MLP."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class TiedEmbedding(nn.Embedding):
    """The ``[V, d]`` matrix shared by the input embedding, the LM head and the soft embedding (spec: tied).

    The weight boundary: ``lookup``, ``logits``, ``logits_block`` and ``soft_embed`` are the only readers of
    the matrix (the model's scaling and soft-cap stay outside), so a quantised store replaces these methods
    without touching the model, the sampler or training. An ``nn.Embedding``: the same parameter
    (``weight``), initialisation and ``forward`` (the lookup).
    """

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids [...]`` -> ``[..., d]``."""
        return F.embedding(ids, self.weight)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head's products ``h [..., d] @ E.T -> [..., V]``, in ``h``'s dtype (no soft-cap)."""
        return F.linear(h, self.weight)

    def logits_block(self, x: torch.Tensor, lo: int, hi: int, out: torch.Tensor) -> None:
        """Vocabulary columns ``lo:hi`` of the LM head: ``x [m, d] @ E[lo:hi].T`` written into ``out [m, hi - lo]``
        (fp32; a strided view is fine)."""
        block = self.weight[lo:hi]
        if block.dtype == x.dtype == torch.float32:
            torch.mm(x, block.t(), out=out)
        else:
            out.copy_(F.linear(x, block))

    def soft_embed(self, probs: torch.Tensor) -> torch.Tensor:
        """A probability-weighted embedding: ``probs [..., V] @ E -> [..., d]`` (self-conditioning)."""
        return probs @ self.weight

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of what the lookups and products return (the model's compute dtype)."""
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def row_bytes(self) -> int:
        """Bytes of one vocabulary row as stored (the LM head's block size is chosen from it)."""
        return self.weight.shape[1] * self.weight.element_size()


class Attention(nn.Module):
    """Projections and norms of one layer; ``attend`` runs scaled-dot-product attention with scale 1.0."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        d, hd = cfg.hidden_size, spec.head_dim
        self.spec = spec
        self.head_dim = hd
        self.n_heads = cfg.num_attention_heads
        self.n_kv = spec.num_kv_heads
        self.eps = cfg.rms_norm_eps
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=False)
        # Full-attention layers have no V projection: V is the raw K projection.
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=False) if spec.is_sliding else None
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.plain_gqa: bool | None = None  # see ``gqa_mode``

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """``x [B, T, d]`` -> q ``[B, H, T, D]``, k and v ``[B, H_kv, T, D]`` (normed, k and q roped)."""
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.n_heads, self.head_dim))
        k_raw = self.k_proj(x).view(b, t, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim) if self.v_proj is not None else k_raw
        k = self.k_norm(k_raw)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = rms_norm(v, None, self.eps)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attend(self, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
        """q ``[B, H, Tq, D]``, k/v ``[B, H_kv, Tk, D]``, bool mask ``[B, 1, Tq or 1, Tk]`` -> ``[B, Tq, d]``."""
        b, _, t, _ = q.shape
        mode, g = self.gqa_mode(q, mask), self.n_heads // self.n_kv
        if mode == "fold":
            # Grouped-query attention as plain attention: query head h reads K/V head h // g, so the g query
            # heads of a K/V head become g * Tq query rows of it. Exact; the mask is the same for every row.
            out = F.scaled_dot_product_attention(q.reshape(b, self.n_kv, g * t, self.head_dim), k, v,
                                                 attn_mask=mask, scale=1.0).reshape(b, self.n_heads, t, self.head_dim)
        elif mode == "expand":  # a mask per query row (the encoder's): each K/V head repeated for its g heads
            out = F.scaled_dot_product_attention(q, k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1),
                                                 attn_mask=mask, scale=1.0)
        else:  # the reference path
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=g != 1)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def gqa_mode(self, q: torch.Tensor, mask: torch.Tensor | None) -> str:
        """How ``attend`` runs grouped-query attention: ``grouped`` (SDPA's own ``enable_gqa``, the reference),
        or as plain attention, ``fold`` or ``expand``. ``plain_gqa`` picks: None = on CUDA where needed.

        On CUDA no fused SDPA kernel takes a grouped-query pass with a head dim over 256 (flash stops at 256,
        the memory-efficient kernel has no grouped mode), so the 512-wide full layers fell to the math kernel
        (fp32, K/V repeated per head). As plain attention the memory-efficient kernel takes it (a 26B
        full layer on an H200: decoder, 256 queries over 4352 keys, 1.44 -> 0.47 ms; encoder, a 4096-token
        prompt, 16.0 -> 4.4 ms). ``fold`` (query groups become rows) needs no copy but a mask that is the
        same for every query row (the decoder's); ``expand`` (K/V repeated per head) takes any mask. The
        256-wide sliding layers stay grouped: with or without a mask, a fused kernel takes them there.
        """
        plain = self.plain_gqa
        if plain is None:  # only where no fused kernel takes it: 256-wide, grouped was as fast or faster
            plain = q.is_cuda and self.head_dim > 256
        if not plain or self.n_kv == self.n_heads:
            return "grouped"
        return "fold" if mask is None or mask.shape[-2] == 1 else "expand"
