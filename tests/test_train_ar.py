"""The AR-only objective (``objective.kind = "ar"``): the encoder's next-token loss alone, no decoder pass;
and the Sudoku AR baseline it trains (``dgemma sudoku train --objective ar``), scored by ``sudoku eval``."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dgemma.cache import KVCache
from dgemma.cli import main
from dgemma.loading import load_weights
from dgemma.train import config
from dgemma.train.data import Example, collate
from dgemma.train.objective import Objective, ObjectiveConfig, draw
from dgemma.train.trainer import Trainer
from conftest import reverse_task


@pytest.fixture(scope="module")
def model(ckpt_factory):
    return load_weights(ckpt_factory("tiny"), dtype=torch.float32)[0]


def _example(prompt_len: int, n_blocks: int, c: int, vocab: int, seed: int) -> Example:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (prompt_len + n_blocks * c,), generator=g).tolist()
    return Example(tuple(ids), prompt_len, c)


def _causal_lm_sum(model, examples: list[Example]) -> torch.Tensor:
    """Summed next-token cross-entropy of each example alone, through the inference encoder (KV cache)."""
    total = torch.zeros(())
    for e in examples:
        ids = torch.tensor([e.ids])  # [1, S]
        cache = KVCache(model.cfg, 1, ids.shape[1], device="cpu", dtype=torch.float32)
        logits = model.logits(model.encode(ids, cache))[0]  # [S, V]
        total = total + F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum")
    return total


def _spy_layers(model, monkeypatch) -> list[bool]:
    """Record the ``encoder`` flag of every ``run_layers`` call."""
    calls: list[bool] = []
    real = type(model).run_layers

    def spy(self, x, positions, kv, encoder, **kw):
        calls.append(encoder)
        return real(self, x, positions, kv, encoder, **kw)

    monkeypatch.setattr(type(model), "run_layers", spy)
    return calls


def test_ar_objective_is_the_causal_lm_loss_and_runs_no_decoder(model, monkeypatch):
    """Two examples of different lengths (right padding), both longer than the sliding window."""
    c, v = model.cfg.canvas_length, model.cfg.vocab_size
    exs = [_example(5, 3, c, v, 1), _example(9, 1, c, v, 2)]
    assert min(len(e.ids) for e in exs) > model.cfg.sliding_window
    batch = collate(exs, pad_id=0)
    with torch.no_grad():
        want = _causal_lm_sum(model, exs)
        calls = _spy_layers(model, monkeypatch)
        diff, ar = Objective(model, ObjectiveConfig(kind="ar"))(batch, [])
        assert calls == [True]  # the encoder once, the decoder never
        assert float(diff) == 0.0
        torch.testing.assert_close(ar, want, rtol=1e-5, atol=1e-4)

        # The diffusion objective is unchanged: it runs the decoder, and its AR co-loss is the same sum.
        calls.clear()
        cfg = ObjectiveConfig(self_conditioning_p=0.0)
        diff2, ar2 = Objective(model, cfg)(batch, [draw(e, 0, 0, k, v, cfg) for k, e in enumerate(exs)])
    assert calls == [True, False] and float(diff2) > 0
    torch.testing.assert_close(ar2, ar, rtol=0, atol=0)



def test_ar_training_steps_are_the_mean_next_token_loss_and_lower_it(tmp_path):
    cfg = config.from_dict({
        "model": {"preset": "tiny", "tokenizer": "bytes"},
        "data": {"train": str(reverse_task(tmp_path / "train.jsonl", 64, 0)), "max_length": 64},
        "objective": {"kind": "ar", "encoder_loss_weight": 0.25},  # the weight does not apply to AR only
        "train": {"out": str(tmp_path / "run"), "steps": 12, "batch_size": 8, "micro_batch": 4, "lr": 3e-3,
                  "warmup": 2, "precision": "fp32"},
    })
    trainer = Trainer(cfg, show_progress=False, log=lambda msg: None)
    model = trainer.setup.model
    losses = []
    for step in range(cfg.train.steps):
        exs = [trainer.examples[i] for i in trainer.stream.indices(step, cfg.train.batch_size)]
        with torch.no_grad():
            want = float(_causal_lm_sum(model, exs)) / sum(len(e.ids) - 1 for e in exs)
        m = trainer.train_step(step)
        assert "diffusion_loss" not in m and m["loss"] == m["ar_loss"]
        assert m["loss"] == pytest.approx(want, rel=1e-5)
        losses.append(m["loss"])
    assert losses[-1] < losses[0] - 1.0, losses


def test_sudoku_ar_baseline_trains_saves_and_is_scored_by_the_ar_path(tmp_path, capsys):
    out = tmp_path / "sudoku-ar"
    args = ["sudoku", "train", "--objective", "ar", "--out", str(out), "--puzzles", "4", "--augment", "2",
            "--workers", "1", "--set", "train.batch_size=4", "--set", "train.micro_batch=4", "--set", "train.warmup=1",
            "--set", "train.save_every=1"]
    assert main(args + ["--steps", "1"]) == 0
    assert main(args + ["--steps", "2", "--resume"]) == 0  # every trained tensor's optimizer state is saved
    assert json.loads((out / "run" / "train_config.json").read_text())["objective"]["kind"] == "ar"
    log = [json.loads(ln) for ln in (out / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "loss" in e] == [1, 2] and all("diffusion_loss" not in e for e in log)
    capsys.readouterr()
    assert main(["sudoku", "eval", "--model", str(out / "run" / "final"), "-n", "2", "--buckets", "unsloth",
                 "--no-diffusion", "--json", "--ar-temperature", "1e-6", "5"]) == 0
    rows = json.loads(capsys.readouterr().out)["unsloth"]
    assert list(rows) == ["autoregressive", "autoregressive-T1e-06", "autoregressive-T5"]
    assert 0.0 <= rows["autoregressive"]["cell_accuracy"] <= 1.0
    # sampling at a vanishing temperature is greedy decoding; at a high one it is not
    for key in ("exact", "cell_accuracy", "clue_preservation"):
        assert rows["autoregressive-T1e-06"][key] == rows["autoregressive"][key]
    assert rows["autoregressive-T5"]["cell_accuracy"] != rows["autoregressive"]["cell_accuracy"]
