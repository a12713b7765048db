"""The DiffusionGemma text model: one weight set run in two modes (spec section 3).

* ``encode``: causal pass over new tokens (prompt prefill or the commit of a finished canvas); writes K/V
  into the :class:`~dgemma.cache.KVCache`, uses the encoder ``layer_scalar`` of each layer.
* ``decode``: bidirectional pass over a canvas that reads the cache without writing it (sliding layers see
  the last ``W - 1`` cached positions plus the whole canvas), with optional self-conditioning, returning
  soft-capped fp32 logits; uses the decoder ``layer_scalar``.

Where K/V come from is the only difference between the modes; it is a small strategy object
(:class:`EncoderKV` / :class:`DecoderKV`) handed to every layer. Parameter names follow the checkpoint's
``model.decoder.*`` names so that loading is a prefix map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from dgemma.cache import KVCache
from dgemma.config import ModelConfig
from dgemma.model.layers import (Attention, GatedMLP, RMSNorm, TiedEmbedding, rms_norm, rope_cos_sin,
                                  rope_inv_freq)
from dgemma.model.moe import Experts, Router


class EncoderKV:
    """Encoder mode: append the new K/V to the cache, attend causally (sliding window by position)."""

    def __init__(self, cache: KVCache, starts: torch.Tensor, t: int, window: int, device):
        self.cache, self.starts = cache, starts
        qpos = (starts[:, None] + torch.arange(t)).to(device)  # [B, T] absolute positions of the queries
        self.hi = int(starts.max()) + t
        self.masks = {}
        for sliding in (False, True):
            lo = max(0, int(starts.min()) - window + 1) if sliding else 0
            slots = torch.arange(lo, self.hi, device=device)  # [Tk]
            visible = slots[None, None, :] <= qpos[:, :, None]  # [B, T, Tk]
            if sliding:
                visible &= slots[None, None, :] > qpos[:, :, None] - window
            self.masks[sliding] = (lo, visible[:, None])

    def __call__(self, layer: int, sliding: bool, k: torch.Tensor, v: torch.Tensor):
        self.cache.write(layer, k, v, self.starts)
        lo, mask = self.masks[sliding]
        keys, values = self.cache.view(layer, lo, self.hi)
        return keys, values, mask


class DecoderKV:
    """Decoder mode: read cached K/V (never write) and put the canvas's own K/V after them."""

    def __init__(self, cache: KVCache, canvas_len: int, window: int, device):
        self.cache = cache
        lens = cache.lengths.to(device)  # [B]
        self.hi = int(cache.lengths.max())
        self.masks = {}
        # Rows of equal length see every slot of their view: no mask, so SDPA may pick a fused kernel
        # (flash on CUDA; a boolean mask forces the math kernel there). Decided on the host, no sync.
        uniform = bool((cache.lengths == self.hi).all())
        for sliding in (False, True):
            lo = max(0, int(cache.lengths.min()) - window + 1) if sliding else 0
            if uniform:
                self.masks[sliding] = (lo, None)
                continue
            slots = torch.arange(lo, self.hi, device=device)
            visible = slots[None, :] < lens[:, None]  # [B, Tk_cache]
            if sliding:
                visible &= slots[None, :] >= lens[:, None] - window + 1
            canvas = torch.ones(lens.shape[0], canvas_len, dtype=torch.bool, device=device)
            self.masks[sliding] = (lo, torch.cat([visible, canvas], dim=1)[:, None, None, :])

    def __call__(self, layer: int, sliding: bool, k: torch.Tensor, v: torch.Tensor):
        lo, mask = self.masks[sliding]
        ck, cv = self.cache.view(layer, lo, self.hi)
        return torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2), mask


