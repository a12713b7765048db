"""Where one decoder pass of the 26B-A4B config spends its time on a GPU.

Builds the random bf16 model on the GPU, prefills a 4096-token prompt, then:
1. times one decoder pass (256-token canvas) with CUDA events, eagerly, and with self-conditioning input
   eagerly and replayed from a CUDA graph (``GraphedDecoder``);
2. profiles one pass with torch.profiler: GPU kernel time in total and by kernel, against the wall time
   (a wall time far above the kernel time means the pass is bound by launching kernels);
3. times the experts of one layer three ways: the per-expert loop, grouped_mm, and a padded batched
   matmul (each expert's rows padded to the largest count) to see which streams the weights best.

    python benchmarks/gpu_profile.py            # prints tables; nothing is written
    python benchmarks/gpu_profile.py --preset tiny --device cpu --prompt-len 64   # a dry run of the code
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from dgemma import loading
from dgemma.bench.measure import mean_ms
from dgemma.bench.presets import preset_config
from dgemma.cache import KVCache
from dgemma.graphs import GraphedDecoder
from dgemma.model.moe import Experts


def padded_experts(ex: Experts, x, weights, idx):
    """Experts through two batched matmuls over ``[E, C, d]`` (C = the most rows any expert got)."""
    n, k = idx.shape
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=ex.num_experts)
    cap = int(counts.max())  # one host sync
    starts = torch.cumsum(counts, 0) - counts
    sorted_e = flat[order]
    slot = torch.arange(n * k, device=x.device) - starts[sorted_e]  # row within its expert
    buf = x.new_zeros(ex.num_experts, cap, x.shape[1])
    buf[sorted_e, slot] = x[order // k]
    h = torch.bmm(buf, ex.gate_up_proj.transpose(1, 2))  # [E, C, 2I]
    gate, up = h.chunk(2, dim=-1)
    y = torch.bmm(F.gelu(gate, approximate="tanh") * up, ex.down_proj.transpose(1, 2))  # [E, C, d]
    ys = y[sorted_e, slot] * weights.reshape(-1)[order, None].to(y.dtype)
    return torch.zeros_like(x).index_add_(0, order // k, ys)


def random_model(description: str):
    """``(args, model)``: the command line of the GPU scripts and the random bf16 model it names."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--preset", default="26b-a4b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompt-len", type=int, default=4096)
    args = ap.parse_args()
    cfg = preset_config(args.preset)
    return args, loading.build_model(cfg, device=args.device, dtype=torch.bfloat16, seed=0, embed_std=1.0)


@torch.inference_mode()
def main() -> None:
    args, model = random_model(__doc__.splitlines()[0])
    cfg, dev, n = model.cfg, model.device, args.prompt_len
    if dev.type == "cuda":
        print(torch.cuda.get_device_name(), torch.__version__, f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB")
    cache = KVCache(cfg, 1, n + cfg.canvas_length, device=dev, dtype=torch.bfloat16)
    model.encode(torch.randint(3, cfg.vocab_size, (1, n), device=dev), cache)
    canvas = torch.randint(3, cfg.vocab_size, (1, cfg.canvas_length), device=dev)

    print(f"decoder pass (hidden states), eager: {mean_ms(lambda: model.decode_hidden(canvas, cache)):.2f} ms")
    soft = torch.randn(1, cfg.canvas_length, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
    graphed = GraphedDecoder(model)
    eager_ms = mean_ms(lambda: model.decode_hidden(canvas, cache, soft))
    graphed_ms = mean_ms(lambda: graphed.decode_hidden(canvas, cache, soft))
    print(f"decoder pass with self-conditioning: eager {eager_ms:.2f} ms, CUDA graph {graphed_ms:.2f} ms "
          f"(captures {graphed.captures}, replays {graphed.replays}, disabled: {graphed.disabled})")
    from torch.profiler import ProfilerActivity, profile

    cuda = dev.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        model.decode_hidden(canvas, cache)
        if cuda:
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.self_device_time_total for e in events) / 1000
    print(f"profiled pass: GPU kernel time {total:.2f} ms, kernels launched "
          f"{sum(e.count for e in events if e.self_device_time_total > 0)}")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))

    ex = next(m for m in model.modules() if isinstance(m, Experts))
    x = torch.randn(cfg.canvas_length, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
    idx = torch.stack([torch.randperm(cfg.num_experts, device=dev)[: cfg.top_k_experts]
                       for _ in range(cfg.canvas_length)])
    w = torch.rand(cfg.canvas_length, cfg.top_k_experts, device=dev).softmax(-1)
    ex.grouped = True
    ref = ex(x, w, idx).float()
    pad = padded_experts(ex, x, w, idx).float()
    print("padded vs grouped, relative error:", ((pad - ref).norm() / ref.norm()).item())
    weight_bytes = (ex.gate_up_proj.numel() + ex.down_proj.numel()) * 2
    for name, fn in (("loop", None), ("grouped_mm", None), ("padded bmm", padded_experts)):
        if fn is None:
            ex.grouped = name == "grouped_mm"
            ms = mean_ms(lambda: ex(x, w, idx))
        else:
            ms = mean_ms(lambda: fn(ex, x, w, idx))
        print(f"experts of one layer, {name}: {ms:.3f} ms, {weight_bytes / ms / 1e9:.2f} TB/s of weights")


if __name__ == "__main__":
    main()
