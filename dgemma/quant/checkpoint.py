"""The quantised checkpoint format: a quantised model's tensors under checkpoint names, and float checkpoint
tensors quantised one at a time as they are read.

A quantised checkpoint is the float release layout with each quantised tensor ``W`` stored as two tensors,
``W.codes`` and ``W.scale`` (:mod:`dgemma.quant.formats`: int8 codes or packed int4 nibbles, bf16 scales),
every other tensor in the float dtype that config.json's ``dtype`` names, and a section in config.json::

    "quantization_config": {"quant_method": "dgemma", "format_version": 1,
                            "scheme": "int4", "group_size": 64, "embedding": "bfloat16"}

The weights file is ``dgemma-quantized.safetensors``, not ``model.safetensors``: transformers does not read
this format, and it skips a ``quantization_config`` it does not know and would fill the weights it cannot
find with random values; without a ``model.safetensors`` it stops with an error instead. dgemma's loader
reads every ``*.safetensors`` file of a directory. Names here are dgemma names; :mod:`dgemma.loading` adds the
checkpoint prefixes, as for a float checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dgemma.quant import formats
from dgemma.quant.apply import QuantOptions
from dgemma.quant.modules import Int8Embedding, QuantizedWeight

QUANT_METHOD = "dgemma"
FORMAT_VERSION = 1
CONFIG_KEY = "quantization_config"
WEIGHTS_FILE = "dgemma-quantized.safetensors"


def config_section(options: QuantOptions) -> dict[str, Any]:
    """The ``quantization_config`` section of a quantised checkpoint's config.json."""
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, **options.as_dict()}


def read_section(config: dict[str, Any]) -> QuantOptions | None:
    """The options a checkpoint's config.json says its weights are quantised with; None for a float one.
    A ValueError for a section this loader cannot read (another tool's method, a newer format)."""
    section = config.get(CONFIG_KEY)
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ValueError(f"{CONFIG_KEY} must be a JSON object, not {section!r}")
    method = section.get("quant_method")
    if method != QUANT_METHOD:
        raise ValueError(f"the weights are quantised with {method!r}, which dgemma does not read; dgemma reads "
                         f"float checkpoints and its own quantised ones (dgemma quantize)")
    version = section.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ValueError(f"quantised format version {version!r}; this dgemma reads version {FORMAT_VERSION}")
    return QuantOptions.of(section)


class Layout:
    """Where each tensor of a quantised model (``model``: quantised, the meta device is enough) lives in a
    checkpoint, and how a float checkpoint tensor becomes the model's tensors.

    * ``file_name(key)``: model key -> the name it is stored under (``...q_proj.q.codes`` ->
      ``...q_proj.weight.codes``); keys that are not quantised keep their name.
    * ``model_key(name)``: the reverse.
    * ``quantized(name)``: whether float tensor ``name`` is quantised in this model; ``float_shape(name)`` its
      shape; ``quantize(name, w)``: its codes and scales under the model's keys.
    """

    def __init__(self, model: nn.Module):
        self._to_file: dict[str, str] = {}
        self._weights: dict[str, tuple[str, QuantizedWeight]] = {}  # float name -> (holder key, weight)
        for prefix, module in model.named_modules():
            for leaf, original in getattr(module, "STORED", {}).items():
                holder, _, kind = leaf.rpartition(".")  # e.g. ("q", "codes") or ("gate_up", "scale")
                float_name = f"{prefix}.{original}"
                self._to_file[f"{prefix}.{leaf}"] = f"{float_name}.{kind}"
                self._weights[float_name] = (f"{prefix}.{holder}", module.get_submodule(holder))
        self._to_model = {v: k for k, v in self._to_file.items()}

    def file_name(self, key: str) -> str:
        return self._to_file.get(key, key)

    def model_key(self, name: str) -> str:
        return self._to_model.get(name, name)

    def quantized(self, name: str) -> bool:
        return name in self._weights

    def float_shape(self, name: str) -> tuple[int, ...]:
        return self._weights[name][1].shape

    def quantize(self, name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Float tensor ``name`` (``[..., out, in]``, any float dtype) -> ``{model key: codes or scales}``, in the
        scheme and group size of the module that holds it (experts one at a time: ``formats.quantize``)."""
        holder, weight = self._weights[name]
        codes, scale = formats.quantize(w, weight.scheme, weight.group_size)
        return {f"{holder}.codes": codes, f"{holder}.scale": scale}


def set_compute_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """The dtype an int8 embedding's readers return: the model's float dtype (set once the float tensors are
    loaded, since a structure built on the meta device does not know it)."""
    for module in model.modules():
        if isinstance(module, Int8Embedding):
            module.compute_dtype = dtype
