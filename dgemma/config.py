"""Model configuration: a frozen dataclass read from a checkpoint's ``config.json``.

This is the only place that knows the Hugging Face config schema (``DiffusionGemmaConfig`` with a nested
``text_config``). Both serialisations of the per-layer attention shape are accepted: ``per_layer_config``
(newer transformers) and ``global_head_dim`` / ``num_global_key_value_heads`` (older). No torch.nn here.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

from dgemma.errors import ConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"
_SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh",)
_SUPPORTED_ROPE = ("default", "proportional")


@dataclass(frozen=True)
class RopeSpec:
    """RoPE for one layer type: ``theta``, rotated fraction of the head dim, and frequency divisor."""

    rope_type: str  # "default" | "proportional"
    theta: float
    partial_rotary_factor: float = 1.0
    factor: float = 1.0


@dataclass(frozen=True)
class LayerSpec:
    """Attention shape of one layer: sliding (own V projection) or full (K doubles as V)."""

    layer_type: str  # SLIDING | FULL
    head_dim: int
    num_kv_heads: int

    @property
    def is_sliding(self) -> bool:
        return self.layer_type == SLIDING


@dataclass(frozen=True)
class ModelConfig:
    """Everything the text model needs; built from ``config.json`` by :meth:`from_hf_dict`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP width, also the self-conditioning MLP width
    moe_intermediate_size: int
    num_experts: int
    top_k_experts: int
    num_attention_heads: int
    layers: tuple[LayerSpec, ...]
    sliding_window: int
    rope: dict[str, RopeSpec]  # keyed by layer type
    canvas_length: int = 256
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = 30.0
    max_position_embeddings: int = 262144
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: tuple[int, ...] = (1,)
    # The checkpoint's original config.json, kept so that saving writes back what was read.
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        checks = {
            "vocab_size": self.vocab_size > 0,
            "hidden_size": self.hidden_size > 0,
            "num_experts": self.num_experts > 0,
            "top_k_experts": 0 < self.top_k_experts <= self.num_experts,
            "canvas_length": self.canvas_length > 0,
            "sliding_window": self.sliding_window > 1,
            "layers": len(self.layers) > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"invalid model config: `{name}` has an impossible value")
        for i, spec in enumerate(self.layers):
            if self.num_attention_heads % spec.num_kv_heads:
                raise ConfigError(
                    f"invalid model config: layer {i} has {spec.num_kv_heads} KV heads, which does not divide "
                    f"{self.num_attention_heads} query heads"
                )
            if spec.layer_type not in self.rope:
                raise ConfigError(f"invalid model config: no rope_parameters for layer type `{spec.layer_type}`")

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layers)

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    # ------------------------------------------------------------------ HF schema
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Build from a parsed ``config.json`` (top-level ``DiffusionGemmaConfig`` or a bare text config)."""
        if not isinstance(raw, dict):
            raise ConfigError("config.json must hold a JSON object")
        text = raw.get("text_config", raw)
        if not isinstance(text, dict):
            raise ConfigError("config.json: `text_config` must be an object")
        model_type = raw.get("model_type")
        if model_type not in (None, "diffusion_gemma", "diffusion_gemma_text"):
            raise ConfigError(f"config.json describes a `{model_type}` model, not a DiffusionGemma (diffusion_gemma)")
        if raw.get("tie_word_embeddings", True) is False or text.get("tie_word_embeddings", True) is False:
            raise ConfigError(
                "this checkpoint unties the encoder and decoder weights (tie_word_embeddings=false), "
                "which dgemma does not support yet"
            )
        if text.get("use_bidirectional_attention") == "all":
            raise ConfigError("use_bidirectional_attention='all' (a non-causal encoder) is not supported")
        act = text.get("hidden_activation", "gelu_pytorch_tanh")
        if act not in _SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"config.json: hidden_activation `{act}` is not supported (only gelu_pytorch_tanh)")

        def need(key: str, default: Any = None) -> Any:
            value = text.get(key, default)
            if value is None:
                raise ConfigError(f"config.json: text_config is missing `{key}`")
            return value

        n_layers = int(need("num_hidden_layers", 30))
        layer_types = text.get("layer_types") or [
            SLIDING if (i + 1) % 6 else FULL for i in range(n_layers)
        ]
        layer_types = list(layer_types)
        if len(layer_types) != n_layers:
            raise ConfigError(
                f"config.json: layer_types has {len(layer_types)} entries for {n_layers} layers"
            )
        for t in layer_types:
            if t not in (SLIDING, FULL):
                raise ConfigError(f"config.json: unknown layer type `{t}`")
        layer_types[-1] = FULL  # the reference forces the last layer to full attention

        head_dim = int(need("head_dim", 256))
        kv_heads = int(need("num_key_value_heads", 4))
        per_layer = text.get("per_layer_config")
        layers = []
        for i, t in enumerate(layer_types):
            hd, kv = head_dim, kv_heads
            if per_layer is not None:
                override = per_layer.get(str(i), per_layer.get(i)) or {}
                hd = int(override.get("head_dim", hd))
                kv = int(override.get("num_key_value_heads", kv))
            elif t == FULL:
                hd = int(text.get("global_head_dim") or 512)
                kv = int(text.get("num_global_key_value_heads") or kv_heads)
            layers.append(LayerSpec(t, hd, kv))

        rope_raw = text.get("rope_parameters") or {
            SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
            FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
        }
        rope = {}
        for t in set(layer_types):
            params = rope_raw.get(t)
            if params is None:
                raise ConfigError(f"config.json: rope_parameters has no entry for `{t}`")
            rtype = params.get("rope_type", "default")
            if rtype not in _SUPPORTED_ROPE:
                raise ConfigError(f"config.json: rope_type `{rtype}` is not supported")
            rope[t] = RopeSpec(
                rope_type=rtype,
                theta=float(params.get("rope_theta", 10_000.0)),
                partial_rotary_factor=float(params.get("partial_rotary_factor", 1.0)),
                factor=float(params.get("factor", 1.0)),
            )

        eos = text.get("eos_token_id", raw.get("eos_token_id", 1))
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None)
        softcap = text.get("final_logit_softcapping", 30.0)
        return cls(
            vocab_size=int(need("vocab_size", 262144)),
            hidden_size=int(need("hidden_size", 2304)),
            intermediate_size=int(need("intermediate_size", 9216)),
            moe_intermediate_size=int(need("moe_intermediate_size")),
            num_experts=int(need("num_experts")),
            top_k_experts=int(need("top_k_experts")),
            num_attention_heads=int(need("num_attention_heads", 8)),
            layers=tuple(layers),
            sliding_window=int(need("sliding_window", 512)),
            rope=rope,
            canvas_length=int(raw.get("canvas_length", 256)),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            final_logit_softcapping=None if softcap is None else float(softcap),
            max_position_embeddings=int(text.get("max_position_embeddings", 131072)),
            pad_token_id=text.get("pad_token_id", 0),
            bos_token_id=text.get("bos_token_id", 2),
            eos_token_id=eos_ids,
            hf_config=copy.deepcopy(raw),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` to write: the original one when read from a checkpoint, else a fresh one."""
        if self.hf_config:
            return copy.deepcopy(self.hf_config)
        return hf_config_dict(self)


def hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """A transformers-loadable ``DiffusionGemmaConfig`` dict for ``cfg`` (used for configs built in code)."""
    per_layer = {
        str(i): {"head_dim": s.head_dim, "num_key_value_heads": s.num_kv_heads}
        for i, s in enumerate(cfg.layers)
        if s.layer_type == FULL
    }
    sliding = [s for s in cfg.layers if s.is_sliding] or [cfg.layers[0]]
    rope = {}
    for t, r in cfg.rope.items():
        entry: dict[str, Any] = {"rope_type": r.rope_type, "rope_theta": r.theta}
        if r.partial_rotary_factor != 1.0:
            entry["partial_rotary_factor"] = r.partial_rotary_factor
        if r.factor != 1.0:
            entry["factor"] = r.factor
        rope[t] = entry
    text = {
        "model_type": "diffusion_gemma_text",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_experts": cfg.num_experts,
        "top_k_experts": cfg.top_k_experts,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": sliding[0].num_kv_heads,
        "head_dim": sliding[0].head_dim,
        "per_layer_config": per_layer,
        "layer_types": [s.layer_type for s in cfg.layers],
        "sliding_window": cfg.sliding_window,
        "rope_parameters": rope,
        "rms_norm_eps": cfg.rms_norm_eps,
        "final_logit_softcapping": cfg.final_logit_softcapping,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_activation": "gelu_pytorch_tanh",
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_id) if len(cfg.eos_token_id) != 1 else cfg.eos_token_id[0],
        "tie_word_embeddings": True,
        "use_bidirectional_attention": "vision",
        "attention_bias": False,
        "attention_dropout": 0.0,
    }
    return {
        "architectures": ["DiffusionGemmaForBlockDiffusion"],
        "model_type": "diffusion_gemma",
        "canvas_length": cfg.canvas_length,
        "text_config": text,
        "tie_word_embeddings": True,
    }
