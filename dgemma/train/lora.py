"""LoRA through ``peft``: wrap a DiffusionGemma, save the adapter on its own, merge it into a checkpoint.

peft works on any ``nn.Module``: ``target_modules`` picks the attention and dense-MLP ``nn.Linear``s
(the reference recipe, spec 4.6), ``target_parameters`` the 3-D expert tensors when asked. One adapter
serves both modes, because dgemma runs encoder and decoder on the same (tied) weights. The adapter
directory is peft's own format (``adapter_config.json`` + ``adapter_model.safetensors``), with the base
checkpoint recorded in it; ``merge`` folds it into the weights and writes the release format.

A quantised base (QLoRA, ``model.quant``): the linears get peft's LoRA layer through a registered custom
module, the experts :mod:`dgemma.quant.lora`'s adapters with peft's names, and the config records the
``target_parameters`` a float base needs, so the adapter is the same as one trained on the float model.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch

from dgemma.errors import DgemmaError
from dgemma.train.config import LoraSection

EXPERT_PARAMETERS = ("experts.gate_up_proj", "experts.down_proj")


def _peft():
    try:
        import peft
    except ImportError:  # an optional dependency
        raise DgemmaError("LoRA needs the peft package: pip install 'dgemma[train]'") from None
    return peft


def apply(model: torch.nn.Module, section: LoraSection, base: str | None):
    """Inject LoRA layers into ``model`` (in place) and return the peft model around it; only the
    adapter weights are trainable afterwards."""
    peft = _peft()
    from dgemma.quant.apply import is_quantized

    quantized = is_quantized(model)
    targets = list(section.targets)
    config = peft.LoraConfig(
        r=section.rank, lora_alpha=section.alpha, lora_dropout=section.dropout, bias="none",
        target_modules=targets[0] if len(targets) == 1 else targets,
        target_parameters=list(EXPERT_PARAMETERS) if section.experts and not quantized else None,
        base_model_name_or_path=base,
    )
    if base is not None:
        model.name_or_path = str(base)  # peft records the base checkpoint from this attribute
    if quantized:
        return _apply_quantized(peft, model, config, section)
    try:
        return peft.get_peft_model(model, config)
    except ValueError as e:  # e.g. a target pattern that matches nothing
        raise DgemmaError(f"LoRA: {e}") from None


def _apply_quantized(peft, model: torch.nn.Module, config, section: LoraSection):
    """LoRA on a quantised base: peft's layers on the linears, :mod:`dgemma.quant.lora`'s on the experts."""
    from dgemma.quant import lora as qlora

    if section.experts and section.dropout:
        raise DgemmaError("LoRA: the expert adapters do not work with lora.dropout != 0 (as in peft)")
    qlora.freeze(model)
    config._register_custom_module({qlora.FrozenQuantizedLinear: qlora.LoraQuantizedLinear})
    try:
        with warnings.catch_warnings():  # peft warns about any layer type it does not ship itself
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            peft_model = peft.get_peft_model(model, config)
    except ValueError as e:
        raise DgemmaError(f"LoRA: {e}") from None
    if section.experts:
        qlora.add_expert_lora(peft_model.get_base_model(), section.rank, section.alpha)
        # what a float base needs to rebuild the same adapter (dgemma merge)
        peft_model.peft_config[qlora.ADAPTER].target_parameters = list(EXPERT_PARAMETERS)
    return peft_model


def save_adapter(peft_model, path: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter (peft format) to ``path``: written beside, then renamed over, any old one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(str(tmp), state_dict=state)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def load_adapter(model: torch.nn.Module, adapter: str | Path):
    """``model`` with the adapter at ``adapter`` applied (not merged)."""
    peft = _peft()
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise DgemmaError(f"{adapter} is not a LoRA adapter directory (no adapter_config.json)")
    return peft.PeftModel.from_pretrained(model, str(adapter))


def base_of(adapter: str | Path) -> str | None:
    """The base checkpoint an adapter was trained on, as recorded in its config."""
    import json

    cfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
    return cfg.get("base_model_name_or_path")


def merge(peft_model) -> torch.nn.Module:
    """Fold the adapter into the base weights; returns the plain DiffusionGemma."""
    return peft_model.merge_and_unload()
