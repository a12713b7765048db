"""``dgemma bench``: end-to-end speed of the sampler, with the reference and the AR sibling side by side.

A run builds (or loads) a model, draws random prompts, and measures one generation per batch size and
step count through :class:`~dgemma.bench.measure.CallLog`, so every figure is counted from what the model
really did: prefill time, time to the first committed canvas, ms per denoising step (decoder pass plus the
sampler's work), ms per canvas, steps per canvas, tokens per forward pass, useful FLOP/s and its fraction
of the machine's measured matmul rate, and peak memory. The same prompts and knobs then go through
transformers' ``generate`` and through AR decoding on the same weights, and the ratios are printed.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from dgemma import core, loading
from dgemma.bench import flops
from dgemma.bench.baselines import autoregressive, transformers_generate, transformers_model
from dgemma.bench.measure import CallLog, PeakMemory, matmul_rate, memory_rate
from dgemma.bench.presets import preset_config
from dgemma.config import ModelConfig
from dgemma.model.moe import Experts
from dgemma.fileio import atomic_write_text
from dgemma.graphs import GraphedDecoder
from dgemma.params import SamplingParams


@dataclass(frozen=True)
class BenchSpec:
    preset: str | None = "small"  # a name from PRESETS; or
    config: str | None = None  # a config.json path (random weights, built on the device); or
    checkpoint: str | None = None  # a checkpoint directory / Hub id
    device: str = "cpu"
    dtype: str = "float32"
    batch_sizes: tuple[int, ...] = (1,)
    steps: tuple[int, ...] = (16,)
    prompt_len: int = 128
    new_tokens: int = 512
    adaptive: bool = False  # False: fixed step counts (confidence_threshold=0), for comparisons
    transformers: bool = True
    autoregressive: bool = True
    warmup: bool = True
    seed: int = 0
    embed_std: float | None = 1.0  # random weights: peaked, trained-like logits
    batch_search: int = 0  # > 0: also find the largest batch (powers of two up to this) that fits
    moe: str = "auto"  # expert path: "auto" | "loop" | "grouped" (see dgemma.model.moe)
    cuda_graphs: bool | None = None  # also measure dgemma with CUDA-graph decoder steps ("dgemma+graphs");
    # None: on CUDA (what Engine does there by default), off elsewhere


@dataclass
class RunResult:
    engine: str  # "dgemma", "transformers" or "ar"
    batch: int
    steps: int  # the step budget (max_denoising_steps); 0 for AR
    new_tokens: int  # generated tokens, all rows
    wall_s: float
    tokens_per_s: float
    prefill_s: float | None = None
    ttfc_s: float | None = None  # time to the first committed canvas (its tokens are final)
    step_ms: float | None = None  # one denoising iteration: decoder pass + sampler work
    forward_ms: float | None = None  # the decoder pass alone
    floor_ms: float | None = None  # least bytes a decoder pass reads / measured memory bandwidth
    canvas_ms: float | None = None
    commit_ms: float | None = None
    steps_per_canvas: float | None = None  # per row, mean over rows and canvases
    decoder_passes: int | None = None  # batched passes
    tokens_per_forward: float | None = None  # per row: tokens / the row's denoising passes
    gflop: float | None = None
    achieved_gflops: float | None = None
    roofline_fraction: float | None = None  # achieved / the machine's best measured matmul rate
    peak_mem_bytes: int | None = None
    peak_mem_kind: str | None = None


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype `{name}` (try float32 or bfloat16)")
    return value


def build(spec: BenchSpec) -> tuple[torch.nn.Module, str]:
    """The model to measure and a one-line description of where it came from."""
    model, source = _build(spec)
    if spec.moe not in ("auto", "loop", "grouped"):
        raise ValueError(f"moe must be auto, loop or grouped, got {spec.moe!r}")
    for m in model.modules():
        if isinstance(m, Experts):
            m.grouped = {"auto": None, "loop": False, "grouped": True}[spec.moe]
    return model, source if spec.moe == "auto" else f"{source}, MoE path {spec.moe}"


def _build(spec: BenchSpec) -> tuple[torch.nn.Module, str]:
    device, dtype = torch.device(spec.device), _dtype(spec.dtype)
    if spec.checkpoint:
        model, *_ = loading.load_weights(spec.checkpoint, device=device, dtype=dtype)
        return model, f"checkpoint {spec.checkpoint}"
    if spec.config:
        path = Path(spec.config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ValueError(f"no config file at {spec.config}")
        cfg = ModelConfig.from_hf_dict(loading.read_json(path))
        source = f"config {spec.config} (random weights)"
    else:
        cfg = preset_config(spec.preset)
        source = f"preset {spec.preset} (random weights)"
    model = loading.build_model(cfg, device=device, dtype=dtype, seed=spec.seed, embed_std=spec.embed_std)
    return model, source


def sampling_params(spec: BenchSpec, steps: int) -> SamplingParams:
    fixed = {} if spec.adaptive else {"confidence_threshold": 0.0}
    return SamplingParams(max_new_tokens=spec.new_tokens, max_denoising_steps=steps, eos_token_id=(),
                          seed=spec.seed, **fixed)


@torch.inference_mode()
def measure_dgemma(model, prompts: torch.Tensor, params: SamplingParams, fused: bool = True,
                   bandwidth: float | None = None):
    """One generation through the sampler, timed call by call; ``(RunResult, RowResults, CallLog)``."""
    log = CallLog(model)
    canvas_done = []
    with PeakMemory(model.device) as peak:
        t0 = time.perf_counter()
        loop = core.run(log, prompts.tolist(), params, pad_id=0, step_events=False, fused=fused)
        while True:
            try:
                event = next(loop)
            except StopIteration as stop:
                rows = stop.value
                break
            # the first row to finish canvas k (with a fixed step count, every row finishes it in that step)
            if len(canvas_done) <= event.canvas:
                canvas_done.append(time.perf_counter())
        wall = time.perf_counter() - t0
    first_canvas = canvas_done[0] - t0 if canvas_done else None

    # A canvas runs from the end of the previous encoder call (prefill or commit) to its event.
    encodes = [c for c in log.calls if c.kind in ("prefill", "commit")]
    starts = [c.start + c.seconds for c in encodes][: len(canvas_done)]
    canvas_s = [done - start for start, done in zip(starts, canvas_done)]
    decodes, commits = log.of("decode"), log.of("commit")
    new = sum(len(r.token_ids) for r in rows)
    per_row_steps = [s for r in rows for s in r.steps]
    work = sum(c.flops for c in log.calls)
    res = RunResult(
        engine="dgemma", batch=len(rows), steps=params.max_denoising_steps, new_tokens=new, wall_s=wall,
        tokens_per_s=new / wall, prefill_s=log.of("prefill")[0].seconds, ttfc_s=first_canvas,
        step_ms=1000 * sum(canvas_s) / max(1, len(decodes)),
        forward_ms=1000 * sum(c.seconds for c in decodes) / max(1, len(decodes)),
        floor_ms=1000 * sum(c.bytes for c in decodes) / max(1, len(decodes)) / bandwidth if bandwidth else None,
        canvas_ms=1000 * sum(canvas_s) / max(1, len(canvas_s)),
        commit_ms=1000 * sum(c.seconds for c in commits) / len(commits) if commits else None,
        steps_per_canvas=sum(per_row_steps) / max(1, len(per_row_steps)),
        decoder_passes=len(decodes),
        tokens_per_forward=sum(len(r.token_ids) / max(1, sum(r.steps)) for r in rows) / len(rows),
        gflop=work / 1e9, achieved_gflops=work / wall / 1e9,
        peak_mem_bytes=peak.bytes, peak_mem_kind=peak.kind,
    )
    return res, rows, log


def _baseline_result(engine: str, run, batch: int, steps: int, work: float) -> RunResult:
    new = sum(len(t) for t in run.tokens)
    res = RunResult(engine=engine, batch=batch, steps=steps, new_tokens=new, wall_s=run.seconds,
                    tokens_per_s=new / run.seconds, prefill_s=run.prefill_seconds,
                    gflop=work / 1e9, achieved_gflops=work / run.seconds / 1e9)
    if run.forwards:
        res.tokens_per_forward = sum(len(t) / max(f, 1e-9) for t, f in zip(run.tokens, run.forwards)) / batch
    return res


def ar_flops(cfg: ModelConfig, batch: int, prompt_len: int, n_new: int) -> int:
    """Useful work of AR decoding: prefill, one encoder token per step, one LM-head row per step."""
    total = flops.encode_flops(cfg, [0] * batch, [prompt_len] * batch)
    for i in range(n_new):
        total += flops.encode_flops(cfg, [prompt_len + i] * batch, [1] * batch)
    return total + batch * flops.lm_head_flops(cfg, n_new)


def machine_info(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    info = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    else:
        info["name"] = platform.processor() or platform.machine()
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["cores"] = os.cpu_count()
    rates = {str(dt).removeprefix("torch."): matmul_rate(dt, device) / 1e9
             for dt in dict.fromkeys([torch.float32, torch.bfloat16, dtype])}
    info["matmul_gflops"] = rates
    info["memory_gbs"] = memory_rate(device, megabytes=1024 if device.type == "cuda" else 256) / 1e9
    return info


def run_benchmark(spec: BenchSpec, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Every configured measurement; returns the JSON-ready report."""
    model, source = build(spec)
    cfg, device = model.cfg, model.device
    echo(f"model: {source}; {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
         f"{model.dtype}, {device}")
    info = machine_info(device, model.dtype)
    # The roofline is the fastest matmul the machine has: bf16 where the hardware does bf16 (AVX-512 BF16,
    # AMX, GPUs), fp32 where bf16 is emulated (then about 100x slower).
    roof_dtype, bf16_rate = max(info["matmul_gflops"].items(), key=lambda kv: kv[1])
    info["roofline"] = {"dtype": roof_dtype, "gflops": bf16_rate}
    echo(f"machine: {info['name']}, {info['threads']} threads, memory {info['memory_gbs']:.1f} GB/s, "
         "matmul GFLOP/s " + ", ".join(f"{k} {v:.1f}" for k, v in info["matmul_gflops"].items()))
    gen = torch.Generator().manual_seed(spec.seed)
    hf = None
    if spec.transformers:
        try:
            hf = transformers_model(model)
        except ImportError:
            echo("transformers is not installed: the reference comparison is skipped")
    runs: list[RunResult] = []
    with_graphs = spec.cuda_graphs if spec.cuda_graphs is not None else model.device.type == "cuda"
    graphed = GraphedDecoder(model) if with_graphs else None
    if spec.warmup:  # first calls pay for allocator growth and kernel selection
        warm = sampling_params(spec, 2).replace(max_new_tokens=2 * cfg.canvas_length)  # includes a commit
        prompt = torch.randint(3, cfg.vocab_size, (1, spec.prompt_len), generator=gen)
        measure_dgemma(model, prompt, warm)
        if graphed is not None:
            measure_dgemma(graphed, prompt, warm)
            graphed.release()  # its graphs read that run's cache: dead weight for the rows that follow
        if hf is not None:
            transformers_generate(hf, prompt, warm, fixed_steps=True)
    for batch in spec.batch_sizes:
        prompts = torch.randint(3, cfg.vocab_size, (batch, spec.prompt_len), generator=gen)
        for steps in spec.steps:
            params = sampling_params(spec, steps)
            res, _, _ = measure_dgemma(model, prompts, params, bandwidth=info["memory_gbs"] * 1e9)
            res.roofline_fraction = res.achieved_gflops / bf16_rate
            runs.append(res)
            echo(_line(res))
            if graphed is not None:
                g, _, _ = measure_dgemma(graphed, prompts, params, bandwidth=info["memory_gbs"] * 1e9)
                g.engine, g.roofline_fraction = "dgemma+graphs", g.achieved_gflops / bf16_rate
                runs.append(g)
                echo(_line(g) + f" ({graphed.captures} graphs captured, {graphed.replays} replays so far)")
                graphed.release()
            if hf is not None:
                ref = transformers_generate(hf, prompts, params, fixed_steps=not spec.adaptive)
                r = _baseline_result("transformers", ref, batch, steps, res.gflop * 1e9)
                r.roofline_fraction = r.achieved_gflops / bf16_rate
                runs.append(r)
                echo(_line(r))
        if spec.autoregressive:
            ar = autoregressive(model, prompts, spec.new_tokens)
            r = _baseline_result("ar", ar, batch, 0, ar_flops(cfg, batch, spec.prompt_len, spec.new_tokens))
            r.roofline_fraction = r.achieved_gflops / bf16_rate
            runs.append(r)
            echo(_line(r))
    if spec.batch_search:
        report_batch = largest_batch(model, spec.prompt_len, limit=spec.batch_search, seed=spec.seed)
        echo(f"largest batch that fits: {report_batch['largest_batch']} (searched up to {spec.batch_search})")
    else:
        report_batch = None
    report = {"spec": asdict(spec), "model": source, "machine": info, "batch_search": report_batch,
              "parameters": sum(p.numel() for p in model.parameters()), "runs": [asdict(r) for r in runs],
              "ratios": ratios(runs), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    return report


def largest_batch(model, prompt_len: int, limit: int = 4096, seed: int = 0) -> dict[str, Any]:
    """The largest power-of-two batch whose prefill plus one 2-step canvas fits in device memory.

    Stops at ``limit`` (CPU memory is not a hard wall, so on a CPU the limit is what ends the search).
    """
    gen = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_new_tokens=model.cfg.canvas_length, max_denoising_steps=2,
                            confidence_threshold=0.0, eos_token_id=(), seed=seed)
    best, peak, batch = 0, 0, 1
    while batch <= limit:
        prompts = torch.randint(3, model.cfg.vocab_size, (batch, prompt_len), generator=gen)
        try:
            res, _, _ = measure_dgemma(model, prompts, params)
        except torch.OutOfMemoryError:
            break
        finally:
            if model.device.type == "cuda":
                torch.cuda.empty_cache()
        best, peak, batch = batch, res.peak_mem_bytes, batch * 2
    return {"largest_batch": best, "peak_mem_bytes": peak, "limit": limit, "prompt_len": prompt_len}


