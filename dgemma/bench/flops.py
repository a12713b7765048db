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


def decode_bytes(cfg: ModelConfig, starts: list[int], self_conditioning: bool, dtype_bytes: int) -> int:
    """Bytes one denoising pass must read at least: touched weights, the embedding (LM head and soft
    embedding), and each row's visible KV cache. Divided by memory bandwidth: the step's floor time.

    An expert counts once it is hit by any of the ``rows x C`` tokens; with uniform routing the expected
    number of experts touched is ``E (1 - (1 - k/E)^tokens)`` (nearly all for 256 tokens x top-8 of 128).
    """
    d, e, k = cfg.hidden_size, cfg.num_experts, cfg.top_k_experts
    tokens = len(starts) * cfg.canvas_length
    touched = e * (1 - (1 - k / e) ** tokens)
    weights = 0
    kv = 0
    for spec in cfg.layers:
        hd, h, n_kv = spec.head_dim, cfg.num_attention_heads, spec.num_kv_heads
        weights += d * h * hd * 2 + d * n_kv * hd * (2 if spec.is_sliding else 1)
        weights += 3 * d * cfg.intermediate_size + d * e + touched * 3 * d * cfg.moe_intermediate_size
        for start in starts:
            cached = min(start, cfg.sliding_window - 1) if spec.is_sliding else start
            kv += cached * n_kv * hd * (2 if spec.is_sliding else 1)  # full layers: K = V, one tensor
    embed_reads = 2 if self_conditioning else 1
    weights += embed_reads * cfg.vocab_size * d + (3 * d * cfg.intermediate_size if self_conditioning else 0)
    return int((weights + kv) * dtype_bytes)
