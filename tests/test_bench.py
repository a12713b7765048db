"""Benchmark harness: its accounting equals what the sampler and the model really did."""

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dgemma import loading
from dgemma.__main__ import main
from dgemma.bench import BenchSpec, flops, format_table, measure_dgemma, plot_reports, preset_config, run_benchmark
from dgemma.bench.baselines import autoregressive, transformers_generate, transformers_model
from dgemma.bench.measure import PeakMemory, matmul_rate
from dgemma.cache import KVCache
from dgemma.engine import Engine
from dgemma.params import SamplingParams


@pytest.fixture(scope="module")
def model():
    return loading.build_model(preset_config("tiny"), seed=0, embed_std=1.0)


def _prompts(model, batch, length=7, seed=0):
    return torch.randint(3, model.cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_fixed_step_accounting(model):
    c = model.cfg.canvas_length
    params = SamplingParams(max_new_tokens=2 * c + 8, max_denoising_steps=3, confidence_threshold=0.0,
                            eos_token_id=(), seed=1)
    res, rows, log = measure_dgemma(model, _prompts(model, 2), params)
    assert [c_.kind for c_ in log.calls] == ["prefill"] + (["decode"] * 3 + ["commit"]) * 2 + ["decode"] * 3
    assert res.decoder_passes == 9 and res.steps_per_canvas == 3.0
    assert res.new_tokens == 2 * (2 * c + 8)
    assert res.tokens_per_forward == pytest.approx((2 * c + 8) / 9)
    assert res.gflop * 1e9 == pytest.approx(sum(x.flops for x in log.calls))
    assert res.ttfc_s < res.wall_s and res.prefill_s < res.ttfc_s
    assert res.peak_mem_bytes > 0
    # The instrument does not change the result: the engine gives the same tokens for the same seed.
    engine = Engine(model)
    plain = engine.generate(_prompts(model, 2).tolist(), params)
    assert [r.token_ids for r in rows] == [p.token_ids for p in plain]


def test_adaptive_accounting_counts_rows_and_passes_separately(model):
    params = SamplingParams(max_new_tokens=3 * model.cfg.canvas_length, max_denoising_steps=12,
                            confidence_threshold=0.2, stability_threshold=0, t_max=0.8, t_min=0.05,
                            eos_token_id=(), seed=4)
    res, rows, log = measure_dgemma(model, _prompts(model, 3, seed=2), params)
    steps = [r.steps for r in rows]
    assert len({tuple(s) for s in steps}) > 1, "rows should stop at different steps for this check to bite"
    # One batched pass per engine step; a row that finishes a canvas commits it and denoises the next one in
    # the following step without waiting for the other rows, so the passes are the longest row's steps
    # (fewer than when each canvas waited for the slowest row).
    assert res.decoder_passes == len(log.of("decode")) == max(sum(s) for s in steps)
    assert res.decoder_passes < sum(max(col) for col in zip(*steps))
    assert res.steps_per_canvas == pytest.approx(sum(map(sum, steps)) / sum(map(len, steps)))
    assert res.tokens_per_forward == pytest.approx(sum(len(r.token_ids) / sum(r.steps) for r in rows) / 3)


@torch.inference_mode()
def test_decode_flops_match_torch_flop_counter(model):
    cfg = model.cfg
    cache = KVCache(cfg, 2, 64)
    model.encode(_prompts(model, 2, length=5), cache)  # 5 < window - 1: every cached key is visible
    canvas = torch.randint(0, cfg.vocab_size, (2, cfg.canvas_length))
    sc = torch.randn(2, cfg.canvas_length, cfg.vocab_size)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):  # the CPU flash kernel is not counted; its math twin is
        model.decode(canvas, cache, sc)
    assert counter.get_total_flops() == flops.decode_flops(cfg, [5, 5], self_conditioning=True)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):  # one token: the causal triangle is the whole rectangle
        model.encode(_prompts(model, 1, length=1), KVCache(cfg, 1, 8))
    assert counter.get_total_flops() == flops.encode_flops(cfg, [0], [1])


@torch.inference_mode()
def test_transformers_baseline_shares_the_weights(model):
    hf = transformers_model(model)
    ours = model.embed_tokens.weight
    assert hf.model.decoder.embed_tokens.weight.data_ptr() == ours.data_ptr()
    prompt = _prompts(model, 1)
    canvas = torch.randint(0, model.cfg.vocab_size, (1, model.cfg.canvas_length))
    cache = KVCache(model.cfg, 1, 64)
    model.encode(prompt, cache)
    ref = hf(input_ids=prompt, decoder_input_ids=canvas).logits
    # relative to the largest logit: fp32 rounding follows the CPU's kernel order (see test_reference.py)
    torch.testing.assert_close(model.decode(canvas, cache), ref, rtol=0, atol=2e-5 * float(ref.abs().max()))
    params = SamplingParams(max_new_tokens=40, max_denoising_steps=4, confidence_threshold=0.0, eos_token_id=())
    run = transformers_generate(hf, _prompts(model, 2), params, fixed_steps=True)
    assert [len(t) for t in run.tokens] == [40, 40]
    assert run.forwards == [12, 12]  # 3 canvases x 4 fixed steps


