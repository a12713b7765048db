"""Exact bytes of a model's weights, per part and storage format, from its :class:`ModelConfig` alone.

Every tensor of the checkpoint is listed by :func:`weight_tensors` (dgemma names and shapes: the model's
``state_dict``, parameters and the two layer scalars of each layer) with the part it belongs to. Formats:

* ``float32``, ``bfloat16``, ``float16``: every tensor at that width.
* ``int8``: per output channel, symmetric: one int8 code per weight and one scale per output row.
* ``int4``: group-wise, symmetric: 4-bit codes packed two per byte along the input dimension (a row of
  ``in`` codes takes ``ceil(in / 2)`` bytes) and one scale per group of ``group_size`` (64) consecutive
  inputs of a row (``ceil(in / group_size)`` groups per row; the last may be shorter).

Scales are bfloat16 (2 bytes; ``scale_bytes``). The fused expert tensors ``[E, out, in]`` are quantised
expert by expert: ``E * out`` rows, each with its own scales. In the quantised formats every linear weight
(attention q/k/v/o, the dense MLP, the self-conditioning MLP) and the expert tensors are quantised; the
tied embedding stays bfloat16 or, with ``embedding="int8"``, is int8 per vocabulary row (the same format,
its rows being the LM head's output channels); norms, layer scalars and the router stay bfloat16 (the
router's top-k choice is discrete: a rounding error there picks another expert, not a nearby value).

Symmetric rather than asymmetric: a zero-point per scale would add bytes (a bf16 zero per group of 64
int4 codes: 34 -> 36 bytes per group, +6% on the experts) and a subtraction to every dequantisation, while
a scale alone factors out of each group's dot product. Trained weights are close to zero-mean within a row
or a group of 64, so the range an offset would recover is small.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

from dgemma.config import ModelConfig

PARTS = ("experts", "attention", "dense_mlp", "self_conditioning", "embedding", "router", "norms_scalars")
FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANT_FORMATS = ("int8", "int4")
FORMATS = ("float32", "bfloat16", "int8", "int4")  # what ``dgemma info`` reports
GROUP_SIZE = 64  # int4: inputs per scale
SCALE_BYTES = 2  # bfloat16 scales
KEPT_BYTES = 2  # norms, scalars, router (and the embedding unless int8) in a quantised model: bfloat16


@dataclass(frozen=True)
class WeightTensor:
    """One checkpoint tensor: its dgemma name, shape, part, and how a quantised model stores it
    (``role``: ``linear`` ``[out, in]``, ``experts`` ``[E, out, in]``, ``embedding`` ``[V, d]``, ``kept``)."""

    name: str
    shape: tuple[int, ...]
    part: str
    role: str

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def weight_tensors(cfg: ModelConfig) -> list[WeightTensor]:
    """Every tensor of the checkpoint, in the model's ``state_dict`` order."""
    d, e, dense, moe = cfg.hidden_size, cfg.num_experts, cfg.intermediate_size, cfg.moe_intermediate_size
    h = cfg.num_attention_heads
    out = [WeightTensor("embed_tokens.weight", (cfg.vocab_size, d), "embedding", "embedding")]

    def add(name, shape, part, role):
        out.append(WeightTensor(name, tuple(shape), part, role))

    def norm(name, dim):
        add(name, (dim,), "norms_scalars", "kept")

    for i, spec in enumerate(cfg.layers):
        p, hd, kv = f"layers.{i}.", spec.head_dim, spec.num_kv_heads
        norm(p + "layer_scalar", 1)
        norm(p + "encoder_layer_scalar", 1)
        add(p + "self_attn.q_proj.weight", (h * hd, d), "attention", "linear")
        add(p + "self_attn.k_proj.weight", (kv * hd, d), "attention", "linear")
        if spec.is_sliding:  # full layers have no V projection (V = K)
            add(p + "self_attn.v_proj.weight", (kv * hd, d), "attention", "linear")
        add(p + "self_attn.o_proj.weight", (d, h * hd), "attention", "linear")
        norm(p + "self_attn.q_norm.weight", hd)
        norm(p + "self_attn.k_norm.weight", hd)
        add(p + "mlp.gate_proj.weight", (dense, d), "dense_mlp", "linear")
        add(p + "mlp.up_proj.weight", (dense, d), "dense_mlp", "linear")
        add(p + "mlp.down_proj.weight", (d, dense), "dense_mlp", "linear")
        add(p + "router.scale", (d,), "router", "kept")
        add(p + "router.per_expert_scale", (e,), "router", "kept")
        add(p + "router.proj.weight", (e, d), "router", "kept")
        add(p + "experts.gate_up_proj", (e, 2 * moe, d), "experts", "experts")
        add(p + "experts.down_proj", (e, d, moe), "experts", "experts")
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "pre_feedforward_layernorm_2", "post_feedforward_layernorm_1",
                     "post_feedforward_layernorm_2"):
            norm(p + name + ".weight", d)
    norm("norm.weight", d)
    norm("self_conditioning.pre_norm.weight", d)
    add("self_conditioning.gate_proj.weight", (dense, d), "self_conditioning", "linear")
    add("self_conditioning.up_proj.weight", (dense, d), "self_conditioning", "linear")
    add("self_conditioning.down_proj.weight", (d, dense), "self_conditioning", "linear")
    return out


