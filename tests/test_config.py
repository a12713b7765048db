"""Config reading: both head-dim serialisations, defaults, ConfigError cases, generation_config.json."""

from __future__ import annotations

import copy
import json

import pytest

import dgemma
from dgemma.config import FULL, SLIDING, ModelConfig
from dgemma.errors import ConfigError

from conftest import ODD, TINY
from conftest import SPEC_DEFAULTS, _copy, _load_error, _write_config  # noqa: F401

# ---------------------------------------------------------------------------------------------- config schema
def _per_layer_form(raw: dict) -> dict:
    """``raw`` with the global head shape moved into ``per_layer_config`` (newer transformers form)."""
    out = copy.deepcopy(raw)
    text = out["text_config"]
    hd, kv = text.pop("global_head_dim"), text.pop("num_global_key_value_heads")
    text["per_layer_config"] = {str(i): {"head_dim": hd, "num_key_value_heads": kv}
                                for i, t in enumerate(text["layer_types"]) if t == FULL}
    return out


def _global_form(raw: dict) -> dict:
    """``raw`` with ``per_layer_config`` replaced by ``global_head_dim`` / ``num_global_key_value_heads``."""
    out = copy.deepcopy(raw)
    text = out["text_config"]
    per_layer = text.pop("per_layer_config")
    (shape,) = {(v["head_dim"], v["num_key_value_heads"]) for v in per_layer.values()}
    text["global_head_dim"], text["num_global_key_value_heads"] = shape
    return out


def test_both_head_dim_serialisations_give_the_same_layers(ckpt_factory):
    odd_global = ModelConfig.from_hf_dict(ODD)
    assert [(s.layer_type, s.head_dim, s.num_kv_heads) for s in odd_global.layers] == [
        (SLIDING, 12, 3), (SLIDING, 12, 3), (FULL, 24, 2)]
    odd_per_layer = ModelConfig.from_hf_dict(_per_layer_form(ODD))
    saved = json.loads((ckpt_factory("odd") / "config.json").read_text())  # as transformers wrote it
    odd_saved = ModelConfig.from_hf_dict(saved)
    assert odd_per_layer.layers == odd_global.layers == odd_saved.layers
    assert odd_per_layer == odd_global == odd_saved

    tiny_per_layer = ModelConfig.from_hf_dict(TINY)
    tiny_global = ModelConfig.from_hf_dict(_global_form(TINY))
    assert tiny_per_layer.layers == tiny_global.layers
    assert [s.head_dim for s in tiny_global.layers] == [16, 32, 16, 32]
    assert [s.num_kv_heads for s in tiny_global.layers] == [2, 1, 2, 1]


def _bare(n_layers: int, **text) -> dict:
    base = copy.deepcopy(TINY)
    t = base["text_config"]
    t.update(num_hidden_layers=n_layers, **text)
    for k in ("layer_types", "per_layer_config"):
        t.pop(k, None)
    return base


@pytest.mark.parametrize("n, fulls", [(12, {5, 11}), (8, {5, 7}), (4, {3}), (1, {0}), (13, {5, 11, 12})])
def test_default_layer_types(n, fulls):
    cfg = ModelConfig.from_hf_dict(_bare(n))
    assert [s.layer_type for s in cfg.layers] == [FULL if i in fulls else SLIDING for i in range(n)]
    # without per_layer_config or global_head_dim, full layers get the default global head dim
    for s in cfg.layers:
        assert (s.head_dim, s.num_kv_heads) == ((512, 2) if s.layer_type == FULL else (16, 2))


def test_last_layer_forced_to_full_attention():
    raw = copy.deepcopy(ODD)
    raw["text_config"]["layer_types"] = [SLIDING] * 3
    assert [s.layer_type for s in ModelConfig.from_hf_dict(raw).layers] == [SLIDING, SLIDING, FULL]
    raw["text_config"]["layer_types"] = None  # null: the default pattern
    assert [s.layer_type for s in ModelConfig.from_hf_dict(raw).layers] == [SLIDING, SLIDING, FULL]


def _set(path: tuple, value):
    def edit(raw):
        target = raw
        for k in path[:-1]:
            target = target[k]
        target[path[-1]] = value
    return edit