class StaticDecoderKV:
    """Decoder K/V with shapes that do not depend on the rows' lengths, for a CUDA graph that outlives its
    canvas (``dgemma.graphs``): the lengths are device inputs, refilled by :meth:`update`.

    Full layers attend over every cache slot, those at or past a row's length masked; sliding layers over a
    window gathered from the ``min(W - 1, capacity)`` slots before each row's length (slots before 0 masked).
    The canvas's own K/V follow, as in :class:`DecoderKV`, which sees the same keys in the same order but
    sliced to the lengths: the two agree up to float rounding (masked keys add exact zeros).
    """

    def __init__(self, cache: KVCache, canvas_len: int, window: int, device):
        b, cap = cache.batch_size, cache.capacity
        self.cache, self.canvas_len, self.win = cache, canvas_len, min(window - 1, cap)
        self.positions = torch.zeros(b, canvas_len, dtype=torch.long, device=device)  # [B, C]
        self.full_mask = torch.ones(b, 1, 1, cap + canvas_len, dtype=torch.bool, device=device)
        self.win_mask = torch.ones(b, 1, 1, self.win + canvas_len, dtype=torch.bool, device=device)
        self.win_slots = torch.zeros(b, self.win, dtype=torch.long, device=device)  # [B, win] cache slot
        self.lengths: tuple[int, ...] | None = None
        self.update(cache)

    def update(self, cache: KVCache) -> None:
        """Refill positions, masks and window slots for ``cache.lengths`` (host-to-device copies; a no-op
        when the lengths are those of the last update). Never call it inside a capture."""
        if tuple(cache.lengths.tolist()) == self.lengths:
            return
        lens = cache.lengths[:, None]  # [B, 1] host
        slots = lens - self.win + torch.arange(self.win)  # [B, win]: the W - 1 positions before each length
        self.positions.copy_(lens + torch.arange(self.canvas_len))
        self.full_mask[..., : cache.capacity].copy_((torch.arange(cache.capacity) < lens)[:, None, None])
        self.win_mask[..., : self.win].copy_((slots >= 0)[:, None, None])
        self.win_slots.copy_(slots.clamp(min=0))
        self.lengths = tuple(cache.lengths.tolist())

    def __call__(self, layer: int, sliding: bool, k: torch.Tensor, v: torch.Tensor):
        ck, cv = self.cache.k[layer], self.cache.v[layer]  # [B, H_kv, capacity, D]
        mask = self.full_mask
        if sliding:
            b, h, _, d = ck.shape
            idx = self.win_slots[:, None, :, None].expand(b, h, self.win, d)
            ck, cv, mask = ck.gather(2, idx), cv.gather(2, idx), self.win_mask
        return torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2), mask


class Block(nn.Module):
    """Attention + (dense MLP + MoE), Gemma-4 sandwich norms, residual scaled by a per-mode scalar."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.index = index
        self.sliding = cfg.layers[index].is_sliding
        self.self_attn = Attention(cfg, cfg.layers[index])
        self.mlp = GatedMLP(d, cfg.intermediate_size)
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        names = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm", "pre_feedforward_layernorm_2", "post_feedforward_layernorm_1",
                 "post_feedforward_layernorm_2"]
        for name in names:
            setattr(self, name, RMSNorm(d, eps))
        self.register_buffer("layer_scalar", torch.ones(1))  # decoder mode
        self.register_buffer("encoder_layer_scalar", torch.ones(1))  # encoder mode

    def forward(self, x: torch.Tensor, cos, sin, kv, encoder: bool) -> torch.Tensor:
        """``x [B, T, d]`` -> ``[B, T, d]``; ``kv`` supplies keys/values/mask for this layer."""
        q, k, v = self.self_attn.project(self.input_layernorm(x), cos, sin)
        keys, values, mask = kv(self.index, self.sliding, k, v)
        x = x + self.post_attention_layernorm(self.self_attn.attend(q, keys, values, mask))

        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(x)))
        flat = x.reshape(-1, x.shape[-1])  # [B*T, d]; the router sees the un-normalised residual
        weights, idx = self.router(flat)
        moe = self.experts(self.pre_feedforward_layernorm_2(flat), weights, idx)
        moe = self.post_feedforward_layernorm_2(moe.reshape(x.shape))
        x = x + self.post_feedforward_layernorm(dense + moe)
        return x * (self.encoder_layer_scalar if encoder else self.layer_scalar)


class SelfConditioning(nn.Module):
    """Previous step's distribution, as a probability-weighted embedding, through a gated MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_size
        self.pre_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.gate_proj = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, d, bias=False)
        self.eps = cfg.rms_norm_eps

    def forward(self, emb: torch.Tensor, soft: torch.Tensor | None) -> torch.Tensor:
        if soft is not None:  # with soft = 0 the MLP adds exactly 0, so it is skipped
            s = self.pre_norm(soft)
            emb = emb + self.down_proj(F.gelu(self.gate_proj(s), approximate="tanh") * self.up_proj(s))
        return rms_norm(emb, None, self.eps)  # scale-free post-norm, applied even without a signal


