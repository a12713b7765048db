"""SamplingParams: validation (every invalid value names its field), edge cases, temperature schedule,
generation_config.json overlay."""

from __future__ import annotations

import dataclasses
import math

import pytest

from dgemma.params import SamplingParams

SPEC_DEFAULTS = {"max_new_tokens": 256, "max_denoising_steps": 48, "entropy_bound": 0.1, "t_max": 0.8,
                 "t_min": 0.4, "stability_threshold": 1, "confidence_threshold": 0.005, "eos_token_id": None,
                 "pad_token_id": None, "seed": None, "initial_canvas": None,
                 "pinned_canvas": None, "restarts": 0,  # restarts: not in the spec; 0 is its behaviour
                 "restart_entropy": None, "restart_after": None, "parallel_attempts": 1}

INVALID = [
    ("max_new_tokens", 0), ("max_new_tokens", -1), ("max_new_tokens", 1.5), ("max_new_tokens", True),
    ("max_new_tokens", "8"), ("max_new_tokens", None),
    ("max_denoising_steps", 0), ("max_denoising_steps", -3), ("max_denoising_steps", 2.0),
    ("max_denoising_steps", False),
    ("entropy_bound", 0), ("entropy_bound", -1), ("entropy_bound", math.nan), ("entropy_bound", math.inf),
    ("entropy_bound", True), ("entropy_bound", "0.1"),
    ("t_max", 0), ("t_max", -0.5), ("t_max", math.nan), ("t_max", math.inf), ("t_max", -math.inf),
    ("t_min", 0), ("t_min", -0.1), ("t_min", math.nan), ("t_min", math.inf),
    ("stability_threshold", -1), ("stability_threshold", 1.5), ("stability_threshold", True),
    ("restarts", -1), ("restarts", 1.5), ("restarts", None),
    ("restart_entropy", 0), ("restart_entropy", -1e-3), ("restart_entropy", math.nan),
    ("restart_entropy", math.inf), ("restart_entropy", "1e-12"), ("restart_entropy", True),
    ("restart_after", 0), ("restart_after", -2), ("restart_after", 1.5), ("restart_after", True),
    ("restart_after", "16"), ("parallel_attempts", 0), ("parallel_attempts", 65), ("parallel_attempts", None),
    ("parallel_attempts", 2.0), ("parallel_attempts", True),
    ("confidence_threshold", -0.1), ("confidence_threshold", math.nan), ("confidence_threshold", math.inf),
    ("eos_token_id", "x"), ("eos_token_id", [-1]), ("eos_token_id", -1), ("eos_token_id", [1, "2"]),
    ("eos_token_id", [1.0]), ("eos_token_id", True), ("eos_token_id", [True]),
    ("pad_token_id", -1), ("pad_token_id", 1.5), ("pad_token_id", "0"),
    ("seed", 1.5), ("seed", "1"),
]