def quantized_widths(cfg: ModelConfig) -> list[int]:
    """The input widths of the weights the quantised formats quantise (linears and experts), sorted."""
    return sorted({t.shape[-1] for t in weight_tensors(cfg) if t.role in ("linear", "experts")})


def group_fits(widths: list[int], group_size: int) -> bool:
    """Whether int4 groups of ``group_size`` are whole on every width (a width at most one group is one group)."""
    return all(w <= group_size or w % group_size == 0 for w in widths)


def default_group_size(cfg: ModelConfig) -> int:
    """The int4 group size when none is asked for: 64 (the accounting's), else the largest power of two below
    it that divides every quantised width (a model whose widths are not multiples of 64)."""
    widths = quantized_widths(cfg)
    return next(g for g in (GROUP_SIZE, 32, 16, 8, 4, 2, 1) if group_fits(widths, g))


def quantized_bytes(rows: int, cols: int, fmt: str, group_size: int = GROUP_SIZE,
                    scale_bytes: int = SCALE_BYTES) -> int:
    """Bytes of ``rows`` output rows of ``cols`` inputs in ``fmt`` (``int8`` or ``int4``), scales included."""
    if fmt == "int8":
        return rows * cols + rows * scale_bytes
    if fmt == "int4":
        return rows * ceil(cols / 2) + rows * ceil(cols / group_size) * scale_bytes
    raise ValueError(f"unknown quantised format `{fmt}`; choose one of: {', '.join(QUANT_FORMATS)}")


def tensor_bytes(t: WeightTensor, fmt: str, embedding: str = "bfloat16", group_size: int = GROUP_SIZE,
                 scale_bytes: int = SCALE_BYTES) -> int:
    """Bytes of one tensor stored in ``fmt`` (module docstring); ``embedding``: ``bfloat16`` or ``int8``."""
    if fmt in FLOAT_BYTES:
        return t.numel * FLOAT_BYTES[fmt]
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"unknown format `{fmt}`; choose one of: {', '.join([*FLOAT_BYTES, *QUANT_FORMATS])}")
    if t.role == "linear":
        return quantized_bytes(t.shape[0], t.shape[1], fmt, group_size, scale_bytes)
    if t.role == "experts":  # each expert's rows on their own: E * out rows
        return quantized_bytes(t.shape[0] * t.shape[1], t.shape[2], fmt, group_size, scale_bytes)
    if t.role == "embedding" and embedding == "int8":
        return quantized_bytes(t.shape[0], t.shape[1], "int8", group_size, scale_bytes)
    if t.role == "embedding" and embedding not in ("bfloat16", "int8"):
        raise ValueError(f"the embedding is kept in bfloat16 or int8, not `{embedding}`")
    return t.numel * KEPT_BYTES


def bytes_by_part(cfg: ModelConfig, fmt: str, embedding: str = "bfloat16", group_size: int | None = None,
                  scale_bytes: int = SCALE_BYTES) -> dict[str, int]:
    """``{part: bytes}`` for every part of :data:`PARTS` (their sum is :func:`total_bytes`); ``group_size``
    None: :func:`default_group_size` (64 where it fits the widths)."""
    group_size = default_group_size(cfg) if group_size is None else group_size
    out = dict.fromkeys(PARTS, 0)
    for t in weight_tensors(cfg):
        out[t.part] += tensor_bytes(t, fmt, embedding, group_size, scale_bytes)
    return out


def total_bytes(cfg: ModelConfig, fmt: str, embedding: str = "bfloat16", group_size: int | None = None,
                scale_bytes: int = SCALE_BYTES) -> int:
    """Bytes of all the model's weights in ``fmt``."""
    return sum(bytes_by_part(cfg, fmt, embedding, group_size, scale_bytes).values())