def ratios(runs: list[RunResult]) -> list[dict[str, Any]]:
    """dgemma's tokens/s over each baseline's, per (batch, steps); and over dgemma at batch 1."""
    out = []
    by_key = {(r.engine, r.batch, r.steps): r for r in runs}
    for r in runs:
        if r.engine != "dgemma":
            continue
        row: dict[str, Any] = {"batch": r.batch, "steps": r.steps}
        ref = by_key.get(("transformers", r.batch, r.steps))
        ar = by_key.get(("ar", r.batch, 0))
        one = by_key.get(("dgemma", 1, r.steps))
        graphs = by_key.get(("dgemma+graphs", r.batch, r.steps))
        if ref:
            row["vs_transformers"] = r.tokens_per_s / ref.tokens_per_s
        if ar:
            row["vs_ar"] = r.tokens_per_s / ar.tokens_per_s
        if graphs:
            row["graphs_vs_eager"] = graphs.tokens_per_s / r.tokens_per_s
            if ref:
                row["graphs_vs_transformers"] = graphs.tokens_per_s / ref.tokens_per_s
        if one and r.batch != 1:
            row["vs_batch1"] = r.tokens_per_s / one.tokens_per_s
        out.append(row)
    return out


def _line(r: RunResult) -> str:
    parts = [f"{r.engine:<12} batch {r.batch:<3} steps {r.steps:<3} {r.tokens_per_s:8.1f} tok/s"]
    if r.step_ms is not None:
        parts.append(f"{r.step_ms:7.1f} ms/step")
    if r.ttfc_s is not None:
        parts.append(f"first canvas {r.ttfc_s:6.2f} s")
    if r.roofline_fraction is not None:
        parts.append(f"{r.achieved_gflops:6.1f} GFLOP/s")
    return "  ".join(parts)


