"""End-to-end training runs on a tiny model: learning, resume, crash safety, release format, LoRA, torchrun."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import dgemma
from dgemma.cache import KVCache
from dgemma.loading import load_weights
from dgemma.tokenizer import write_test_tokenizer
from dgemma.train import checkpoint, config
from dgemma.train.trainer import Trainer
from conftest import reverse_task

ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    write_test_tokenizer(d / "tok", 272)
    return {"tok": d / "tok", "train": reverse_task(d / "train.jsonl", 400, 0),
            "eval": reverse_task(d / "eval.jsonl", 16, 1)}


def _cfg(task, out: Path, **sections) -> config.TrainConfig:
    raw = {
        "model": {"preset": "tiny", "tokenizer": str(task["tok"])},
        "data": {"train": str(task["train"]), "max_length": 64},
        "train": {"out": str(out), "steps": 6, "batch_size": 4, "micro_batch": 2, "lr": 3e-3, "min_lr": 3e-4,
                  "warmup": 2, "log_every": 1, "save_every": 3, "precision": "fp32"},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config.from_dict(raw)


def _run(cfg, resume=False):
    return Trainer(cfg, show_progress=False, log=lambda msg: None).run(resume=resume)


def _losses(out: Path) -> list[tuple[int, float]]:
    lines = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines() if ln.strip()]
    return [(e["step"], e["loss"]) for e in lines if "loss" in e]


@pytest.fixture(scope="module")
def full_run(task, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return _run(_cfg(task, out / "run")), out / "run"


def test_from_scratch_run_learns_and_logs(task, tmp_path):
    cfg = _cfg(task, tmp_path / "run", data={"eval": str(task["eval"])},
               train={"steps": 40, "batch_size": 8, "micro_batch": 8, "save_every": 0, "eval_every": 20,
                      "sample_every": 40, "sample_prompts": ["abc"], "sample_max_new_tokens": 16})
    result = _run(cfg)
    first, last = result.history[0]["loss"], result.history[-1]["loss"]
    assert last < first - 3.0, (first, last)
    assert [e["step"] for e in result.evals] == [20, 40] and result.evals[1]["eval_loss"] < result.evals[0]["eval_loss"]
    log = [json.loads(ln) for ln in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any("sample" in e and isinstance(e["sample"]["text"], str) for e in log)
    assert result.trainable_parameters == sum(p.numel() for p in load_weights(result.final)[0].parameters())
    assert result.peak_memory_bytes > 0
    assert (tmp_path / "run" / "checkpoints" / "step-00000040" / "trainer_state.json").is_file()


def test_resume_continues_the_same_loss_curve(task, tmp_path, full_run, monkeypatch):
    _, straight = full_run
    cfg = _cfg(task, tmp_path / "run")
    real_step = Trainer.train_step

    def crash_at_4(self, step):
        if step == 3:
            raise KeyboardInterrupt  # the run dies after the step-3 checkpoint
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "train_step", crash_at_4)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    with pytest.raises(dgemma.DgemmaError, match="--resume"):
        _run(cfg)  # a fresh start would overwrite the run: refused
    _run(cfg, resume=True)
    assert [s for s, _ in _losses(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "run")), torch.tensor(_losses(straight)),
                               atol=1e-6, rtol=0)
    a, _, _, _ = load_weights(tmp_path / "run" / "final")
    b, _, _, _ = load_weights(straight / "final")
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("k", [1, 2])
def test_gradient_accumulation_does_not_change_the_step(task, tmp_path, k):
    """Also with K draws per example: each micro-batch takes its own examples' draws."""
    runs = []
    for micro in (4, 1):
        _run(_cfg(task, tmp_path / f"m{micro}", train={"steps": 2, "micro_batch": micro, "save_every": 0},
                  objective={"draws_per_example": k}))
        runs.append(torch.tensor(_losses(tmp_path / f"m{micro}")))
    torch.testing.assert_close(runs[0], runs[1], atol=1e-5, rtol=0)


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import dgemma.train.checkpoint as ck
    from dgemma.train import config
    from dgemma.train.trainer import Trainer

    real = ck.save_file
    def slow_save(tensors, path):  # the optimiser file of the step-4 save: stall half-way, to be killed
        if "step-00000004" in str(path):
            Path(path).write_bytes(b"partial")
            Path(sys.argv[2]).write_text("saving")
            time.sleep(120)
        return real(tensors, path)
    ck.save_file = slow_save
    cfg = config.from_dict(__import__("json").loads(Path(sys.argv[1]).read_text()))
    Trainer(cfg, show_progress=False, log=lambda m: None).run()
