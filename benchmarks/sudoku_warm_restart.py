"""Warm restarts against fresh ones: does a restart do better from the last attempt's draft than from noise?

The solve defaults restart a board that does not settle from fresh noise. Here a restart may instead start
from the previous attempt's last draft with part of it re-noised, through the canvas-constraint hook
(``CanvasConstraint.start`` returns the starting canvas; ``update`` records each draft), so the engine and
sampler are untouched. Modes, each ``MODE:KEEP:RESTARTS``:

* ``fresh:0:R``: the solve defaults with ``R`` restarts (KEEP unused);
* ``random:K:R``: each restart keeps every cell of the last draft with probability ``K``, the rest uniform noise;
* ``conflict:K:R``: as ``random``, and also re-noises every cell whose digit repeats in its row, column or box.

    python benchmarks/sudoku_warm_restart.py OUT.json [--bucket hard] [--n 64] [--seed 4242] \
        [--modes fresh:0:7 random:0.5:7 conflict:0.7:7]

Validation puzzles (seed 4242, never the evaluation seed), the embedded model, fp32, one thread.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import dgemma
from dgemma.constraints import CanvasConstraint, CanvasRule
from dgemma.sudoku import board as sb
from dgemma.sudoku import task
from dgemma.sudoku.cli import bucket_pairs
from dgemma.sudoku.rating import UNITS
from dgemma.sudoku.solve import SOLVE_DEFAULTS


def conflicts(digits: list[int]) -> set[int]:
    """Cells (0-80) that are blank or whose digit repeats in one of their units."""
    bad = set()
    for unit in UNITS:
        seen: dict[int, list[int]] = {}
        for i in unit:
            seen.setdefault(digits[i], []).append(i)
        bad.update(i for d, cells in seen.items() if d == 0 or len(cells) > 1 for i in cells)
    return bad


class WarmRestart(CanvasConstraint):
    """Restart ``k`` > 0 starts from the last draft, re-noised as the mode says; attempt 0 from noise."""

    def __init__(self, mode: str, keep: float, seed: int, vocab: int, digit_of: dict[int, int]):
        self.mode, self.keep, self.vocab, self.digit_of = mode, keep, vocab, digit_of
        self.gen = torch.Generator().manual_seed(seed)
        self.last: torch.Tensor | None = None  # [C] the latest draft

    def update(self, canvas, attempt, step, draft):
        self.last = draft.clone()
        return None

    def start(self, canvas, attempt):
        if attempt == 0 or self.last is None:
            return None
        c = self.last.shape[0]
        renoise = torch.rand(c, generator=self.gen) >= self.keep  # [C]
        if self.mode == "conflict":
            for i in conflicts([self.digit_of.get(int(t), 0) for t in self.last[:81]]):
                renoise[i] = True
        noise = torch.randint(0, self.vocab, (c,), generator=self.gen)
        return CanvasRule(initial=torch.where(renoise, noise, self.last))


def solve(engine, boards, mode: str, keep: float, restarts: int, batch: int = 32):
    digit_of = {t: d for d, t in enumerate(engine.tokenizer.encode("0123456789"))}
    out = []
    for i in range(0, len(boards), batch):
        chunk = boards[i: i + batch]
        cons = None if mode == "fresh" else [
            WarmRestart(mode, keep, 1000 + i + j, engine.config.vocab_size, digit_of) for j in range(len(chunk))]
        for c in engine.generate([sb.format_board(b) for b in chunk], constraint=cons,
                                 **{**SOLVE_DEFAULTS, "restarts": restarts, "parallel_attempts": 1}):
            out.append((task.answer_board(c.text), sum(c.steps)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--bucket", default="hard")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--modes", nargs="+", default=["fresh:0:7", "random:0.5:7", "conflict:0.7:7"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    engine = dgemma.load(None, dtype="float32")
    pairs = bucket_pairs(args.bucket, args.n, args.seed)
    rows = {}
    for spec in args.modes:
        mode, keep, restarts = spec.split(":")
        t0 = time.perf_counter()
        answers = solve(engine, [p for p, _ in pairs], mode, float(keep), int(restarts))
        score = task.Score()
        for (p, s), (a, steps) in zip(pairs, answers):
            score.add(p, s, a, steps)
        rows[spec] = {**score.summary(), "seconds": round(time.perf_counter() - t0, 1)}
        print(spec, rows[spec], flush=True)
    with open(args.out, "w") as f:
        json.dump({"command": vars(args), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