COLUMNS = [("engine", "{}"), ("batch", "{}"), ("steps", "{}"), ("tokens_per_s", "{:.1f}"), ("ttfc_s", "{:.2f}"),
           ("prefill_s", "{:.3f}"), ("step_ms", "{:.1f}"), ("forward_ms", "{:.1f}"), ("floor_ms", "{:.1f}"), ("canvas_ms", "{:.0f}"),
           ("steps_per_canvas", "{:.1f}"), ("tokens_per_forward", "{:.2f}"), ("achieved_gflops", "{:.1f}"),
           ("roofline_fraction", "{:.2f}"), ("peak_mem_bytes", "{}")]


def format_table(report: dict[str, Any]) -> str:
    """A markdown table of the runs, then the ratios."""
    head = [name for name, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in report["runs"]:
        cells = []
        for name, fmt in COLUMNS:
            value = run.get(name)
            if name == "peak_mem_bytes" and value is not None:
                cells.append(f"{value / 2**20:.0f} MiB")
            else:
                cells.append("-" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    for r in report["ratios"]:
        bits = [f"{k.removeprefix('vs_').replace('_', ' ')} x{v:.2f}" for k, v in r.items() if "vs_" in k]
        if bits:
            lines.append(f"\ndgemma batch {r['batch']} steps {r['steps']}: " + ", ".join(bits))
    return "\n".join(lines)


def write_report(report: dict[str, Any], path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    return path
