"""The restart study behind the Sudoku solve defaults (7 restarts below a mean entropy of 1e-12).

Denoises every validation puzzle with the spec sampler (the solve defaults with no restarts) once per
sampling seed 0..A-1: A independent attempts per board. For each attempt it records the steps, whether it
settled (met the stopping rule: the argmax canvas unchanged for ``stability_threshold`` steps and the mean
entropy below ``confidence_threshold``), the final mean entropy per cell and whether the answer is right.
Then it simulates restart policies on those attempts, for 0..A-1 restarts:

* ``first_settled_else_last``: the first attempt that settles, else the last (no entropy bar);
* ``below_H``: the first attempt that settles below H, else the most confident (settled first, then the
  lowest entropy), which is the sampler's rule (``settled`` is the rule with no bar);
* ``oracle``: right when any attempt so far is right.

The puzzles are ``task.puzzles(n, bucket's clue range, SEED)`` with one SEED for both buckets, as when the
study was run (``sudoku eval`` now gives each bucket its own seed). Writes one JSON file:

    python benchmarks/sudoku_restart_study.py OUT.json [--n 200] [--attempts 8] [--seed 4242] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch

import dgemma
from dgemma import core
from dgemma.embedded import default_model
from dgemma.fileio import atomic_write_text
from dgemma.sudoku import board as sb
from dgemma.sudoku import task
from dgemma.sudoku.solve import SOLVE_DEFAULTS

THRESHOLDS = (None, 1e-6, 1e-9, 1e-12, 1e-15)


def attempts(engine, pairs, seed: int, batch: int) -> list[dict]:
    """One spec-sampler attempt per board, with sampling seed ``seed`` (each row of a batch = its solo run)."""
    params = engine.params(**{**SOLVE_DEFAULTS, "restarts": 0, "restart_entropy": None, "seed": seed})
    k = params.stability_threshold
    out = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i: i + batch]
        ids = [engine.encode_prompt(sb.format_board(p)) for p, _ in chunk]
        drafts, entropy, steps, tokens = [[] for _ in chunk], [0.0] * len(chunk), [0] * len(chunk), {}
        with torch.inference_mode():
            for ev in core.run(engine.runner, ids, params, pad_id=engine.config.pad_token_id or 0):
                if isinstance(ev, core.StepEvent):
                    drafts[ev.request_id] = (drafts[ev.request_id] + [ev.draft])[-(k + 1):]
                    entropy[ev.request_id], steps[ev.request_id] = ev.mean_entropy, ev.step
                else:
                    tokens[ev.request_id] = ev.tokens  # the canvas as committed: cut at the first EOS
        for r, (p, s) in enumerate(chunk):
            answer = task.answer_board(engine.decode(tokens[r]))
            stable = len(drafts[r]) == k + 1 and all(d == drafts[r][-1] for d in drafts[r])
            settled = stable and entropy[r] < params.confidence_threshold
            assert settled or steps[r] == params.max_denoising_steps, "a row stopped early without settling"
            out.append({"steps": steps[r], "settled": settled,
                        "entropy": entropy[r], "right": answer == s,
                        "wrong_cells": sum(a != b for a, b in zip(answer, s))})
    return out


def pick(tries: list[dict], rule: str, bar: float | None) -> tuple[int, int]:
    """The attempt a policy keeps among ``tries`` (in order) and how many it ran."""
    if rule == "first_settled_else_last":
        first = next((i for i, t in enumerate(tries) if t["settled"]), None)
        return (len(tries) - 1, len(tries)) if first is None else (first, first + 1)
    best = 0
    for i, t in enumerate(tries):
        if (not t["settled"], t["entropy"]) < (not tries[best]["settled"], tries[best]["entropy"]):
            best = i
        if t["settled"] and (bar is None or t["entropy"] < bar):
            return i, i + 1
    return best, len(tries)


def simulate(boards: list[list[dict]]) -> dict:
    """Exact fraction and mean steps (all attempts run) per policy and restart count."""
    policies = {"first_settled_else_last": ("first_settled_else_last", None)}
    policies.update({f"below_{h:g}" if h else "settled": ("bar", h) for h in THRESHOLDS})
    out = {}
    for name, (rule, bar) in policies.items():
        out[name] = {}
        for restarts in range(len(boards[0])):
            picked = [pick(b[: restarts + 1], rule, bar) for b in boards]
            out[name][restarts] = {
                "exact": sum(b[i]["right"] for b, (i, _) in zip(boards, picked)) / len(boards),
                "mean_steps": sum(sum(t["steps"] for t in b[:ran]) for b, (_, ran) in zip(boards, picked)) / len(boards)}
    out["oracle"] = {r: sum(any(t["right"] for t in b[: r + 1]) for b in boards) / len(boards)
                     for r in range(len(boards[0]))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="JSON file to write")
    ap.add_argument("--n", type=int, default=200, help="validation puzzles per bucket (default 200)")
    ap.add_argument("--buckets", default="unsloth,medium", help="default unsloth,medium")
    ap.add_argument("--attempts", type=int, default=8, help="independent attempts per board, seeds 0..A-1 (default 8)")
    ap.add_argument("--seed", type=int, default=4242, help="puzzle seed, shared by the buckets (default 4242)")
    ap.add_argument("--batch", type=int, default=32, help="puzzles decoded together (default 32)")
    ap.add_argument("--model", help="checkpoint (default: the embedded Sudoku model)")
    args = ap.parse_args()
    engine = dgemma.load(args.model or default_model())
    cap = SOLVE_DEFAULTS["max_denoising_steps"]
    report = {"command": vars(args) | {"out": str(args.out)}, "buckets": {}}
    every = []
    for bucket in args.buckets.split(","):
        pairs = list(task.puzzles(args.n, sb.BUCKETS[bucket], args.seed, workers=os.cpu_count() or 1))
        runs = [attempts(engine, pairs, seed, args.batch) for seed in range(args.attempts)]
        boards = [[run[j] for run in runs] for j in range(len(pairs))]  # per board, its attempts in seed order
        every += [t for b in boards for t in b]
        failed = [b[0] for b in boards if not b[0]["right"]]
        report["buckets"][bucket] = {
            "puzzles": len(pairs), "spec_sampler_exact": (len(pairs) - len(failed)) / len(pairs),
            "failed": len(failed), "failed_at_step_cap": sum(t["steps"] == cap for t in failed),
            "failed_unsettled": sum(not t["settled"] for t in failed),
            "failed_10_or_more_wrong_cells": sum(t["wrong_cells"] >= 10 for t in failed),
            "simulated": simulate(boards), "attempts": boards}
        row, sim = report["buckets"][bucket], report["buckets"][bucket]["simulated"]
        print(f"{bucket}: spec sampler {row['spec_sampler_exact']:.1%} exact; of {row['failed']} failed boards "
              f"{row['failed_at_step_cap']} ran to the step cap, {row['failed_10_or_more_wrong_cells']} had 10+ wrong cells")
        for r in range(args.attempts):
            print(f"  {r} restarts: first settled else last {sim['first_settled_else_last'][r]['exact']:.1%}, "
                  f"below 1e-12 else most confident {sim['below_1e-12'][r]['exact']:.1%}, oracle {sim['oracle'][r]:.1%}")
    settled = [t for t in every if t["settled"]]
    report["all_attempts"] = {
        "attempts": len(every), "settled": len(settled),
        "settled_below": {f"{h:g}": {"attempts": sum(t["entropy"] < h for t in settled),
                                     "right": sum(t["entropy"] < h and t["right"] for t in settled)}
                          for h in THRESHOLDS if h},
        "median_final_entropy": {"right": statistics.median([t["entropy"] for t in every if t["right"]] or [0]),
                                 "wrong": statistics.median([t["entropy"] for t in every if not t["right"]] or [0])}}
    print(json.dumps(report["all_attempts"]))
    atomic_write_text(args.out, json.dumps(report) + "\n")  # compact: it holds every attempt


if __name__ == "__main__":
    main()