""")


def test_a_kill_during_a_save_leaves_the_previous_checkpoint(task, tmp_path, full_run):
    cfg = _cfg(task, tmp_path / "run", train={"save_every": 2})
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    (tmp_path / "kill.py").write_text(KILL_SCRIPT)
    marker = tmp_path / "saving"
    proc = subprocess.Popen([sys.executable, str(tmp_path / "kill.py"), str(tmp_path / "cfg.json"), str(marker)])
    try:
        deadline = time.time() + 120
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert marker.exists(), "the training process never reached the step-4 save"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "step-00000004.tmp").is_dir() and not (ckpts / "step-00000004").exists()
    assert checkpoint.latest(tmp_path / "run") == ckpts / "step-00000002"
    dgemma.load(ckpts / "step-00000002")  # a complete release-format checkpoint
    _run(cfg, resume=True)
    assert not list(ckpts.glob("*.tmp"))
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "run")), torch.tensor(_losses(full_run[1])),
                               atol=1e-6, rtol=0)


def _logits_pair(ours, hf, prompt_len=7, seed=0):
    """Decoder logits of dgemma and transformers for the same prompt and canvas."""
    from transformers.cache_utils import DynamicCache

    cfg = ours.cfg
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=g)
    canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=g)
    cache = KVCache(cfg, 1, prompt_len, device="cpu", dtype=torch.float32)
    ours.encode(prompt, cache)
    mine = ours.decode(canvas, cache)
    with torch.no_grad():
        theirs = hf(input_ids=prompt, decoder_input_ids=canvas, past_key_values=DynamicCache(config=hf.config)).logits
    return mine, theirs


def test_trained_model_is_in_the_release_format(full_run):
    from transformers import DiffusionGemmaForBlockDiffusion

    result, _ = full_run
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(result.final, dtype=torch.float32).eval()
    ours, _, _, _ = load_weights(result.final, dtype=torch.float32)
    with torch.no_grad():
        mine, theirs = _logits_pair(ours, hf)
    torch.testing.assert_close(mine, theirs, atol=2e-4, rtol=1e-4)
    engine = dgemma.load(result.final)
    assert engine.tokenizer is not None and isinstance(engine.generate("abc", max_new_tokens=8).text, str)


def test_lora_adapter_merge_and_frozen_base(task, tmp_path, full_run):
    base = full_run[0].final
    cfg = _cfg(task, tmp_path / "lora", model={"preset": None, "tokenizer": None, "init": str(base)},
               lora={"enabled": True, "rank": 4, "alpha": 8.0, "experts": True},
               train={"steps": 3, "save_every": 3, "lr": 1e-2})
    result = _run(cfg)
    assert (result.adapter / "adapter_config.json").is_file() and (result.adapter / "tokenizer.json").is_file()
    from dgemma.train import lora

    before, _, _, _ = load_weights(base, dtype=torch.float32)
    unmerged = lora.load_adapter(load_weights(base, dtype=torch.float32)[0], result.adapter)
    model = unmerged.get_base_model()
    n_lora = sum(1 for n, _ in unmerged.named_parameters() if "lora_" in n)
    assert n_lora > 0 and any("experts" in n and "lora_" in n for n, _ in unmerged.named_parameters())
    subprocess.run([sys.executable, "-m", "dgemma", "merge", str(result.adapter), "--out", str(tmp_path / "merged")],
                   check=True, cwd=ROOT, capture_output=True)
    merged, _, _, _ = load_weights(tmp_path / "merged", dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, merged.cfg.vocab_size, (1, 9), generator=g)
    canvas = torch.randint(0, merged.cfg.vocab_size, (1, merged.cfg.canvas_length), generator=g)
    outs = []
    with torch.no_grad():
        for m in (model, merged, before):
            cache = KVCache(m.cfg, 1, 9, device="cpu", dtype=torch.float32)
            m.encode(prompt, cache)
            outs.append(m.decode(canvas, cache))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)  # merged == adapter applied
    assert not torch.allclose(outs[0], outs[2], atol=1e-3)  # and the adapter did change the model
    at_end, _, _, _ = load_weights(result.final, dtype=torch.float32)  # the merge written by the run itself
    with torch.no_grad():
        torch.testing.assert_close(at_end.decode(canvas, _cache(at_end, prompt)), outs[1], atol=1e-4, rtol=1e-4)


def _cache(model, prompt):
    cache = KVCache(model.cfg, 1, prompt.shape[1], device="cpu", dtype=torch.float32)
    with torch.no_grad():
        model.encode(prompt, cache)
    return cache


def test_fine_tuning_freezes_the_router_by_default(task, tmp_path, full_run):
    base = full_run[0].final
    cfg = _cfg(task, tmp_path / "ft", model={"preset": None, "tokenizer": None, "init": str(base)},
               train={"steps": 2, "save_every": 0})
    result = _run(cfg)
    a, b = load_weights(base)[0], load_weights(result.final)[0]
    assert torch.equal(a.layers[0].router.proj.weight, b.layers[0].router.proj.weight)
    assert torch.equal(a.layers[0].router.scale, b.layers[0].router.scale)
    assert not torch.equal(a.layers[0].self_attn.q_proj.weight, b.layers[0].self_attn.q_proj.weight)
    frozen = (".router.proj.", ".router.scale")
    assert result.trainable_parameters == sum(p.numel() for n, p in a.named_parameters()
                                              if not any(f in n for f in frozen))


def test_two_processes_match_one(task, tmp_path, full_run):
    """torchrun with 2 CPU processes (gloo, FSDP2): the same losses as the single-process run."""
    cfg = _cfg(task, tmp_path / "dist", train={"save_every": 3})
    (tmp_path / "cfg.toml").write_text("")
    args = [f"--set={k}.{f}={json.dumps(v)}" for k, sec in cfg.to_dict().items() for f, v in sec.items()
            if v is not None and not isinstance(v, (list, tuple))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(*extra):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--standalone", "-m", "dgemma", "train", str(tmp_path / "cfg.toml"),
                               "--no-progress", *args, *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    torchrun()
    # Reduction order differs between the runs; after a few Adam steps the losses (about 9) differ by up to
    # 1e-5 relative (measured: 8.3e-5 at step 5). A wrong gradient would be off by far more.
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "dist")), torch.tensor(_losses(full_run[1])),
                               atol=1e-5, rtol=2e-5)
    # Weights: summation order differs between the runs, and Adam's g / sqrt(v) magnifies it on rows with
    # near-zero gradients (rare tokens), so the bound is loose there; a wrong gradient would be off by ~lr.
    a, b = load_weights(tmp_path / "dist" / "final")[0], load_weights(full_run[1] / "final")[0]
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-3, rtol=0, msg=lambda m, n=n: f"{n}: {m}")
        assert (p - q).abs().mean() < 2e-5, n

    # Resuming a sharded run (optimizer state scattered back to the shards) continues like a single process.
    single = tmp_path / "single"
    shutil.copytree(full_run[1], single)
    torchrun("--resume", "--set", "train.steps=8")
    _run(_cfg(task, single, train={"steps": 8}), resume=True)
    got, want = _losses(tmp_path / "dist"), _losses(single)
    assert [s for s, _ in got] == list(range(1, 9))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=2e-5)


def test_cli_reports_user_mistakes_in_one_line(task, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion":\n')
    (tmp_path / "cfg.toml").write_text(textwrap.dedent(f"""
        [model]
        preset = "tiny"
        tokenizer = "{task['tok']}"
        [data]
        train = "{bad}"
        [train]
        out = "{tmp_path / 'out'}"
    """))
    proc = subprocess.run([sys.executable, "-m", "dgemma", "train", str(tmp_path / "cfg.toml"), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and f"{bad}:2:" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "dgemma", "train", str(tmp_path / "cfg.toml"), "--set", "train.lrr=1"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "train.lrr" in proc.stderr and "Traceback" not in proc.stderr


def test_lora_run_resumes_the_same_loss_curve(task, tmp_path, full_run, monkeypatch):
    base = str(full_run[0].final)

    def cfg(name):
        return _cfg(task, tmp_path / name, model={"preset": None, "tokenizer": None, "init": base},
                    lora={"enabled": True, "rank": 4, "merge_at_end": False},
                    train={"steps": 4, "save_every": 2, "lr": 1e-2})

    straight = _run(cfg("straight"))
    assert straight.final is None and (straight.adapter / "adapter_model.safetensors").is_file()
    real_step = Trainer.train_step

    def crash_at_3(self, step):
        if step == 2:
            raise KeyboardInterrupt
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "train_step", crash_at_3)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg("resumed"))
    monkeypatch.setattr(Trainer, "train_step", real_step)
    _run(cfg("resumed"), resume=True)
    got, want = _losses(tmp_path / "resumed"), _losses(tmp_path / "straight")
    assert [s for s, _ in got] == [1, 2, 3, 4] and want[-1][1] != want[0][1]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-6, rtol=0)


def test_bf16_autocast_trains_close_to_fp32(task, tmp_path):
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = _cfg(task, tmp_path / precision, train={"steps": 2, "save_every": 0, "precision": precision})
        trainer = Trainer(cfg, show_progress=False, log=lambda msg: None)
        assert trainer.autocast == (torch.bfloat16 if precision == "bf16" else None)
        losses[precision] = torch.tensor([e["loss"] for e in trainer.run().history])
    assert not torch.equal(losses["bf16"], losses["fp32"])  # autocast really changed the arithmetic
    torch.testing.assert_close(losses["bf16"], losses["fp32"], atol=0.05, rtol=0)


def test_fine_tuning_keeps_the_checkpoint_dtype_and_lora_base_in_bf16(task, tmp_path, full_run):
    """A bf16 checkpoint: full fine-tuning keeps fp32 master weights but writes final/ in bf16; LoRA under
    bf16 autocast keeps the frozen base in bf16 and the adapters in fp32."""
    from dgemma.loading import save_checkpoint
    from dgemma.tokenizer import Tokenizer

    base = tmp_path / "bf16-base"
    model, _, gen, _ = load_weights(full_run[0].final, dtype=torch.bfloat16)
    save_checkpoint(model, base, gen)
    Tokenizer.from_dir(full_run[0].final).save(base)
    init = {"preset": None, "tokenizer": None, "init": str(base)}
    result = _run(_cfg(task, tmp_path / "ft", model=init, train={"steps": 1, "save_every": 0}))
    assert json.loads((result.final / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(result.final / "model.safetensors").values()} == {torch.bfloat16}

    cfg = _cfg(task, tmp_path / "lora", model=init, lora={"enabled": True, "rank": 4},
               train={"steps": 1, "save_every": 0, "precision": "bf16"})
    trainer = Trainer(cfg, show_progress=False, log=lambda msg: None)
    dtypes = {n: p.dtype for n, p in trainer.objective.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if "lora_" not in n)
    out = trainer.run()
    assert math.isfinite(out.history[-1]["loss"])
    assert json.loads((out.final / "config.json").read_text())["dtype"] == "bfloat16"


def test_resume_with_a_different_lora_setup_is_a_clear_error(task, tmp_path, full_run):
    init = {"preset": None, "tokenizer": None, "init": str(full_run[0].final)}
    _run(_cfg(task, tmp_path / "run", model=init, lora={"enabled": True, "rank": 4},
              train={"steps": 1, "save_every": 1}))
    cfg = _cfg(task, tmp_path / "run", model=init, lora={"enabled": True, "rank": 4, "experts": True},
               train={"steps": 2, "save_every": 1})
    with pytest.raises(dgemma.DgemmaError, match="does not match the config"):
        _run(cfg, resume=True)


def test_progress_bar_shows_loss_rate_and_eta_on_stderr(capsys):
    from dgemma.train.progress import Progress

    with Progress(10, 0, enabled=True, live=True, say=print) as bar:
        for step in range(1, 11):
            bar.update(step, {"loss": 1.0 / step, "tokens_per_s": 1234.0})
        bar.line({"step": 10, "loss": 0.1})
    out, err = capsys.readouterr()
    assert out == ""
    assert "10/10" in err and "loss 0.1000" in err and "1234 tok/s" in err and "ETA" in err
    assert "step=10 loss=0.1" in err
    with Progress(10, 0, enabled=True, live=False, say=print) as bar:  # not a terminal: log lines only
        bar.update(1, {"loss": 1.0, "tokens_per_s": 1.0})
        bar.line({"step": 1, "loss": 1.0})
    assert capsys.readouterr().out == "step=1 loss=1\n"
