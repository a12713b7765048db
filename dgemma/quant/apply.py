"""``quantize_model``: a loaded :class:`~dgemma.model.DiffusionGemma` quantised in place, and the bytes its
weights really take (``stored_bytes``), which equal :func:`dgemma.quant.accounting.total_bytes`.

What is quantised is what the accounting says: every ``nn.Linear`` but the router's (attention q/k/v/o, the
dense MLP, the self-conditioning MLP), both expert tensors of every layer (expert by expert), and with
``embedding="int8"`` the tied embedding. Norms, layer scalars and the router keep the model's dtype (the
accounting counts them as bfloat16, so the byte totals agree on a bfloat16 model; on an fp32 model those
kept tensors take twice that). Each float weight is released as its replacement is built, so the peak is the
float model plus one tensor's codes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from dgemma.model.moe import Experts, Router
from dgemma.quant import accounting, formats
from dgemma.quant.modules import Int8Embedding, QuantizedExperts, QuantizedLinear

EMBEDDINGS = ("bfloat16", "int8")
_ALIASES = {"bf16": "bfloat16"}
QUANTIZED = (QuantizedLinear, QuantizedExperts, Int8Embedding)


def check_options(scheme: str, group_size: int | None = None, embedding: str = "bfloat16") -> str:
    """Validate the options (one ValueError naming the bad one); returns the embedding's canonical name."""
    if scheme not in formats.SCHEMES:
        raise ValueError(f"unknown quantisation scheme `{scheme}`; choose one of: {', '.join(formats.SCHEMES)}")
    if group_size is not None:
        formats.check_group_size(group_size)
    embedding = _ALIASES.get(embedding, embedding)
    if embedding not in EMBEDDINGS:
        raise ValueError(f"the embedding is kept in bfloat16 (bf16) or int8, not `{embedding}`")
    return embedding


@dataclass(frozen=True)
class QuantOptions:
    """How a model is quantised: ``scheme`` (``int8`` / ``int4``), ``group_size`` (int4 inputs per scale; None:
    :func:`~dgemma.quant.accounting.default_group_size` for the model) and
    the tied ``embedding`` (``bfloat16``: kept in the model's float dtype, or ``int8``)."""

    scheme: str
    group_size: int | None = None
    embedding: str = "bfloat16"

    def __post_init__(self):
        object.__setattr__(self, "embedding", check_options(self.scheme, self.group_size, self.embedding))

    @classmethod
    def of(cls, value: "str | dict[str, Any] | QuantOptions") -> "QuantOptions":
        """From a scheme name, a dict of the fields (e.g. a checkpoint's ``quantization_config``, whose other
        keys are ignored) or an instance."""
        if isinstance(value, QuantOptions):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, dict):
            known = {k: value[k] for k in ("scheme", "group_size", "embedding") if k in value}
            if "scheme" not in known:
                raise ValueError(f"a quantisation needs a scheme ({', '.join(formats.SCHEMES)}); got {value!r}")
            return cls(**known)
        raise ValueError(f"quant must be a scheme name ({', '.join(formats.SCHEMES)}), not {value!r}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def matches(self, other: "QuantOptions") -> bool:
        """Whether ``other`` (a model's resolved options) is what these ask for (no group size: any)."""
        return (self.scheme, self.embedding) == (other.scheme, other.embedding) and (
            self.group_size is None or self.scheme == "int8" or self.group_size == other.group_size)


def check_group_size_fits(cfg, group_size: int) -> None:
    """int4 groups are whole: ``group_size`` must divide the width of every weight the scheme quantises, or be
    at least that width (the row is then one group), as the int4 kernels of torch and of GPU libraries want.
    A ValueError names the first width that breaks this and the sizes that fit."""
    widths = accounting.quantized_widths(cfg)
    bad = [w for w in widths if w > group_size and w % group_size]
    if bad:
        fits = [g for g in (8, 16, 32, 64, 128, 256) if g <= widths[-1] and accounting.group_fits(widths, g)]
        raise ValueError(f"int4 group size {group_size} does not divide the width {bad[0]} of this model's "
                         f"weights (widths: {', '.join(map(str, widths))}); "
                         + (f"choose one that does: {', '.join(map(str, fits))}" if fits else
                            "choose a divisor of every width"))


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QUANTIZED) for m in model.modules())


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: str = "int8", group_size: int | None = None,
                   embedding: str = "bfloat16") -> nn.Module:
    """Quantise ``model`` in place (and return it): ``scheme`` ``int8`` (per output channel) or ``int4``
    (``group_size`` inputs per scale, dividing every width: :func:`check_group_size_fits`; None:
    :func:`~dgemma.quant.accounting.default_group_size`); ``embedding`` ``bfloat16`` (alias
    ``bf16``: left as it is, in the model's dtype) or ``int8``. The model's dtype stays the compute dtype.
    For inference: the codes are buffers, nothing is trained through them."""
    embedding = check_options(scheme, group_size, embedding)
    if is_quantized(model):
        raise ValueError("this model is already quantised; quantise the float model once")
    if group_size is None:
        group_size = accounting.default_group_size(model.cfg)
    if scheme == "int4":  # checked on the shapes alone, before any weight is touched
        check_group_size_fits(model.cfg, group_size)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and not isinstance(module, Router):
                setattr(module, child_name, QuantizedLinear(child, scheme, group_size))
            elif isinstance(child, Experts):
                setattr(module, child_name, QuantizedExperts(child, scheme, group_size))
    if embedding == "int8":
        model.embed_tokens = Int8Embedding(model.embed_tokens)
    model.quantization = {"scheme": scheme, "group_size": group_size, "embedding": embedding}
    return model


def stored_bytes(model: nn.Module) -> dict[str, int]:
    """``{checkpoint tensor name: bytes}`` of the model's ``state_dict`` as stored now: a quantised tensor's
    codes and scales are counted under the name of the float tensor they replace."""
    owner = {}
    for prefix, module in model.named_modules():
        for leaf, original in getattr(module, "STORED", {}).items():
            owner[f"{prefix}.{leaf}"] = f"{prefix}.{original}"
    out: dict[str, int] = {}
    for key, t in model.state_dict().items():
        name = owner.get(key, key)
        out[name] = out.get(name, 0) + t.numel() * t.element_size()
    return out


def stored_bytes_by_part(model: nn.Module) -> dict[str, int]:
    """:func:`stored_bytes` summed per part of :data:`dgemma.quant.accounting.PARTS`."""
    part = {t.name: t.part for t in accounting.weight_tensors(model.cfg)}
    out = dict.fromkeys(accounting.PARTS, 0)
    for name, n in stored_bytes(model).items():
        out[part[name]] += n
    return out
