"""Training checkpoints that survive a crash: written to ``step-N.tmp``, then renamed to ``step-N``.

A checkpoint directory holds
* the weights: for full training a release-format checkpoint (config.json, model.safetensors, tokenizer),
  loadable by ``dgemma`` and transformers as is; for LoRA the peft adapter (``adapter/``) plus the
  trainable tensors under their training names (``trainable.safetensors``);
* ``optimizer/state.safetensors``: the optimiser's tensors, keyed ``"<parameter>|<state name>"``;
* ``trainer_state.json``, written last: step, parameter groups, the config, the log position.

No pickle anywhere. A kill at any point leaves either the new ``step-N`` complete or only a ``.tmp``
directory, which ``latest`` ignores and the next save removes. Data order and noise depend only on
(seed, step), so the step number is all a resumed run needs besides these tensors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dgemma.errors import DgemmaError
from dgemma.fileio import atomic_write, atomic_write_text
from dgemma.loading import meta_model, read_state_dict, save_checkpoint
from dgemma.train import dist, lora

_STEP = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer/state.safetensors"


def checkpoints_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def complete(out: Path) -> list[Path]:
    """The complete checkpoints under ``out`` (``trainer_state.json`` present), oldest step first."""
    found = []
    root = checkpoints_dir(out)
    if root.is_dir():
        for d in root.iterdir():
            m = _STEP.match(d.name)
            if m and (d / STATE_FILE).is_file():
                found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def latest(out: Path) -> Path | None:
    """The newest complete checkpoint under ``out``, or None."""
    found = complete(out)
    return found[-1] if found else None


def _flatten_optimizer(osd: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {}
    for fqn, entries in osd["state"].items():
        for name, value in entries.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{fqn}|{name}"] = t.detach().contiguous().cpu()
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in osd["param_groups"]]
    return tensors, groups


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        fqn, _, name = key.rpartition("|")
        state.setdefault(fqn, {})[name] = value
    return {"state": state, "param_groups": [{k: tuple(v) if k == "betas" else v for k, v in g.items()}
                                             for g in groups]}


def save(out: Path, step: int, env: dist.Dist, objective, optimizer, *, peft_model=None, tokenizer=None,
         generation_config: dict | None = None, meta: dict[str, Any], keep: int) -> Path | None:
    """Gather and write checkpoint ``step`` (every process must call this); returns its path on rank 0."""
    state = dist.full_model_state(objective, env)
    osd = dist.full_optimizer_state(objective, optimizer, env)
    final = checkpoints_dir(out) / f"step-{step:08d}"
    if env.main:
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_weights(tmp, objective, state, peft_model, tokenizer, generation_config)
        tensors, groups = _flatten_optimizer(osd)
        (tmp / "optimizer").mkdir()  # not beside model.safetensors: the checkpoint stays a loadable model
        atomic_write(tmp / OPTIMIZER_FILE, lambda p: save_file(tensors, str(p)))
        atomic_write_text(tmp / STATE_FILE, json.dumps({**meta, "step": step, "param_groups": groups}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(out, keep)
    dist.barrier(env)
    return final if env.main else None


def write_weights(path: Path, objective, state: dict[str, torch.Tensor], peft_model, tokenizer,
                  generation_config: dict | None) -> None:
    """The model part of a checkpoint (also used for the final output)."""
    if peft_model is not None:
        trainable = {n for n, p in objective.named_parameters() if p.requires_grad}
        own = {k: v.contiguous() for k, v in state.items() if k in trainable}
        atomic_write(path / "trainable.safetensors", lambda p: save_file(own, str(p)))
        lora.save_adapter(peft_model, path / "adapter", state={k.removeprefix("net."): v for k, v in state.items()})
        if tokenizer is not None:
            tokenizer.save(path / "adapter")
    else:
        save_checkpoint(objective.model, path, generation_config,
                        state={k.removeprefix("net."): v for k, v in state.items()})
        if tokenizer is not None:
            tokenizer.save(path)


def _prune(out: Path, keep: int) -> None:
    root = checkpoints_dir(out)
    done = sorted((int(m.group(1)), d) for d in root.iterdir() if (m := _STEP.match(d.name)))
    for _, d in done[:-keep]:
        shutil.rmtree(d, ignore_errors=True)
    for d in root.glob("*.tmp"):  # left by a crash during an earlier save
        shutil.rmtree(d, ignore_errors=True)


def load(path: Path, env: dist.Dist, objective, optimizer, lora_enabled: bool) -> dict[str, Any]:
    """Restore weights and optimiser state from checkpoint ``path``; returns its trainer state."""
    reader = env.main or not env.sharded  # sharded: rank 0 reads the files and broadcasts the tensors
    state: dict[str, torch.Tensor] = {}
    tensors: dict[str, torch.Tensor] = {}
    try:
        meta = json.loads((path / STATE_FILE).read_text())
        if not reader:
            pass
        elif lora_enabled:
            state = load_file(str(path / "trainable.safetensors"))
        else:
            model = objective.model
            state = {"net." + k: v for k, v in read_state_dict(path, meta_model(model.cfg), torch.float32, "cpu").items()}
        if reader:
            tensors = load_file(str(path / OPTIMIZER_FILE))
    except (OSError, ValueError, DgemmaError) as e:
        raise DgemmaError(f"cannot resume from {path}: {e}") from None
    if reader and lora_enabled and not state:
        raise DgemmaError(f"cannot resume from {path}: it holds no LoRA weights (was it a full training run?)")
    trainable = {n for n, p in objective.named_parameters() if p.requires_grad}
    missing = sorted(trainable - set(state)) if reader else []
    if missing:
        raise DgemmaError(f"cannot resume from {path}: it does not match the config (no tensor for {missing[0]}; "
                          "were lora or model.freeze_router changed?)")
    try:
        dist.load_model_state(objective, state, env)
        dist.load_optimizer_state(objective, optimizer, _unflatten_optimizer(tensors, meta["param_groups"]), env)
    except (RuntimeError, KeyError, ValueError) as e:
        raise DgemmaError(f"cannot resume from {path}: it does not match the config ({e})") from None
    return meta
