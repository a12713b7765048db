"""One puzzle at a time, side by side: the solve defaults with 1, 2, ... attempts per decoder pass.

Each puzzle is solved once with every ``parallel_attempts`` value in turn (the order rotates from puzzle to
puzzle, so drift in the machine's speed falls on every value alike); everything else is the solve
defaults. Per value: the median, 90th percentile and mean wall time per puzzle, the median and mean decoder
passes per puzzle, milliseconds per pass, and the share solved exactly.

    python benchmarks/sudoku_parallel_attempts.py OUT.json [--bucket medium] [--n 100] [--values 1 2 3] \
        [--seed 1000003] [--threads 1] [--model DIR]

The default puzzles are those of ``dgemma sudoku eval --buckets medium -n 100`` (the evaluation seed).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time

import torch

import dgemma
from dgemma.sudoku.cli import bucket_pairs
from dgemma.sudoku.parsers import EVAL_SEED
from dgemma.sudoku.solve import solve_boards


def cpu_name() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summary(rows: list[dict]) -> dict:
    times = sorted(r["seconds"] for r in rows)
    passes = [r["passes"] for r in rows]
    return {"puzzles": len(rows), "median_ms": 1000 * statistics.median(times),
            "p90_ms": 1000 * times[math.ceil(0.9 * len(times)) - 1], "mean_ms": 1000 * statistics.mean(times),
            "median_passes": statistics.median(passes), "mean_passes": statistics.mean(passes),
            "ms_per_pass": 1000 * sum(times) / sum(passes), "exact": sum(r["exact"] for r in rows) / len(rows)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--bucket", default="medium")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--values", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--seed", type=int, default=EVAL_SEED, help="puzzle seed, as `sudoku eval --seed`")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default=None, help="default: the embedded model")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = dgemma.load(args.model)
    pairs = bucket_pairs(args.bucket, args.n, args.seed)
    solve_boards(engine, [pairs[0][0]], 1)  # warm-up, not counted
    rows: dict[int, list[dict]] = {v: [] for v in args.values}
    for i, (puzzle, solution) in enumerate(pairs):
        k = i % len(args.values)
        for v in args.values[k:] + args.values[:k]:
            t0 = time.perf_counter()
            (answer, passes), = solve_boards(engine, [puzzle], 1, parallel_attempts=v)
            rows[v].append({"seconds": time.perf_counter() - t0, "passes": passes, "exact": answer == solution})
        print(f"{i + 1}/{len(pairs)}", file=sys.stderr, flush=True)
    result = {"what": __doc__.split("\n")[0], "command": " ".join(["python"] + sys.argv),
              "machine": {"cpu": cpu_name(), "capability": torch.backends.cpu.get_cpu_capability(),
                          "torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
                          "dtype": str(next(engine.model.parameters()).dtype)},
              "bucket": args.bucket, "seed": args.seed,
              "values": {str(v): summary(r) for v, r in rows.items()},
              "per_puzzle": {str(v): r for v, r in rows.items()}}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for v, s in result["values"].items():
        print(f"parallel_attempts {v}: median {s['median_ms']:.0f} ms, p90 {s['p90_ms']:.0f} ms, mean "
              f"{s['mean_ms']:.0f} ms, passes median {s['median_passes']:g} mean {s['mean_passes']:.1f}, "
              f"{s['ms_per_pass']:.1f} ms/pass, exact {s['exact']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
