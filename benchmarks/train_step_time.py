"""Seconds per training step of the Sudoku recipe, for several draws-per-example K and batch sizes.

Reads the files that ``dgemma sudoku train --out DIR`` writes (model_config.json, tokenizer/, train.jsonl),
builds the project's ``Trainer`` with the recipe's settings (``train_recipe``), runs 2 warm-up steps and times ``--steps``
more for each (K, batch) pair and encoder-loss weight, one after the other in this process. Prints one JSON
line per timing: seconds per step, denoised canvases per second (batch x K) and distinct examples per second.

    python benchmarks/train_step_time.py runs/sudoku3 --pairs 1x32 2x32 3x32 2x24 [--steps 8] [--objective ar]
    python benchmarks/train_step_time.py runs/sudoku3 --pairs 1x32 --weights 1 0 1 0   # AR co-loss on / off

``--weights W ...``: one timing per encoder-loss weight (each pair, in the given order); weight 0 drops the AR
co-loss, so the encoder runs over the prompt only (Sudoku's answer is one block).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from dgemma.sudoku.cli import train_recipe
from dgemma.train import config, dist
from dgemma.train.trainer import Trainer


def step_time(run: Path, k: int, batch: int, steps: int, out: Path, objective: str = "diffusion",
              weight: float = 1.0) -> dict:
    raw = train_recipe(run, steps + 2, seed=0)
    raw["train"].update(out=str(out), batch_size=batch, micro_batch=batch, save_every=0)
    raw["objective"] = {"draws_per_example": k, "kind": objective, "encoder_loss_weight": weight}
    cfg = config.from_dict(raw)
    trainer = Trainer(cfg, dist.setup(cfg.train.device), show_progress=False, log=lambda msg: None)
    trainer.train_step(0)
    trainer.train_step(1)
    t0 = time.perf_counter()
    for s in range(2, 2 + steps):
        trainer.train_step(s)
    dt = (time.perf_counter() - t0) / steps
    return {"objective": objective, "encoder_loss_weight": weight, "draws_per_example": k, "batch": batch,
            "s_per_step": round(dt, 3),
            "canvases_per_s": round(batch * k / dt, 1), "examples_per_s": round(batch / dt, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a `dgemma sudoku train --out` directory")
    ap.add_argument("--pairs", nargs="+", default=["1x32", "2x32"], help="KxBATCH pairs (default 1x32 2x32)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--objective", choices=("diffusion", "ar"), default="diffusion")
    ap.add_argument("--weights", type=float, nargs="+", default=[1.0], metavar="W",
                    help="encoder (AR) loss weights, each timed in turn (default 1)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for i, pair in enumerate(args.pairs):
            k, batch = (int(x) for x in pair.split("x"))
            for j, w in enumerate(args.weights):
                print(json.dumps(step_time(args.run, k, batch, args.steps, Path(tmp) / f"{i}-{j}", args.objective,
                                           w)), flush=True)


if __name__ == "__main__":
    main()
