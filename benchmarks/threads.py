"""Wall time against the CPU thread count, for the default thread choice of the commands (cli/options.py).

Two workloads, each in a fresh process per measurement (thread counts alternate, so a noisy machine
affects them alike): one ``sudoku solve`` of the README's puzzle with the embedded 2.15M-parameter model
(mean of 3 after a warm-up; model loading excluded), and one canvas of the ``small`` preset (random
weights, fp32: a 64-token prompt and 4 denoising steps, after a warm-up). ``--busy`` keeps one core busy
with a spinning process meanwhile, as another program would.

    python benchmarks/threads.py                      # threads 1 and 2, twice each
    python benchmarks/threads.py --busy --no-small    # with a busy core, the Sudoku solve only
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

PUZZLE = "300281450150030060280000003070012046043967502601058739000090000015000620000005970"

_SOLVE = f"""
import time, dgemma
from dgemma.sudoku.solve import SOLVE_DEFAULTS
e = dgemma.load()
e.generate("{PUZZLE}", **SOLVE_DEFAULTS)
t = time.perf_counter()
for _ in range(3):
    e.generate("{PUZZLE}", **SOLVE_DEFAULTS)
print((time.perf_counter() - t) / 3)
"""

_SMALL = """
import time, torch
from dgemma import loading
from dgemma.bench.harness import measure_dgemma
from dgemma.bench.presets import preset_config
from dgemma.params import SamplingParams
cfg = preset_config("small")
m = loading.build_model(cfg, device=torch.device("cpu"), dtype=torch.float32, seed=0)
prompt = torch.randint(3, cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
p = SamplingParams(max_new_tokens=cfg.canvas_length, max_denoising_steps=4, eos_token_id=(), seed=0,
                   confidence_threshold=0.0)
measure_dgemma(m, prompt, p)
t = time.perf_counter()
measure_dgemma(m, prompt, p)
print(time.perf_counter() - t)
"""


def _seconds(code: str, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--busy", action="store_true", help="keep one core busy with a spinning process meanwhile")
    ap.add_argument("--no-small", dest="small", action="store_false", help="skip the small preset")
    args = ap.parse_args()
    burner = subprocess.Popen([sys.executable, "-c", "while 1: pass"]) if args.busy else None
    try:
        time.sleep(1 if burner else 0)
        workloads = [("sudoku solve, 1 puzzle", _SOLVE)] + ([("small preset, 1 canvas", _SMALL)] if args.small else [])
        for name, code in workloads:
            for _ in range(args.repeats):
                for n in args.threads:
                    load = os.getloadavg()[0]
                    print(f"{name:24s} threads {n}  {_seconds(code, n):8.3f} s  (load average {load:.1f})", flush=True)
    finally:
        if burner:
            burner.kill()


if __name__ == "__main__":
    main()