BAD_CONFIGS = {
    "model_type": (_set(("model_type",), "gemma3"), "gemma3"),
    "tie_top": (_set(("tie_word_embeddings",), False), "tie_word_embeddings"),
    "tie_text": (_set(("text_config", "tie_word_embeddings"), False), "tie_word_embeddings"),
    "activation": (_set(("text_config", "hidden_activation"), "relu"), "relu"),
    "layer_types_len": (_set(("text_config", "layer_types"), [SLIDING, FULL]), "layer_types"),
    "layer_type_name": (_set(("text_config", "layer_types"), [SLIDING, "chunked_attention", FULL]),
                        "chunked_attention"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_config_errors(case):
    edit, needle = BAD_CONFIGS[case]
    raw = copy.deepcopy(ODD)
    edit(raw)
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_hf_dict(raw)
    assert needle in str(info.value)


@pytest.mark.parametrize("case", ["model_type", "tie_top", "activation", "layer_types_len"])
def test_loader_wraps_config_errors(ckpt_factory, tmp_path, case):
    ckpt = _copy(ckpt_factory("odd"), tmp_path)
    edit, needle = BAD_CONFIGS[case]
    _write_config(ckpt, edit)
    msg = _load_error(ckpt)
    assert str(ckpt / "config.json") in msg and needle in msg


# ---------------------------------------------------------------------------------------------- generation config
def _defaults_dict(p) -> dict:
    return {k: getattr(p, k) for k in SPEC_DEFAULTS}


def test_generation_config_nulls_give_spec_defaults(ckpt_factory):
    path = ckpt_factory("tiny")
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen.get("t_max", "absent") is None  # precondition: transformers wrote nulls
    engine = dgemma.load(path)
    assert _defaults_dict(engine.defaults) == SPEC_DEFAULTS
    assert engine.defaults.eos_token_id == (1,)  # the model's


def test_absent_generation_config_gives_spec_defaults(tiny):
    (tiny / "generation_config.json").unlink()
    engine = dgemma.load(tiny)
    assert _defaults_dict(engine.defaults) == SPEC_DEFAULTS
    assert engine.defaults.eos_token_id == (1,)


def test_generation_config_values_are_honoured(tiny):
    gen = {"sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.2},
           "eos_token_id": [1, 106], "max_denoising_steps": 32, "t_max": None, "confidence_threshold": 0}
    (tiny / "generation_config.json").write_text(json.dumps(gen))
    d = dgemma.load(tiny).defaults
    assert d.entropy_bound == 0.2 and d.eos_token_id == (1, 106)
    assert d.max_denoising_steps == 32 and d.confidence_threshold == 0
    assert d.t_max == 0.8 and d.t_min == 0.4 and d.max_new_tokens == 256


def test_invalid_generation_config_json(tiny):
    (tiny / "generation_config.json").write_text("{oops")
    msg = _load_error(tiny)
    assert "generation_config.json" in msg



@pytest.mark.parametrize("gen", [{"max_denoising_steps": 0}, {"t_max": 0.1, "t_min": 0.5},
                                 {"eos_token_id": "x"}])
def test_invalid_generation_config_values_name_the_file(tiny, gen):
    (tiny / "generation_config.json").write_text(json.dumps(gen))
    with pytest.raises(dgemma.DgemmaError) as info:
        dgemma.load(tiny)
    assert "generation_config.json" in str(info.value)


@pytest.mark.parametrize("raw", [TINY, ODD], ids=["tiny", "odd"])
def test_config_built_in_code_writes_a_transformers_config(raw):
    """A config with no original config.json (built in code) serialises to one transformers accepts."""
    import dataclasses

    from transformers import DiffusionGemmaConfig

    cfg = dataclasses.replace(ModelConfig.from_hf_dict(copy.deepcopy(raw)), hf_config={})
    written = cfg.to_hf_dict()
    assert ModelConfig.from_hf_dict(written) == cfg
    hf = DiffusionGemmaConfig(**copy.deepcopy(written))
    assert ModelConfig.from_hf_dict(hf.to_dict()) == cfg
