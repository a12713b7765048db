"""How a Sudoku training run learns, checkpoint by checkpoint: a one-step denoising probe and a small solve.

For every checkpoint (``RUN/checkpoints/step-N``, then ``RUN/final``) on validation puzzles (minimal symmetric,
rated easy, from ``--seed``, the seed the recipe A/B tables use):

* ``probe``: one decoder pass of the training objective over the answer canvas with every canvas position
  replaced by a uniform token (t = 1, the sampler's start) and also at t = 0.6 (blank cells replaced with
  probability 0.6, clues clean), with and without the self-conditioning pass; the cross-entropy and the
  argmax accuracy on the blank cells. No sampler: what the network knows in one step.
* ``solve``: the same puzzles solved with the solve defaults (``--solve N`` of them; 0 skips it): exact
  share and blank-cell accuracy.

    python benchmarks/sudoku_checkpoints.py RUN OUT.json [--n 32] [--solve 32] [--seed 4242] [--steps 250,500,final]

One thread, fp32. Each checkpoint takes 0.5-2 minutes on a 2-core CPU (the solve dominates).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import dgemma
from dgemma.loading import load_weights
from dgemma.sudoku import buckets, task
from dgemma.sudoku.solve import solve_boards
from dgemma.train import checkpoint
from dgemma.train.data import DataStats, Example, ExampleBuilder, collate
from dgemma.train.objective import Draw, Objective, ObjectiveConfig

PROBES = (("t1", 1.0, True, False), ("t1_sc", 1.0, True, True), ("t0.6", 0.6, False, False),
          ("t0.6_sc", 0.6, False, True))  # (name, t, noise the clue cells too, self-conditioning)


def examples(pairs) -> list[Example]:
    """The pairs as the trainer sees them: ``sudoku train``'s records through the trainer's example builder."""
    build = ExampleBuilder(task.build_tokenizer(), task.CANVAS, 2 * task.CANVAS, template="raw").build
    return [build(task.record(p, s), f"puzzle {k}", DataStats()) for k, (p, s) in enumerate(pairs)]


def probe(model, pairs, t: float, clues_too: bool, self_condition: bool, seed: int = 0) -> dict[str, float]:
    """Blank-cell CE and accuracy of one decoder pass over canvases noised at level ``t``."""
    g = torch.Generator().manual_seed(seed)
    blank = torch.tensor([[v == 0 for v in p] + [False] for p, _ in pairs])  # [B, C]
    draws = []
    for row in blank:
        replace = (torch.rand(task.CANVAS, generator=g) < t) & (row | clues_too)
        draws.append(Draw(t, 0, replace, torch.randint(0, task.VOCAB, (task.CANVAS,), generator=g), self_condition))
    obj = Objective(model, ObjectiveConfig(encoder_loss_weight=0.0))
    with torch.no_grad():
        hd, clean, _ = obj.canvas_states(collate(examples(pairs), 0), draws)
        logits = model.logits(hd).float()  # [B, C, V]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), clean, reduction="none")  # [B, C]
    right = logits.argmax(-1) == clean
    return {"ce": round(float(ce[blank].mean()), 4), "accuracy": round(float(right[blank].float().mean()), 4)}


def checkpoints(run: Path) -> list[Path]:
    return checkpoint.complete(run) + ([run / "final"] if (run / "final" / "config.json").is_file() else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="the run folder (holding checkpoints/ and final/)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=32, help="validation puzzles for the probe")
    ap.add_argument("--solve", type=int, default=32, help="of those, how many to solve (0: none)")
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--steps", help="only these checkpoints, comma-separated step numbers or 'final' (default: all),"
                                    " so that processes can share a run's checkpoints")
    args = ap.parse_args()
    only = None if args.steps is None else {x.strip() for x in args.steps.split(",")}
    torch.set_num_threads(1)
    pairs = list(buckets.rated_bucket(args.n, "rated-easy", args.seed))
    rows = []
    for ckpt in checkpoints(args.run):
        if only is not None and ckpt.name.removeprefix("step-").lstrip("0") not in only and ckpt.name not in only:
            continue
        model = load_weights(ckpt, device="cpu", dtype=torch.float32)[0].eval()
        row = {"checkpoint": ckpt.name, **{name: probe(model, pairs, t, every, sc) for name, t, every, sc in PROBES}}
        if args.solve:
            score = task.Score()
            engine = dgemma.load(str(ckpt), dtype="float32")
            some = pairs[: args.solve]
            for (p, s), (a, steps) in zip(some, solve_boards(engine, [p for p, _ in some])):
                score.add(p, s, a, steps)
            row["solve"] = score.summary()
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps({"run": str(args.run), "puzzles": "rated-easy", "seed": args.seed, "n": args.n,
                                    "dtype": "float32", "threads": 1, "checkpoints": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