@torch.inference_mode()
def test_autoregressive_baseline_is_greedy_decoding(model):
    prompt = _prompts(model, 1)
    run = autoregressive(model, prompt, 4)
    ids = prompt
    for _ in range(4):  # recompute from scratch each time: no cache reuse
        h = model.encode(ids, KVCache(model.cfg, 1, 32))
        ids = torch.cat([ids, model.logits(h[:, -1:]).argmax(-1)], dim=1)
    assert run.tokens == [ids[0, 7:].tolist()]


def test_instruments():
    assert matmul_rate(torch.float32, torch.device("cpu"), budget_s=0.05) > 1e8
    with PeakMemory("cpu") as peak:
        x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB touched
        x += 1
    assert peak.bytes >= 64 << 20


def test_run_benchmark_report_table_and_plot(tmp_path):
    spec = BenchSpec(preset="tiny", batch_sizes=(1, 2), steps=(2, 3), prompt_len=6, new_tokens=20, batch_search=4)
    lines = []
    report = run_benchmark(spec, echo=lines.append)
    engines = [(r["engine"], r["batch"], r["steps"]) for r in report["runs"]]
    assert engines == [("dgemma", 1, 2), ("transformers", 1, 2), ("dgemma", 1, 3), ("transformers", 1, 3),
                       ("ar", 1, 0), ("dgemma", 2, 2), ("transformers", 2, 2), ("dgemma", 2, 3),
                       ("transformers", 2, 3), ("ar", 2, 0)]
    for run in report["runs"]:
        assert run["new_tokens"] == 20 * run["batch"] and run["tokens_per_s"] > 0
        if run["engine"] == "dgemma":
            assert run["steps_per_canvas"] == run["steps"]
            assert 0 < run["floor_ms"] < run["forward_ms"]
    assert {"vs_transformers", "vs_ar", "vs_batch1"} <= set(report["ratios"][-1])
    assert report["machine"]["roofline"]["gflops"] > 0 and report["machine"]["memory_gbs"] > 0
    search = report["batch_search"]
    assert (search["limit"], search["prompt_len"]) == (4, 6) and search["peak_mem_bytes"] > 0
    assert search["largest_batch"] in (1, 2, 4)  # what fits is the machine's; the search is tested below
    table = format_table(report)
    assert table.count("\n| dgemma |") == 4
    png = plot_reports([report], tmp_path / "bench.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_largest_batch_is_the_last_power_of_two_before_out_of_memory(model, monkeypatch):
    """The search doubles the batch from 1 until a run raises OutOfMemoryError or passes ``limit``, and
    reports the last batch that ran with that run's peak memory. A CPU never runs out, so an
    out-of-memory wall is put in front of the real runs at a chosen batch."""
    from dgemma.bench import harness

    real, tried, peaks = harness.measure_dgemma, [], {}

    def walled(wall):
        def measure(m, prompts, params):
            tried.append(prompts.shape[0])
            if prompts.shape[0] >= wall:
                raise torch.OutOfMemoryError("simulated")
            res, rows, log = real(m, prompts, params)
            peaks[prompts.shape[0]] = res.peak_mem_bytes
            return res, rows, log
        return measure

    for wall, limit, want, runs in [(4, 64, 2, [1, 2, 4]), (1, 64, 0, [1]), (1000, 5, 4, [1, 2, 4]),
                                    (1000, 4, 4, [1, 2, 4]), (1000, 3, 2, [1, 2])]:
        tried.clear()
        peaks.clear()
        monkeypatch.setattr(harness, "measure_dgemma", walled(wall))
        got = harness.largest_batch(model, prompt_len=5, limit=limit)
        assert tried == runs  # stops at the first out-of-memory or past the limit, never tries beyond
        assert got["largest_batch"] == want and got["limit"] == limit and got["prompt_len"] == 5
        assert got["peak_mem_bytes"] == (peaks[want] if want else 0)


def test_bench_command(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["bench", "--preset", "tiny", "--steps", "2", "--new-tokens", "16", "--prompt-len", "4",
                 "--no-transformers", "--no-ar", "--json", str(out)]) == 0
    assert "| dgemma | 1 | 2 |" in capsys.readouterr().out
    assert json.loads(out.read_text())["runs"][0]["decoder_passes"] == 2
    for bad in (["--batch", "0"], ["--dtype", "float99"], ["--config", str(tmp_path / "none.json")]):
        with pytest.raises(SystemExit) as info:
            main(["bench", "--preset", "tiny", "--no-transformers", *bad] if "--config" not in bad
                 else ["bench", "--no-transformers", *bad])
        assert info.value.code == 2


def test_decode_bytes_counts_touched_experts():
    cfg = preset_config("26b-a4b")
    one, many = flops.decode_bytes(cfg, [0], False, 2), flops.decode_bytes(cfg, [0] * 64, False, 2)
    # 256 tokens x top-8 of 128 touch nearly every expert: a bigger batch reads barely more weights.
    assert one == pytest.approx(many, rel=1e-3)
    assert flops.decode_bytes(cfg, [4096], True, 2) > flops.decode_bytes(cfg, [0], True, 2)  # the KV cache
