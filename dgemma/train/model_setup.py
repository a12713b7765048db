"""What is trained: a checkpoint to fine-tune or a fresh model from a config, its tokenizer, and LoRA.

Weights are kept in fp32 for training (master weights; autocast does the bf16 compute). The router is
frozen when fine-tuning (spec 4.6) unless the config says otherwise, trained when starting from scratch.
QLoRA (``model.quant``): the float checkpoint is quantised tensor by tensor as it loads
(``load_weights(quant=)``, i.e. ``quantize_model``'s result without the float model's peak), in the compute
dtype LoRA uses anyway, and stays frozen under the adapters (:mod:`dgemma.quant.lora`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dgemma.bench.presets import PRESETS
from dgemma.config import ModelConfig
from dgemma.errors import DgemmaError
from dgemma.loading import (meta_model, build_model, load_weights, read_config, read_generation_config, read_json,
                            read_state_dict, resolve_source, save_checkpoint, stored_dtype)
from dgemma.tokenizer import BYTE_TOKENIZER, Tokenizer, byte_tokenizer
from dgemma.train import lora
from dgemma.train.config import TrainConfig


@dataclass
class ModelSetup:
    model: Any  # the DiffusionGemma (with LoRA layers injected when LoRA is on)
    net: Any  # what is trained and saved: the model, or the peft model around it
    tokenizer: Tokenizer
    generation_config: dict[str, Any]
    base_source: str | None  # the checkpoint fine-tuned, if any
    peft_model: Any = None
    save_dtype: torch.dtype = torch.float32  # of the final model: the base checkpoint's, fp32 from scratch

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_id
        return pad if pad is not None else (self.model.cfg.pad_token_id or 0)



def fill_eos(tokenizer: Tokenizer, model_cfg: ModelConfig) -> int | None:
    """The id that ends answers and fills their last canvas: the tokenizer's EOS, else the model's first."""
    eos = tokenizer.eos_id
    return eos if eos is not None else (model_cfg.eos_token_id or (None,))[0]


def _tokenizer(path: str | Path) -> Tokenizer:
    if str(path) == BYTE_TOKENIZER:  # model.tokenizer = "bytes": a byte-level tokenizer, no file needed
        return byte_tokenizer()
    try:
        return Tokenizer.from_dir(path)
    except FileNotFoundError as e:
        raise DgemmaError(f"{e}; set model.tokenizer to a directory with tokenizer.json") from None


def scratch_config(cfg: TrainConfig, tokenizer: Tokenizer) -> ModelConfig:
    """The model config for a from-scratch run: a config.json, or a preset with the tokenizer's vocabulary
    and special-token ids."""
    m = cfg.model
    if m.preset:
        if m.preset not in PRESETS:
            raise DgemmaError(f"unknown model.preset {m.preset!r}; choose one of: {', '.join(PRESETS)}")
        raw = PRESETS[m.preset]()
        text = raw["text_config"]
        text["vocab_size"] = tokenizer.vocab_size
        for key, value in (("pad_token_id", tokenizer.pad_id), ("bos_token_id", tokenizer.bos_id),
                           ("eos_token_id", tokenizer.eos_id)):
            if value is not None:
                text[key] = value
    else:
        path = Path(m.config)
        raw = read_json(path / "config.json" if path.is_dir() else path)
    model_cfg = ModelConfig.from_hf_dict(raw)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise DgemmaError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocabulary "
                          f"of {model_cfg.vocab_size}")
    return model_cfg


def plan(cfg: TrainConfig) -> tuple[Tokenizer, ModelConfig, Path | None]:
    """The tokenizer and model config of a run, read without loading any weights (so that the data can be
    checked before a large model is loaded); the resolved checkpoint when fine-tuning."""
    m = cfg.model
    if m.init:
        ckpt = resolve_source(m.init)
        refuse_quantized(ckpt, "model.init")
        return _tokenizer(m.tokenizer or ckpt), read_config(ckpt), ckpt
    tokenizer = _tokenizer(m.tokenizer)
    return tokenizer, scratch_config(cfg, tokenizer), None


def initial_state(cfg: TrainConfig, model_cfg: ModelConfig, ckpt: Path | None) -> dict[str, torch.Tensor]:
    """The starting weights (dgemma names, fp32, CPU) of a full training run: the checkpoint's, or a
    seeded random init. Read by one process of a sharded run and broadcast to the others."""
    if ckpt is not None:
        return read_state_dict(ckpt, meta_model(model_cfg), torch.float32, "cpu")
    return build_model(model_cfg, device="cpu", dtype=torch.float32, seed=cfg.train.seed).state_dict()


def build(cfg: TrainConfig, device: torch.device, compute_dtype: torch.dtype | None = None,
          planned: tuple | None = None, meta: bool = False) -> ModelSetup:
    """Load or create the model. With LoRA under bf16 autocast the frozen base is kept in bf16 (half the
    memory; the adapters stay fp32); otherwise every weight is fp32 (master weights).

    ``meta=True`` (sharded full training) builds only the structure, with no storage: the trainer shards it,
    allocates the shards, and fills them from :func:`initial_state` read by rank 0 alone.
    """
    m = cfg.model
    tokenizer, model_cfg, ckpt = planned or plan(cfg)
    if meta:
        model = meta_model(model_cfg)
        generation_config = read_generation_config(ckpt) if ckpt is not None else _scratch_generation(
            tokenizer, model_cfg)
        base = str(m.init) if m.init else None
    elif ckpt is not None:
        base_dtype = torch.bfloat16 if cfg.lora.enabled and compute_dtype == torch.bfloat16 else torch.float32
        model, _, generation_config, _ = load_weights(ckpt, device=device, dtype=base_dtype, quant=_quant(cfg, ckpt))
        base = str(m.init)
    else:
        model = build_model(model_cfg, device=device, dtype=torch.float32, seed=cfg.train.seed)
        generation_config = _scratch_generation(tokenizer, model_cfg)
        base = None
    for p in model.parameters():
        p.requires_grad_(True)
    if cfg.objective.kind == "ar":
        # The next-token loss never runs the decoder, so the self-conditioning block gets no gradient: it is
        # not trained, and not in the optimizer (whose saved state a resume must find for every trained tensor).
        model.self_conditioning.requires_grad_(False)
    freeze = m.freeze_router if m.freeze_router is not None else bool(m.init)
    if freeze:  # the routing decision (projection and input scale); the per-expert gains stay trainable
        for layer in model.layers:
            layer.router.proj.requires_grad_(False)
            layer.router.scale.requires_grad_(False)
    model.train()
    save_dtype = stored_dtype(ckpt) if ckpt is not None else torch.float32
    setup = ModelSetup(model, model, tokenizer, dict(generation_config), base, save_dtype=save_dtype)
    if cfg.lora.enabled:
        torch.manual_seed(cfg.train.seed)  # peft draws the LoRA A matrices from the global generator
        setup.peft_model = setup.net = lora.apply(model, cfg.lora, base)
    return setup


def _quant(cfg: TrainConfig, ckpt: Path) -> dict[str, Any] | None:
    """The quantisation of a QLoRA base (None: float), after checking that ``ckpt`` is a float checkpoint:
    the adapter is merged into the checkpoint it records, which must hold float weights."""
    refuse_quantized(ckpt, "model.init")
    m = cfg.model
    if m.quant is None:
        return None
    from dgemma.quant.apply import QuantOptions, check_group_size_fits

    if m.quant == "int4" and m.quant_group_size is not None:
        try:
            check_group_size_fits(read_config(ckpt), m.quant_group_size)
        except ValueError as e:
            raise DgemmaError(f"model.quant_group_size: {e}") from None
    return QuantOptions(m.quant, m.quant_group_size).as_dict()


def refuse_quantized(ckpt: Path, role: str) -> None:
    """One clear error when ``ckpt`` holds quantised weights (``dgemma quantize``): training and merging work on
    float weights (a quantised base is made as it loads with ``model.quant``)."""
    from dgemma.quant.checkpoint import read_section

    try:
        stored = read_section(read_json(Path(ckpt) / "config.json"))
    except ValueError as e:
        raise DgemmaError(f"{ckpt / 'config.json'}: {e}") from None
    if stored is not None:
        raise DgemmaError(f"{ckpt} is a quantised checkpoint ({stored.scheme}); give its float original as {role} "
                          "(for QLoRA, model.quant quantises the float base as it loads)")


def _scratch_generation(tokenizer: Tokenizer, model_cfg: ModelConfig) -> dict[str, Any]:
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else list(model_cfg.eos_token_id)
    return {"eos_token_id": eos, "pad_token_id": model_cfg.pad_token_id, "bos_token_id": model_cfg.bos_token_id}


def merge_adapter(base: str | Path, adapter: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Load ``base``, apply and merge the LoRA ``adapter`` (in fp32), write the release format in ``dtype``
    (default: the base checkpoint's), with the tokenizer."""
    ckpt = resolve_source(base)
    refuse_quantized(ckpt, "the base")
    model, _, generation_config, _ = load_weights(ckpt, device="cpu", dtype=torch.float32)
    merged = lora.merge(lora.load_adapter(model, adapter))
    out = Path(out)
    save_dtype = dtype or stored_dtype(ckpt)
    state = {k: v.to(save_dtype) if v.is_floating_point() else v for k, v in merged.state_dict().items()}
    save_checkpoint(merged, out, copy.deepcopy(generation_config), state=state)
    tok_dir = Path(adapter) if (Path(adapter) / "tokenizer.json").is_file() else ckpt
    if (tok_dir / "tokenizer.json").is_file():
        Tokenizer.from_dir(tok_dir).save(out)
    return out