@pytest.mark.parametrize("field, value", INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_value_names_the_field(field, value):
    kw = {field: value}
    with pytest.raises(ValueError) as info:
        SamplingParams(**kw)
    assert f"`{field}`" in str(info.value)


@pytest.mark.parametrize("t_max, t_min", [(0.3, 0.4), (0.1, 0.8), (0.4, 0.40001)])
def test_t_max_below_t_min(t_max, t_min):
    with pytest.raises(ValueError, match="`t_max`"):
        SamplingParams(t_max=t_max, t_min=t_min)


def test_defaults_are_the_spec():
    p = SamplingParams()
    assert {f.name: getattr(p, f.name) for f in dataclasses.fields(p)} == SPEC_DEFAULTS


def test_valid_edge_cases():
    p = SamplingParams(t_max=0.5, t_min=0.5)
    assert p.temperature(1) == p.temperature(p.max_denoising_steps) == 0.5
    assert SamplingParams(confidence_threshold=0).confidence_threshold == 0
    assert SamplingParams(eos_token_id=5).eos_token_id == (5,)
    assert SamplingParams(eos_token_id=[]).eos_token_id == ()
    assert SamplingParams(eos_token_id=()).eos_token_id == ()
    assert SamplingParams(eos_token_id=[1, 106]).eos_token_id == (1, 106)
    assert SamplingParams(eos_token_id=(0,)).eos_token_id == (0,)
    assert SamplingParams(eos_token_id=None).eos_token_id is None
    assert SamplingParams(pad_token_id=0).pad_token_id == 0
    assert SamplingParams(seed=0).seed == 0 and SamplingParams(seed=-7).seed == -7
    assert SamplingParams(stability_threshold=0).stability_threshold == 0
    assert SamplingParams(max_new_tokens=1, max_denoising_steps=1).max_denoising_steps == 1
    assert SamplingParams(entropy_bound=1e-9, t_max=3, t_min=2).t_max == 3  # ints are numbers


def test_replace_revalidates_and_normalises():
    p = SamplingParams()
    assert p.replace(eos_token_id=[2, 3]).eos_token_id == (2, 3)
    with pytest.raises(ValueError, match="`max_new_tokens`"):
        p.replace(max_new_tokens=0)
    assert p.max_new_tokens == 256  # frozen, unchanged
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.t_max = 1.0


@pytest.mark.parametrize("t_max, t_min, n", [(0.8, 0.4, 48), (1.0, 0.2, 4), (0.5, 0.5, 10), (2.0, 0.1, 1)])
def test_temperature_schedule(t_max, t_min, n):
    p = SamplingParams(t_max=t_max, t_min=t_min, max_denoising_steps=n)
    assert p.temperature(n) == pytest.approx(t_max)
    assert p.temperature(1) == pytest.approx(t_min + (t_max - t_min) / n)
    for step in range(1, n + 1):
        assert p.temperature(step) == pytest.approx(t_min + (t_max - t_min) * step / n)
    temps = [p.temperature(s) for s in range(n, 0, -1)]
    assert temps == sorted(temps, reverse=True)  # counting down from N, it cools
    assert all(t >= t_min for t in temps)


def test_from_generation_config_nulls_and_absent_keep_defaults():
    nulls = {"max_new_tokens": None, "max_denoising_steps": None, "t_max": None, "t_min": None,
             "stability_threshold": None, "confidence_threshold": None, "sampler_config": None,
             "eos_token_id": None, "return_dict_in_generate": True, "transformers_version": "5.23.0"}
    assert SamplingParams.from_generation_config(nulls) == SamplingParams()
    assert SamplingParams.from_generation_config({}) == SamplingParams()
    assert SamplingParams.from_generation_config(None) == SamplingParams()
    assert SamplingParams.from_generation_config({"sampler_config": {"entropy_bound": None}}) == SamplingParams()


def test_from_generation_config_overlays_values():
    gen = {"max_new_tokens": 64, "max_denoising_steps": 32, "t_max": 1.0, "t_min": None,
           "stability_threshold": 2, "confidence_threshold": 0, "eos_token_id": [1, 106], "pad_token_id": 0,
           "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.2}}
    p = SamplingParams.from_generation_config(gen)
    assert (p.max_new_tokens, p.max_denoising_steps, p.t_max, p.t_min) == (64, 32, 1.0, 0.4)
    assert (p.stability_threshold, p.confidence_threshold) == (2, 0)
    assert p.eos_token_id == (1, 106) and p.pad_token_id == 0
    assert p.entropy_bound == 0.2


def test_from_generation_config_overrides_win_and_none_overrides_are_ignored():
    gen = {"max_new_tokens": 64, "sampler_config": {"entropy_bound": 0.2}, "eos_token_id": 1}
    p = SamplingParams.from_generation_config(gen, max_new_tokens=8, entropy_bound=0.3, t_min=None, seed=3)
    assert (p.max_new_tokens, p.entropy_bound, p.t_min, p.seed) == (8, 0.3, 0.4, 3)
    assert p.eos_token_id == (1,)


def test_from_generation_config_ignores_seed_and_canvases_in_the_file():
    p = SamplingParams.from_generation_config({"seed": 5, "initial_canvas": [1, 2, 3], "pinned_canvas": [4]})
    assert p.seed is None and p.initial_canvas is None and p.pinned_canvas is None


def test_from_generation_config_validates():
    with pytest.raises(ValueError, match="`max_denoising_steps`"):
        SamplingParams.from_generation_config({"max_denoising_steps": 0})
    with pytest.raises(ValueError, match="`entropy_bound`"):
        SamplingParams.from_generation_config({"sampler_config": {"entropy_bound": -1}})
    with pytest.raises(ValueError, match="`t_max`"):
        SamplingParams.from_generation_config({"t_max": 0.2})  # below the default t_min 0.4
