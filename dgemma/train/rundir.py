"""The output directory of a training run: whether a run may start there, where it stands, its log.

A new run (no ``--resume``) starts only in a missing or empty directory, so nothing of an earlier run is
overwritten or mixed into its log; :func:`check` says so before any data is read or model built. A resumed
run continues from the newest complete checkpoint (``dgemma.train.checkpoint``); one already at
``train.steps`` has nothing to do and is left as it is. After an interrupt, :func:`interrupted` says which
checkpoint a resume would start from and the command that does it.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from dgemma.errors import DgemmaError
from dgemma.train import checkpoint

LOG_FILE = "log.jsonl"
FINAL, ADAPTER = "final", "adapter"
# Config keys that may change on resume without a note (they do not change what is trained).
FREE_ON_RESUME = frozenset({
    "train.steps", "train.log_every", "train.save_every", "train.keep_checkpoints", "train.eval_every",
    "train.sample_every", "train.sample_prompts", "train.sample_max_new_tokens", "train.out", "train.micro_batch",
    "train.device"})


def step_of(found: Path) -> int:
    """The step of a checkpoint directory ``step-N``."""
    return int(found.name.removeprefix("step-"))


def check(out: str | Path, resume: bool) -> int | None:
    """Before anything is loaded: refuse a new run in a non-empty ``out``; with ``resume``, the step of the
    checkpoint the run will continue from (None: there is none, and a new run starts)."""
    out = Path(out)
    if not resume:
        if out.exists() and not out.is_dir():
            raise DgemmaError(f"the output directory {out} is a file; choose another --out")
        held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        if held:
            shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
            raise DgemmaError(f"the output directory {out} is not empty ({shown}); pass --resume to continue "
                              "the run there, or choose another --out")
        return None
    found = checkpoint.latest(out)
    return step_of(found) if found is not None else None


def already_done(out: str | Path, step: int, steps: int) -> str:
    if step == steps:
        return f"{out} is already at step {step} of {steps}: nothing to do (raise train.steps to train further)"
    return f"{out} is already at step {step}, past train.steps = {steps}: nothing to do"


def outputs(out: str | Path) -> tuple[Path | None, Path | None]:
    """``(final/, adapter/)`` of a finished run, None for those it does not hold."""
    out = Path(out)
    return tuple(p if p.is_dir() else None for p in (out / FINAL, out / ADAPTER))


def last_logged(out: str | Path) -> dict | None:
    """The last training-loss entry of the run's log, or None."""
    path = Path(out) / LOG_FILE
    entries = [e for e in _entries(path.read_text().splitlines()) if "loss" in e] if path.is_file() else []
    return entries[-1] if entries else None


def resume_command(words: list[str], world: int = 1) -> str:
    """The shell command that resumes a run started as ``dgemma WORDS`` (``torchrun`` for several processes)."""
    words = list(words) + ([] if "--resume" in words else ["--resume"])
    launcher = ["dgemma"] if world == 1 else ["torchrun", "--standalone", f"--nproc_per_node={world}", "-m", "dgemma"]
    return shlex.join(launcher + words)


def interrupted(out: str | Path, done: int | None, steps: int, command: str) -> str:
    """What to tell the user after Ctrl-C: the step reached, the checkpoint a resume starts from, the command."""
    found = checkpoint.latest(Path(out))
    at = f"after step {done} of {steps}" if done is not None else "before this command trained a step"
    if found is None:
        return (f"interrupted {at}; {out} holds no checkpoint yet (train.save_every sets how often one is "
                f"written), so this starts the run over:\n  {command}")
    return f"interrupted {at}; the newest checkpoint is {found} (step {step_of(found)}). Resume with:\n  {command}"


def changed_keys(old: dict, new: dict) -> list[str]:
    """Config keys (``section.key``) whose values differ, ignoring ones that may change on resume."""
    keys = []
    for section, values in new.items():
        for key, value in values.items():
            was = old.get(section, {}).get(key)
            if f"{section}.{key}" not in FREE_ON_RESUME and json.dumps(was) != json.dumps(value):
                keys.append(f"{section}.{key}")
    return keys


def _entry(line: str) -> dict | None:
    """One log line as a dict; None for a line cut short by a crash."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _entries(lines: list[str]) -> list[dict]:
    return [e for e in map(_entry, lines) if e is not None]


def log_until(lines: list[str], step: int) -> list[str]:
    """Log lines up to ``step``; a line cut short by a crash is dropped."""
    return [ln for ln in lines if (e := _entry(ln)) is not None and e.get("step", 0) <= step]
