"""Training configuration (dgemma/train/config.py) and the learning-rate schedule (trainer.lr_at)."""

from __future__ import annotations

import json
import math

import pytest

from dgemma.train.config import (LORA_TARGETS, DataSection, TrainConfig, TrainConfigError, TrainSection,
                                 from_dict, load, parse_override)
from dgemma.train.trainer import lr_at

BASE = ["model.init=ckpt", "data.train=t.jsonl"]  # the minimum a valid config needs

TOML = """
[model]
init = "ckpt/dir"

[data]
train = "train.jsonl"
eval = "eval.jsonl"
max_length = 512
overlong = "truncate"

[objective]
eps = 0.01
encoder_loss_weight = 2  # an integer for a float field

[lora]
enabled = true
rank = 8

[train]
steps = 10
batch_size = 4
micro_batch = 2
betas = [0.9, 0.95]
precision = "fp32"
"""


def error(path=None, overrides=()) -> str:
    with pytest.raises(TrainConfigError) as info:
        load(path, list(overrides))
    return str(info.value)


def test_load_toml_sections(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text(TOML)
    cfg = load(path)
    assert cfg.model.init == "ckpt/dir" and cfg.model.config is None and cfg.model.tokenizer is None
    assert cfg.data == DataSection(train="train.jsonl", eval="eval.jsonl", max_length=512, overlong="truncate")
    assert cfg.objective.eps == 0.01
    assert cfg.objective.encoder_loss_weight == 2.0 and isinstance(cfg.objective.encoder_loss_weight, float)
    assert cfg.lora.enabled is True and cfg.lora.rank == 8 and cfg.lora.targets == LORA_TARGETS
    t = cfg.train
    assert (t.steps, t.batch_size, t.micro_batch, t.precision) == (10, 4, 2, "fp32")
    assert t.betas == (0.9, 0.95) and isinstance(t.betas, tuple)
    assert t.lr == TrainSection().lr  # untouched keys keep the recipe defaults


def test_overrides_coerce_types(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text(TOML)
    cfg = load(path, ["train.lr=3e-4", "lora.enabled=false", 'data.train="x.jsonl"',
                      'train.sample_prompts=["a","b"]', "train.steps = 20", "train.out=runs/my run"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.lora.enabled is False and cfg.lora.rank == 8  # the rest of the section stays
    assert cfg.data.train == "x.jsonl" and cfg.data.eval == "eval.jsonl"
    assert cfg.train.sample_prompts == ("a", "b")
    assert cfg.train.steps == 20 and isinstance(cfg.train.steps, int)
    assert cfg.train.out == "runs/my run"  # not TOML: taken as a plain string

    cfg = load(None, BASE + ["lora.enabled=true", "train.lr=1", 'train.sample_prompts="one"'])
    assert cfg.lora.enabled is True and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.sample_prompts == ("one",)
    assert cfg.model.init == "ckpt" and cfg.data.train == "t.jsonl"


def test_parse_override():
    assert parse_override("train.lr=3e-4") == (["train", "lr"], 3e-4)
    assert parse_override("train.betas=[0.9, 0.99]") == (["train", "betas"], [0.9, 0.99])
    assert parse_override("data.train=a=b.jsonl") == (["data", "train"], "a=b.jsonl")
    for bad in ("train.lr", "lr=3e-4", "train.lr.x=1", ".lr=1", "train.=1", "=1"):
        with pytest.raises(TrainConfigError, match="section.key=value"):
            parse_override(bad)
    assert "section.key=value" in error(None, BASE + ["train.lr"])
    assert "section.key=value" in error(None, BASE + ["lr=3e-4"])


def test_unknown_key_and_section(tmp_path):
    assert "train.lrr" in error(None, BASE + ["train.lrr=1"])
    assert "model.checkpoint" in error(None, BASE + ["model.checkpoint=x"])
    msg = error(None, BASE + ["optimizer.lr=1"])
    assert "unknown section" in msg and "optimizer" in msg
    path = tmp_path / "c.toml"
    path.write_text('[model]\ninit = "x"\n[data]\ntrain = "t"\nshuffle = true\n')
    assert "data.shuffle" in error(path)
    path.write_text('[model]\ninit = "x"\n[data]\ntrain = "t"\n[extra]\nk = 1\n')
    assert "extra" in error(path)
    path.write_text('model = "x"\n[data]\ntrain = "t"\n')
    assert "[model] must be a table" in error(path)


@pytest.mark.parametrize("override, key", [
    ('train.steps="ten"', "train.steps"), ("train.steps=ten", "train.steps"),
    ("train.steps=1.5", "train.steps"), ("train.steps=true", "train.steps"),
    ("train.lr=true", "train.lr"), ('train.lr="fast"', "train.lr"),
    ("lora.enabled=1", "lora.enabled"), ('lora.enabled="yes"', "lora.enabled"),
    ("data.max_length=[1]", "data.max_length"), ("data.overlong=3", "data.overlong"),
    ("train.betas=0.9", "train.betas"), ("model.tokenizer=5", "model.tokenizer"),
])
def test_wrong_types(override, key):
    assert key in error(None, BASE + [override])


@pytest.mark.parametrize("overrides, words", [
    (["data.train=t.jsonl"], "none"),  # no model source at all
    (["model.init=a", "model.preset=tiny", "model.tokenizer=tok", "data.train=t.jsonl"], "exactly one"),
    (["model.config=a.json", "model.preset=tiny", "model.tokenizer=tok", "data.train=t.jsonl"],
     "exactly one"),
    (["model.preset=tiny", "data.train=t.jsonl"], 'model.tokenizer: a directory with tokenizer.json, or "bytes"'),
    (["model.config=c.json", "data.train=t.jsonl"], "model.tokenizer"),
    (["model.init=ckpt"], "data.train"),
    (BASE + ["train.batch_size=6", "train.micro_batch=4"], "multiple"),
    (BASE + ["train.precision=fp16"], "train.precision"),
    (BASE + ['data.overlong="cut"'], "data.overlong"),
    (BASE + ['data.template="jinja"'], "data.template"),
    (BASE + ["train.steps=0"], "train.steps"),
    (BASE + ["train.min_lr=1.0", "train.lr=0.1"], "min_lr"),
    (BASE + ["train.betas=[0.9]"], "train.betas"),
    (BASE + ["objective.eps=0"], "objective.eps"),
    (BASE + ["objective.noise_power=0"], "objective.noise_power"),
    (BASE + ["objective.focal_gamma=-1"], "objective.focal_gamma"),
    (BASE + ["lora.dropout=1.0"], "lora"),
    (BASE + ['objective.kind="causal"'], "objective.kind must be one of ('diffusion', 'ar')"),
    (BASE + ["train.schedule_steps=-1"], "train.schedule_steps"),
    (BASE + ['data.allow_unknown="yes"'], "data.allow_unknown must be true or false"),
])
def test_validation(overrides, words):
    assert words in error(None, overrides)


def test_valid_sources():
    assert load(None, BASE).model.init == "ckpt"
    assert load(None, ["model.preset=tiny", "model.tokenizer=tok", "data.train=t"]).model.preset == "tiny"
    cfg = load(None, ["model.config=c.json", "model.tokenizer=tok", "data.train=t",
                      "train.batch_size=8", "train.micro_batch=4"])
    assert cfg.train.batch_size == 8 and cfg.train.micro_batch == 4


def test_bad_or_missing_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[train\nlr = 1\n")
    msg = error(path, BASE)
    assert str(path) in msg and "TOML" in msg
    missing = tmp_path / "missing.toml"
    assert str(missing) in error(missing, BASE)


def test_to_json_round_trip(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text(TOML)
    cfg = load(path, ["train.lr=3e-4", 'train.sample_prompts=["a","b"]'])
    raw = json.loads(cfg.to_json())
    assert raw["train"]["lr"] == 3e-4 and raw["train"]["betas"] == [0.9, 0.95]
    assert raw["model"]["init"] == "ckpt/dir" and raw["model"]["preset"] is None
    assert raw["lora"]["enabled"] is True and raw["train"]["sample_prompts"] == ["a", "b"]
    assert raw["objective"]["eps"] == 0.01 and raw["data"]["overlong"] == "truncate"
    assert set(raw) == {"model", "data", "objective", "lora", "train"}
    assert from_dict(raw) == cfg  # the saved config loads back to the same thing


# ------------------------------------------------------------------ learning-rate schedule
def sched(steps=100, warmup=10, lr=1e-3, min_lr=1e-4) -> TrainConfig:
    return TrainConfig(train=TrainSection(steps=steps, warmup=warmup, lr=lr, min_lr=min_lr))


def test_lr_warmup_is_linear():
    cfg = sched()
    warm = [lr_at(s, cfg) for s in range(11)]
    steps = [b - a for a, b in zip(warm, warm[1:])]
    assert all(d > 0 for d in steps)
    assert all(math.isclose(d, steps[0], rel_tol=1e-9) for d in steps)  # linear, up to and into lr
    assert 0 < warm[0] < 0.2e-3 and warm[9] == pytest.approx(1e-3 * 10 / 11)
    assert warm[10] == pytest.approx(1e-3)  # peak right after warm-up
    assert max(warm) <= 1e-3 * (1 + 1e-12)


def test_lr_cosine_decay():
    cfg = sched()
    after = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(b <= a + 1e-15 for a, b in zip(after, after[1:]))  # monotone non-increasing
    assert after[0] == pytest.approx(1e-3) and after[-1] == pytest.approx(1e-4)
    mid = lr_at(55, cfg)  # half way through the decay: the mean of lr and min_lr
    assert mid == pytest.approx((1e-3 + 1e-4) / 2)
    assert lr_at(99, cfg) == pytest.approx(1e-4, abs=1e-6)  # the last step trained is at ~min_lr
    assert lr_at(150, cfg) == pytest.approx(1e-4)  # clamped past the end
    assert all(lr_at(s, cfg) >= 1e-4 - 1e-15 for s in range(10, 200))  # after warm-up


def test_lr_no_warmup():
    cfg = sched(steps=5, warmup=0, lr=2e-4, min_lr=0.0)
    values = [lr_at(s, cfg) for s in range(6)]
    assert values[0] == pytest.approx(2e-4) and values[-1] == pytest.approx(0.0, abs=1e-12)
    assert values == sorted(values, reverse=True)


def test_lora_needs_a_checkpoint_to_adapt():
    with pytest.raises(TrainConfigError, match="model.init"):
        load(None, ['model.preset="tiny"', 'model.tokenizer="tok"', 'data.train="t.jsonl"', "lora.enabled=true"])


def test_lr_schedule_length_is_schedule_steps_when_set():
    cfg = TrainConfig(train=TrainSection(steps=150, schedule_steps=100, warmup=10, lr=1e-3, min_lr=1e-4))
    plain = sched(steps=100)
    assert [lr_at(s, cfg) for s in range(150)] == [lr_at(s, plain) for s in range(150)]
    assert lr_at(120, cfg) == pytest.approx(1e-4)  # past the schedule: min_lr
    assert lr_at(55, plain, 150) == lr_at(55, sched(steps=150))  # an explicit length wins over the config's


def test_new_keys_load_with_their_defaults():
    cfg = load(None, BASE + ['model.tokenizer="bytes"', 'objective.kind="ar"', "data.allow_unknown=true"])
    assert cfg.model.tokenizer == "bytes" and cfg.objective.kind == "ar" and cfg.data.allow_unknown is True
    default = load(None, BASE)
    assert default.objective.kind == "diffusion" and not default.data.allow_unknown
    assert default.train.schedule_steps == 0
