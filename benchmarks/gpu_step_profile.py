"""Where a whole canvas of generation spends its time with CUDA graphs on.

Builds the random bf16 26B-A4B model on the GPU, runs the Engine (graphs on, the CUDA default) over a
4096-token prompt for one 256-token canvas at 16 fixed steps: once to warm up, once timed, once under
torch.profiler. Prints the canvas's wall time, the GPU's kernel time in it, and the top host-side and
GPU-side operations: what a step spends outside the replayed decoder pass. Also times two canvases eagerly,
with a graph per canvas and with one graph reused by both (``GraphedDecoder(reuse=True)``).

    python benchmarks/gpu_step_profile.py
    python benchmarks/gpu_step_profile.py --preset tiny --device cpu --prompt-len 64   # a dry run
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

from dgemma.engine import Engine
from dgemma.graphs import GraphedDecoder
from gpu_profile import random_model  # the same command line and model (benchmarks/ is on the path)


def main() -> None:
    args, model = random_model(__doc__.splitlines()[0])
    cfg, cuda = model.cfg, model.device.type == "cuda"
    engine = Engine(model)
    prompt = torch.randint(3, cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=cfg.canvas_length, eos_token_id=(), seed=1, confidence_threshold=0.0,
              max_denoising_steps=16)

    def canvas() -> float:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        engine.generate([prompt.tolist()], **kw)
        if cuda:
            torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - t)

    canvas()
    print(f"prefill + one canvas of 16 steps: {canvas():.1f} ms wall (graphs: {type(engine.runner).__name__})")
    # Two canvases (one commit between them) for eager, a graph per canvas, and one graph reused by both.
    kw["max_new_tokens"] = 2 * cfg.canvas_length
    default = engine.runner
    for name, runner in (("eager", model), ("a graph per canvas", GraphedDecoder(model)),
                         ("one graph reused", GraphedDecoder(model, reuse=True))):
        engine.runner = runner
        times = [canvas() for _ in range(3)]
        print(f"prefill + two canvases, {name}: {min(times):.1f} ms (of {', '.join(f'{t:.0f}' for t in times)})")
    engine.runner, kw["max_new_tokens"] = default, cfg.canvas_length
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        wall = canvas()
    events = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in events) / 1000
    print(f"profiled: {wall:.1f} ms wall, {gpu:.1f} ms of GPU kernels")
    runner = engine.runner
    print(f"graphs: captures {getattr(runner, 'captures', 0)}, replays {getattr(runner, 'replays', 0)}, "
          f"disabled: {getattr(runner, 'disabled', None)}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    if cuda:
        print(events.table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=60))


if __name__ == "__main__":
    main()
