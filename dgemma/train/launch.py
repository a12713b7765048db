"""Running a training job for a command line (``dgemma train``, ``dgemma sudoku train``).

Before anything is loaded it refuses a new run in a non-empty output directory and leaves a finished run
as it is ("already at step N of N"); on Ctrl-C it says how far the run got, which checkpoint a resume
would start from, and the exact command that resumes it (exit status 130).
"""

from __future__ import annotations

import sys
from pathlib import Path

from dgemma.train import dist, rundir
from dgemma.train.config import TrainConfig

INTERRUPTED = 130  # the shell's status for a process ended by SIGINT


def train(cfg: TrainConfig, env: dist.Dist, resume: bool, words: list[str], show_progress: bool | None = None):
    """Run (or resume) the training that ``cfg`` describes; ``words`` are the command's arguments after
    ``dgemma``, for the resume command. Returns ``(TrainResult or None, exit status)``."""
    from dgemma.train.trainer import Trainer, TrainResult

    t = cfg.train
    at = rundir.check(t.out, resume)
    if at is not None and at >= t.steps:
        if env.main:
            print(f"dgemma: {rundir.already_done(t.out, at, t.steps)}", file=sys.stderr)
        final, adapter = rundir.outputs(t.out)
        last = rundir.last_logged(t.out)
        return TrainResult(Path(t.out), final, adapter, history=[last] if last else [], step=at), 0
    trainer = None
    try:
        trainer = Trainer(cfg, env, show_progress=show_progress)
        return trainer.run(resume=resume), 0
    except KeyboardInterrupt:
        if env.main:
            done = trainer.done if trainer is not None and trainer.done else None
            command = rundir.resume_command(words, env.world)
            print(f"dgemma: {rundir.interrupted(t.out, done, t.steps, command)}", file=sys.stderr)
        return None, INTERRUPTED
