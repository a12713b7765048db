"""Named model configurations for benchmarks and tests, as transformers-style ``config.json`` dicts.

* ``tiny``: a few hundred thousand parameters, for tests of the harness itself.
* ``small``: the CPU speed benchmark (vocab 32000, hidden 512, 8 layers, 16 experts top-4).
* ``26b-a4b``: the released google/diffusiongemma-26B-A4B-it text stack (spec section 2.2), for GPUs.

Each preset is a function returning a fresh dict, so callers may edit it freely.
"""

from __future__ import annotations

from typing import Any, Callable

from dgemma.config import FULL, SLIDING, ModelConfig

_ROPE = {
    FULL: {"partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0, "rope_type": "proportional"},
    SLIDING: {"rope_theta": 10_000.0, "rope_type": "default"},
}


def _config(canvas: int, *, vocab: int, hidden: int, dense: int, moe: int, experts: int, top_k: int,
            heads: int, kv: int, head_dim: int, full_kv: int, full_head_dim: int, pattern: list[str],
            repeats: int, window: int, max_pos: int, eos: Any = 1) -> dict[str, Any]:
    types = pattern * repeats
    return {
        "architectures": ["DiffusionGemmaForBlockDiffusion"],
        "model_type": "diffusion_gemma",
        "canvas_length": canvas,
        "tie_word_embeddings": True,
        "text_config": {
            "model_type": "diffusion_gemma_text",
            "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": dense,
            "moe_intermediate_size": moe, "num_experts": experts, "top_k_experts": top_k,
            "num_hidden_layers": len(types), "num_attention_heads": heads,
            "num_key_value_heads": kv, "head_dim": head_dim,
            "per_layer_config": {str(i): {"head_dim": full_head_dim, "num_key_value_heads": full_kv}
                                 for i, t in enumerate(types) if t == FULL},
            "layer_types": types, "sliding_window": window, "max_position_embeddings": max_pos,
            "rope_parameters": {k: dict(v) for k, v in _ROPE.items()},
            "final_logit_softcapping": 30.0, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
            "use_bidirectional_attention": "vision", "tie_word_embeddings": True,
            "pad_token_id": 0, "eos_token_id": eos, "bos_token_id": 2,
        },
    }


def tiny() -> dict[str, Any]:
    return _config(16, vocab=512, hidden=64, dense=128, moe=32, experts=4, top_k=2, heads=4, kv=2, head_dim=16,
                   full_kv=1, full_head_dim=32, pattern=[SLIDING, FULL], repeats=2, window=16, max_pos=4096)


def small() -> dict[str, Any]:
    return _config(256, vocab=32000, hidden=512, dense=1024, moe=256, experts=16, top_k=4, heads=8, kv=4,
                   head_dim=64, full_kv=2, full_head_dim=128, pattern=[SLIDING] * 3 + [FULL], repeats=2,
                   window=256, max_pos=32768)


def diffusiongemma_26b_a4b() -> dict[str, Any]:
    return _config(256, vocab=262144, hidden=2816, dense=2112, moe=704, experts=128, top_k=8, heads=16, kv=8,
                   head_dim=256, full_kv=2, full_head_dim=512, pattern=[SLIDING] * 5 + [FULL], repeats=5,
                   window=1024, max_pos=262144, eos=[1, 106, 50])


PRESETS: dict[str, Callable[[], dict[str, Any]]] = {
    "tiny": tiny,
    "small": small,
    "26b-a4b": diffusiongemma_26b_a4b,
}


def preset_config(name: str) -> ModelConfig:
    """The ModelConfig of a named preset; ``ValueError`` listing the names for an unknown one."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset `{name}`; choose one of: {', '.join(PRESETS)}")
    return ModelConfig.from_hf_dict(PRESETS[name]())
