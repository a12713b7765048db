"""What dgemma is compared against, on the same weights: transformers' ``generate``, and AR decoding.

* :func:`transformers_model` wraps dgemma's parameters in a transformers 5.23
  ``DiffusionGemmaForBlockDiffusion`` without copying them (``from_pretrained(None, state_dict=...)``
  shares storage and ties the encoder to the decoder), with a one-layer vision tower that text never uses.
* :func:`transformers_generate` runs its sampler with the same knobs. transformers refuses
  ``confidence_threshold=0``, so a fixed step count is asked for as an unreachable stability window.
* :func:`autoregressive` is the AR sibling: the backbone in encoder mode (causal, with the KV cache)
  emitting one greedy token per forward pass, which is what the model would cost as a left-to-right LM.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from dgemma.bench.measure import synchronize
from dgemma.cache import KVCache
from dgemma.params import SamplingParams

# A minimal vision tower: transformers always builds one, text generation never runs it.
_TINY_VISION = {
    "model_type": "gemma4_vision", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16, "patch_size": 16,
    "pooling_kernel_size": 3, "position_embedding_size": 64, "standardize": False,
    "rope_parameters": {"rope_theta": 100.0, "rope_type": "axial"},
}


@dataclass
class BaselineRun:
    tokens: list[list[int]]  # new tokens per row
    seconds: float
    prefill_seconds: float | None = None
    forwards: list[float] | None = None  # forward passes per row (transformers: tokens / tokens_per_forward)


def transformers_model(model):
    """A transformers DiffusionGemma sharing ``model``'s weights (same device and dtype), in eval mode."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    from transformers.utils import logging as hf_logging

    from dgemma.loading import export_state_dict

    raw = model.cfg.to_hf_dict()
    raw["vision_config"] = dict(_TINY_VISION)
    state = export_state_dict(model, to_cpu=False)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # it reports the (unused) vision weights as newly initialised
    try:
        hf = DiffusionGemmaForBlockDiffusion.from_pretrained(
            None, config=DiffusionGemmaConfig(**raw), state_dict=state, dtype=model.dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    return hf.to(model.device).eval()


@torch.inference_mode()
def transformers_generate(hf, prompts: torch.Tensor, params: SamplingParams, fixed_steps: bool) -> BaselineRun:
    """``prompts [B, P]`` (equal lengths) through transformers' sampler; timing covers the whole call."""
    stability = params.max_denoising_steps + 1 if fixed_steps else params.stability_threshold
    confidence = 1e-9 if fixed_steps else params.confidence_threshold
    eos = list(params.eos_token_id) if params.eos_token_id else None
    device = next(hf.parameters()).device
    prompts = prompts.to(device)
    synchronize(device)
    t0 = time.perf_counter()
    out = hf.generate(
        prompts, max_new_tokens=params.max_new_tokens, max_denoising_steps=params.max_denoising_steps,
        entropy_bound=params.entropy_bound, t_max=params.t_max, t_min=params.t_min,
        stability_threshold=stability, confidence_threshold=float(confidence), eos_token_id=eos,
        pad_token_id=params.pad_token_id if eos else None)
    synchronize(device)
    seconds = time.perf_counter() - t0
    new = out.sequences[:, prompts.shape[1]:]  # whole canvases: cut to max_new_tokens like dgemma does
    forwards = [new.shape[1] / max(f, 1e-9) for f in out.tokens_per_forward.tolist()]
    return BaselineRun(new[:, : params.max_new_tokens].tolist(), seconds, forwards=forwards)


@torch.inference_mode()
def autoregressive(model, prompts: torch.Tensor, n_new: int, temperature: float = 0.0,
                   seed: int = 0) -> BaselineRun:
    """Left-to-right decoding of ``n_new`` tokens with the encoder and its KV cache: greedy, or with
    ``temperature > 0`` sampled from ``softmax(logits / temperature)`` (a CPU generator seeded with ``seed``)."""
    gen = torch.Generator().manual_seed(seed) if temperature > 0 else None
    b, p = prompts.shape
    device = model.device
    cache = KVCache(model.cfg, b, p + n_new, device=device, dtype=model.dtype)
    synchronize(device)
    t0 = time.perf_counter()
    h = model.encode(prompts.to(device), cache)  # [B, P, d]
    synchronize(device)
    prefill = time.perf_counter() - t0
    last = h[:, -1:]  # [B, 1, d]
    out = []
    for _ in range(n_new):
        logits = model.logits(last)[:, 0]  # [B, V] fp32
        if gen is None:
            token = logits.argmax(-1, keepdim=True)  # [B, 1]
        else:
            probs = torch.softmax(logits / temperature, dim=-1).cpu()
            token = torch.multinomial(probs, 1, generator=gen).to(logits.device)  # [B, 1]
        out.append(token)
        last = model.encode(token, cache)
    tokens = torch.cat(out, dim=1).tolist()
    synchronize(device)
    return BaselineRun(tokens, time.perf_counter() - t0, prefill_seconds=prefill, forwards=[float(n_new)] * b)