class DiffusionGemma(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = TiedEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_conditioning = SelfConditioning(cfg)
        for name, buf in self.rope_buffers(cfg).items():
            self.register_buffer(name, buf, persistent=False)

    @staticmethod
    def rope_buffers(cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """RoPE inverse frequencies per layer type (head dims differ between sliding and full layers)."""
        out = {}
        for t, spec in cfg.rope.items():
            head_dim = next(s.head_dim for s in cfg.layers if s.layer_type == t)
            out[f"inv_freq_{t}"] = rope_inv_freq(spec, head_dim)
        return out

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    def embed_scale(self) -> float:
        """``sqrt(d)`` rounded to the weight dtype first (bf16: sqrt(2816) = 53.07 -> 53.0), as the reference
        does. A Python number (multiplying by it equals multiplying by a 0-dim tensor of that dtype, and
        creates no device tensor, so CUDA graphs can capture it)."""
        return float(torch.tensor(self.cfg.embed_scale, dtype=self.dtype))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens.lookup(ids) * self.embed_scale()

    def run_layers(self, x: torch.Tensor, positions: torch.Tensor, kv, encoder: bool,
                   checkpoint: bool = False) -> torch.Tensor:
        """Every layer then the final norm: ``x [B, T, d]`` at ``positions [B, T]`` -> ``[B, T, d]``.

        ``kv`` is the K/V strategy (cache-backed here, ``dgemma.train.objective`` for training).
        ``checkpoint`` recomputes each layer's activations in the backward pass (activation checkpointing).
        """
        tables = {}
        for t in self.cfg.rope:
            tables[t] = rope_cos_sin(getattr(self, f"inv_freq_{t}"), positions, x.dtype)
        for layer in self.layers:
            cos, sin = tables[self.cfg.layers[layer.index].layer_type]
            if checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, kv, encoder, use_reentrant=False)
            else:
                x = layer(x, cos, sin, kv, encoder)
        return self.norm(x)

    def encode(self, ids: torch.Tensor, cache: KVCache, n_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Causal pass over ``ids [B, T]`` placed after each row's cached tokens; writes the cache.

        ``n_valid [B]`` (default T) is how many of the T tokens of each row are real (right padding);
        the row's cache length grows by that much. Returns final-normed hidden states ``[B, T, d]``.
        """
        b, t = ids.shape
        starts = cache.lengths.clone()
        positions = (starts[:, None] + torch.arange(t)).to(ids.device)
        kv = EncoderKV(cache, starts, t, self.cfg.sliding_window, ids.device)
        h = self.run_layers(self.embed(ids), positions, kv, encoder=True)
        cache.lengths += torch.full((b,), t) if n_valid is None else n_valid.cpu()
        return h

    def soft_embedding(self, sc_logits: torch.Tensor) -> torch.Tensor:
        """``softmax(sc_logits) @ E * sqrt(d)``: ``[B, C, V]`` -> ``[B, C, d]``."""
        probs = F.softmax(sc_logits, dim=-1, dtype=torch.float32).to(self.dtype)
        return self.embed_tokens.soft_embed(probs) * self.embed_scale()

    def decode(
        self,
        canvas: torch.Tensor,
        cache: KVCache,
        sc_logits: torch.Tensor | None = None,
        sc_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoiser pass over ``canvas [B, C]`` at positions ``len_b .. len_b + C``; logits ``[B, C, V]`` fp32.

        ``sc_logits [B, C, V]``: previous step's (temperature-scaled) logits for self-conditioning;
        ``sc_mask [B]`` bool switches it off per row (training).
        """
        soft = None
        if sc_logits is not None:
            soft = self.soft_embedding(sc_logits)
            if sc_mask is not None:
                soft = soft * sc_mask.to(soft.dtype)[:, None, None]
        return self.logits(self.decode_hidden(canvas, cache, soft))

    def decode_hidden(self, canvas: torch.Tensor, cache: KVCache, soft: torch.Tensor | None = None) -> torch.Tensor:
        """The denoiser up to the final norm: ``canvas [B, C]`` -> hidden states ``[B, C, d]``.

        ``soft [B, C, d]`` is a ready soft embedding for self-conditioning (see ``soft_embedding``); the
        sampler computes it from each step's logits chunk by chunk (``dgemma.denoise.step_fused``).
        """
        positions, kv = self.decode_inputs(cache, canvas.shape[1])
        return self.decode_with(canvas, positions, kv, soft)

    def decode_inputs(self, cache: KVCache, canvas_len: int) -> tuple[torch.Tensor, "DecoderKV"]:
        """The host-side part of a decoder pass: canvas positions ``[B, C]`` and the K/V strategy (masks)."""
        positions = (cache.lengths[:, None] + torch.arange(canvas_len)).to(self.device)
        return positions, DecoderKV(cache, canvas_len, self.cfg.sliding_window, self.device)

    def decode_with(self, canvas: torch.Tensor, positions: torch.Tensor, kv: "DecoderKV",
                    soft: torch.Tensor | None = None) -> torch.Tensor:
        """The device-only part of :meth:`decode_hidden` (no host reads or copies: CUDA graphs capture it)."""
        x = self.self_conditioning(self.embed(canvas), soft)
        return self.run_layers(x, positions, kv, encoder=False)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Tied LM head and tanh soft-cap, in fp32."""
        out = self.embed_tokens.logits(h).float()
        cap = self.cfg.final_logit_softcapping
        return out if cap is None else torch.tanh(out / cap) * cap
