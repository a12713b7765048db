"""Starting, stopping and resuming ``dgemma train`` as a new user meets it: the documented from-scratch example
(byte-level tokenizer, offline), data the tokenizer cannot read, a non-empty output directory, a finished run,
the learning-rate schedule on resume, and Ctrl-C."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch

import dgemma
from dgemma.cli import main
from dgemma.sudoku import task as sudoku_task
from dgemma.train import config
from dgemma.train.trainer import Trainer, lr_at
from conftest import reverse_task

ROOT = Path(__file__).resolve().parents[1]



def _toml(path: Path, data: Path, out: Path, tokenizer: str = "bytes", **train) -> Path:
    settings = {"steps": 4, "batch_size": 4, "micro_batch": 4, "lr": 3e-3, "min_lr": 3e-4, "warmup": 1,
                "log_every": 1, "save_every": 2, "precision": "fp32", **train}
    lines = ["[model]", 'preset = "tiny"', f"tokenizer = {json.dumps(tokenizer)}", "[data]",
             f"train = {json.dumps(str(data))}", "max_length = 64", "[train]", f"out = {json.dumps(str(out))}"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _log(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines() if ln.strip()]


def test_the_documented_from_scratch_example_trains_offline(tmp_path, monkeypatch, capsys):
    doc = (ROOT / "docs" / "TRAINING.md").read_text()
    toml = re.search(r"<!-- from-scratch-example -->\n```toml\n(.*?)```", doc, re.S).group(1)
    assert 'tokenizer = "bytes"' in toml
    (tmp_path / "scratch.toml").write_text(toml)
    reverse_task(tmp_path / "train.jsonl", 40)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["train", "scratch.toml", "--set", "train.steps=2", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["step"] == 2 and summary["loss"] > 0
    final = tmp_path / "runs" / "scratch" / "final"
    assert (final / "tokenizer.json").is_file() and (final / "model.safetensors").is_file()
    engine = dgemma.load(final)
    assert engine.tokenizer.encode("zébra") != [] and engine.tokenizer.unk_id not in engine.tokenizer.encode("zébra")
    assert isinstance(engine.chat([{"role": "user", "content": "abc"}], max_new_tokens=4).answer, str)


def test_letters_through_the_digit_tokenizer_are_refused_or_warned(tmp_path, capsys):
    sudoku_task.build_tokenizer().save(tmp_path / "digits")  # the embedded Sudoku model's tokenizer
    data = reverse_task(tmp_path / "train.jsonl", 20)
    cfg = _toml(tmp_path / "cfg.toml", data, tmp_path / "out", tokenizer=str(tmp_path / "digits"))
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(cfg), "--no-progress"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 2  # data line + error
    assert "unknown token" in err and f"{data}:1" in err and "data.allow_unknown" in err and "bytes" in err

    said = []
    raw = config.load(cfg, ["data.allow_unknown=true"])
    Trainer(raw, show_progress=False, log=said.append)  # builds: the data is accepted, with a warning
    assert any(s.startswith(f"warning: {data}:") and "unknown token" in s for s in said)


def test_a_new_run_in_a_non_empty_directory_is_refused_before_the_data_is_read(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    cfg = _toml(tmp_path / "cfg.toml", tmp_path / "missing.jsonl", out)
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(cfg), "--no-progress"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "not empty (notes.txt)" in err and "--resume" in err and "--out" in err and "missing.jsonl" not in err
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_resuming_a_finished_run_changes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    cfg = _toml(tmp_path / "cfg.toml", reverse_task(tmp_path / "train.jsonl", 20), out, steps=2, save_every=1)
    assert main(["train", str(cfg), "--no-progress"]) == 0
    capsys.readouterr()
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")}
    assert main(["train", str(cfg), "--no-progress", "--resume"]) == 0
    captured = capsys.readouterr()
    assert "already at step 2 of 2" in captured.err
    summary = json.loads(captured.out)
    assert summary["step"] == 2 and summary["loss"] == _log(out)[-1]["loss"]
    assert summary["final"] == str(out / "final")
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")} == before


def _cfg(tmp_path: Path, out: Path, **train) -> config.TrainConfig:
    data = tmp_path / "train.jsonl"
    if not data.exists():
        reverse_task(data, 40)
    return config.load(_toml(tmp_path / f"{out.name}.toml", data, out, **train))


def _run(cfg, resume=False, said=None):
    return Trainer(cfg, show_progress=False, log=(said.append if said is not None else lambda m: None)).run(resume)


def test_raising_steps_on_resume_keeps_the_learning_rate_schedule(tmp_path):
    six = tmp_path / "six"
    _run(_cfg(tmp_path, six, steps=6, warmup=2, save_every=3))
    shutil.copytree(six, tmp_path / "replanned")
    said = []
    _run(_cfg(tmp_path, six, steps=9, warmup=2, save_every=3), resume=True, said=said)
    assert any("stays at train.min_lr" in s for s in said)
    straight = tmp_path / "straight"
    _run(_cfg(tmp_path, straight, steps=9, warmup=2, save_every=3, schedule_steps=6))
    got = [(e["step"], e["lr"], e["loss"]) for e in _log(six) if "loss" in e]
    want = [(e["step"], e["lr"], e["loss"]) for e in _log(straight) if "loss" in e]
    assert [s for s, _, _ in got] == list(range(1, 10))
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    lrs = [lr for _, lr, _ in got]
    assert lrs[5] < lrs[4] and lrs[6:] == [3e-4] * 3  # steps 7-9 continue at min_lr, no jump

    # An explicit train.schedule_steps re-plans the decay over the new length, and says so.
    said.clear()
    cfg = _cfg(tmp_path, tmp_path / "replanned", steps=9, warmup=2, save_every=3, schedule_steps=9)
    _run(cfg, resume=True, said=said)
    assert any("replaces the run's schedule of 6 steps" in s for s in said)
    lr7 = [e["lr"] for e in _log(tmp_path / "replanned") if "loss" in e][6]
    assert lr7 == pytest.approx(lr_at(6, cfg, 9), abs=1e-6) and lr7 > lrs[5]


def test_ctrl_c_names_the_checkpoint_and_the_command_that_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    cfg = _toml(tmp_path / "cfg.toml", reverse_task(tmp_path / "train.jsonl", 20), out, steps=4, save_every=2)
    real = Trainer.train_step

    def interrupt_at(n):
        def step(self, i):
            if i == n:
                raise KeyboardInterrupt
            return real(self, i)
        return step

    monkeypatch.setattr(Trainer, "train_step", interrupt_at(0))  # before any checkpoint
    assert main(["train", str(cfg), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "holds no checkpoint yet" in err and f"dgemma train {cfg} --no-progress --resume" in err
    shutil.rmtree(out)

    monkeypatch.setattr(Trainer, "train_step", interrupt_at(3))  # after the step-2 checkpoint
    assert main(["train", str(cfg), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert f"interrupted after step 3 of 4; the newest checkpoint is {out / 'checkpoints' / 'step-00000002'} " \
           "(step 2)" in err
    command = err.strip().splitlines()[-1].strip()
    assert command == f"dgemma train {cfg} --no-progress --resume"
    monkeypatch.setattr(Trainer, "train_step", real)
    assert main(shlex.split(command)[1:]) == 0
    assert [e["step"] for e in _log(out) if "loss" in e] == [1, 2, 3, 4]

