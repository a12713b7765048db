"""Useful floating-point work of each model call, counted from the config (2 FLOPs per multiply-add).

"Useful" means what any implementation has to compute: attention counts only the keys a query may see
(the causal triangle and the sliding window), not the masked rectangle an SDPA kernel may also touch.
The benchmark divides these counts by measured time to get achieved FLOP/s, and by the machine's measured
matmul rate to get the fraction of the roofline. Element-wise work (norms, softmax, sampling) is not
counted: it is small in FLOPs, though not in time, which is exactly what the roofline fraction exposes.
"""

from __future__ import annotations

from dgemma.config import ModelConfig


def _visible_keys(spec_sliding: bool, window: int, start: int, n_query: int, causal: bool, canvas: int) -> int:
    """Total keys seen by ``n_query`` queries placed after ``start`` cached tokens."""
    if not causal:  # decoder: the cache (last W-1 positions on sliding layers) plus the whole canvas
        cached = min(start, window - 1) if spec_sliding else start
        return n_query * (cached + canvas)
    total = 0
    for i in range(n_query):  # encoder: query at position start+i sees positions <= itself (within W)
        pos = start + i
        total += min(pos + 1, window) if spec_sliding else pos + 1
    return total


def layers_flops(cfg: ModelConfig, n_tokens: int, keys_per_layer: list[int]) -> int:
    """Projections, attention, dense MLP, router and routed experts of every layer for ``n_tokens``."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    total = 0
    for spec, keys in zip(cfg.layers, keys_per_layer):
        hd, kv = spec.head_dim, spec.num_kv_heads
        proj = d * h * hd * 2 + d * kv * hd * (2 if spec.is_sliding else 1)  # q, o; k (and v on sliding)
        mlp = 3 * d * cfg.intermediate_size
        router = d * cfg.num_experts
        experts = cfg.top_k_experts * 3 * d * cfg.moe_intermediate_size
        total += 2 * n_tokens * (proj + mlp + router + experts)
        total += 4 * keys * h * hd  # scores and weighted values
    return total


def encode_flops(cfg: ModelConfig, starts: list[int], n_new: list[int]) -> int:
    """A causal encoder pass: row b adds ``n_new[b]`` tokens after ``starts[b]`` cached ones."""
    total = 0
    for start, n in zip(starts, n_new):
        keys = [_visible_keys(s.is_sliding, cfg.sliding_window, start, n, True, 0) for s in cfg.layers]
        total += layers_flops(cfg, n, keys)
    return total


def decode_flops(cfg: ModelConfig, starts: list[int], self_conditioning: bool) -> int:
    """One denoising pass over a canvas per row (plus the LM head, and the soft embedding with SC)."""
    c, d, v = cfg.canvas_length, cfg.hidden_size, cfg.vocab_size
    total = 0
    for start in starts:
        keys = [_visible_keys(s.is_sliding, cfg.sliding_window, start, c, False, c) for s in cfg.layers]
        total += layers_flops(cfg, c, keys) + 2 * c * d * v  # backbone + tied LM head
        if self_conditioning:
            total += 2 * c * v * d + 2 * c * 3 * d * cfg.intermediate_size  # probs @ E, then the SC MLP
    return total


def lm_head_flops(cfg: ModelConfig, n_positions: int) -> int:
    return 2 * n_positions * cfg.hidden_size * cfg.vocab_size
