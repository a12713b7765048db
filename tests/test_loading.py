"""Checkpoint loading and saving: strictness, corrupt files, configs, Hub offline, mmap, save round trip.

Every failure a user can cause must surface as ``dgemma.errors.LoadError`` (or ``ConfigError`` straight
from ``ModelConfig``) whose message names the offending tensor, file or field.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dgemma
from dgemma import loading
from dgemma.cache import KVCache
from dgemma.config import FULL, SLIDING, ModelConfig
from dgemma.errors import LoadError

from conftest import _copy, _load_error, _write_config


def _rewrite(ckpt: Path, edit, file: str = "model.safetensors") -> None:
    """Load ``file``'s tensors, let ``edit`` change the dict in place, write it back."""
    tensors = load_file(ckpt / file)
    edit(tensors)
    save_file(tensors, str(ckpt / file), metadata={"format": "pt"})



# ---------------------------------------------------------------------------------------------- strict tensors
@pytest.mark.parametrize("key", ["model.decoder.layers.1.self_attn.k_proj.weight",
                                 "model.encoder.language_model.layers.2.layer_scalar",
                                 "model.decoder.layers.3.layer_scalar",
                                 "model.decoder.embed_tokens.weight"])
def test_missing_tensor_is_named(tiny, key):
    _rewrite(tiny, lambda t: t.pop(key))
    msg = _load_error(tiny)
    assert key in msg and "missing" in msg


def test_unexpected_tensor_is_named(tiny):
    key = "model.decoder.layers.0.foo.weight"
    _rewrite(tiny, lambda t: t.__setitem__(key, torch.zeros(3, 4)))
    msg = _load_error(tiny)
    assert key in msg and "unexpected" in msg


def test_wrongly_shaped_tensor_is_named_with_both_shapes(tiny):
    key = "model.decoder.layers.1.self_attn.k_proj.weight"
    good = list(load_file(tiny / "model.safetensors")[key].shape)
    assert good == [32, 64]  # 1 KV head of dim 32 on the full layer, hidden 64
    _rewrite(tiny, lambda t: t.__setitem__(key, torch.zeros(31, 64)))
    msg = _load_error(tiny)
    assert key in msg and "[31, 64]" in msg and str(good) in msg


def test_vision_tensors_are_skipped_with_one_warning(ckpt_factory, caplog):
    path = ckpt_factory("tiny")
    keys = load_file(path / "model.safetensors").keys()
    n_vision = sum(k.startswith(("model.encoder.vision_tower.", "model.encoder.embed_vision.")) for k in keys)
    assert n_vision > 1  # precondition: the fixture checkpoint does hold vision tensors
    with caplog.at_level(logging.WARNING, logger="dgemma"):
        engine = dgemma.load(path)
    records = [r for r in caplog.records if r.name == "dgemma"]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].levelno == logging.WARNING and "vision" in records[0].getMessage()
    assert not any(n.startswith(("vision", "embed_vision")) for n in engine.model.state_dict())


# ---------------------------------------------------------------------------------------------- bad files
@pytest.mark.parametrize("content", ["garbage", "torch.save"])
def test_pickle_only_directory_is_refused_without_unpickling(tiny, monkeypatch, content):
    state = load_file(tiny / "model.safetensors")
    (tiny / "model.safetensors").unlink()
    if content == "garbage":
        # Unpickling these bytes would raise an UnpicklingError, not a LoadError.
        (tiny / "pytorch_model.bin").write_bytes(b"\x80\x05garbage, never unpickle me" * 10)
    else:
        torch.save(state, tiny / "pytorch_model.bin")

    import pickle

    def boom(*a, **k):
        raise AssertionError("dgemma unpickled a checkpoint")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    msg = _load_error(tiny)
    assert "safetensors" in msg and "pickle" in msg and "pytorch_model.bin" in msg


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(4096))


def _bad_header_json(path: Path) -> None:
    body = b"{this is not json" + b" " * 47
    path.write_bytes(len(body).to_bytes(8, "little") + body + b"\0" * 256)


def _huge_header_len(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:8] = (2**62).to_bytes(8, "little")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("corrupt", [_truncate, _garbage, _bad_header_json, _huge_header_len],
                         ids=["truncated", "garbage", "bad-header-json", "huge-header-length"])
def test_corrupt_safetensors_is_a_load_error_naming_the_file(tiny, corrupt):
    corrupt(tiny / "model.safetensors")
    msg = _load_error(tiny)
    assert str(tiny / "model.safetensors") in msg


def test_sharded_checkpoint_matches_unsharded(ckpt_factory):
    sharded, single = ckpt_factory("tiny", shard=True), ckpt_factory("tiny")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (sharded / "model.safetensors.index.json").is_file()
    assert not (sharded / "model.safetensors").exists()
    a = dgemma.load(sharded).model.state_dict()
    b = dgemma.load(single).model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_index_naming_a_missing_shard(ckpt_factory, tmp_path):
    ckpt = _copy(ckpt_factory("tiny", shard=True), tmp_path)
    gone = sorted(ckpt.glob("model-*.safetensors"))[1]
    gone.unlink()
    msg = _load_error(ckpt)
    assert gone.name in msg


def test_no_safetensors_at_all(tiny):
    (tiny / "model.safetensors").unlink()
    msg = _load_error(tiny)
    assert "safetensors" in msg and str(tiny) in msg


# ---------------------------------------------------------------------------------------------- paths and configs
def test_no_config_json(tiny):
    (tiny / "config.json").unlink()
    msg = _load_error(tiny)
    assert "config.json" in msg and str(tiny) in msg


@pytest.mark.parametrize("text", ["{not json", "", '{"text_config": {"vocab_size": 512,}}'])
def test_invalid_json_config(tiny, text):
    (tiny / "config.json").write_text(text)
    msg = _load_error(tiny)
    assert "config.json" in msg and "JSON" in msg


def test_config_json_that_is_not_an_object(tiny):
    (tiny / "config.json").write_text("[1, 2, 3]")
    msg = _load_error(tiny)
    assert "config.json" in msg


def test_config_json_with_non_utf8_bytes(tiny):
    (tiny / "config.json").write_bytes(b"\xff\xfe\x00garbage\x9c\x80")
    msg = _load_error(tiny)
    assert "config.json" in msg


def test_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "no" / "such" / "checkpoint"
    msg = _load_error(missing)
    assert str(missing) in msg
    assert "\n" not in msg


def test_file_path_instead_of_directory(tiny):
    msg = _load_error(tiny / "model.safetensors")
    assert str(tiny / "model.safetensors") in msg and "directory" in msg


def test_hub_id_offline_and_not_cached(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    home = tmp_path / "hf_home"
    (home / "hub").mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    # huggingface_hub reads these once at import; patch the module constants it consults at call time.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(home / "hub"))

    def no_network(*a, **k):
        raise AssertionError("the test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)

    repo = "google/diffusiongemma-26B-A4B-it"
    with pytest.raises(LoadError) as info:
        dgemma.load(repo)
    err = info.value
    msg = str(err)
    assert repo in msg
    assert "cache" in msg and "offline" in msg.lower()
    assert "\n" not in msg and msg.rstrip(".").count(". ") == 0  # one sentence
    assert err.__cause__ is None and err.__suppress_context__ is True


# ---------------------------------------------------------------------------------------------- dtype / device
def test_dtype_bfloat16(ckpt_factory):
    model = dgemma.load(ckpt_factory("tiny"), dtype="bfloat16").model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.dtype == torch.bfloat16
    model = dgemma.load(ckpt_factory("tiny"), dtype=torch.bfloat16, device="cpu").model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_dtype_string_forms(ckpt_factory):
    model = dgemma.load(ckpt_factory("odd"), dtype="torch.float32").model
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize("bad", ["nonsense", "Tensor", "float128"])
def test_bad_dtype_is_value_error(ckpt_factory, bad):
    with pytest.raises(ValueError, match="dtype"):
        dgemma.load(ckpt_factory("tiny"), dtype=bad)


# ---------------------------------------------------------------------------------------------- memory mapping
def _anon_rss() -> int:
    gc.collect()
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_load_is_memory_mapped_without_a_second_copy(ckpt_factory, tmp_path):
    raw = {"model_type": "diffusion_gemma", "canvas_length": 16, "tie_word_embeddings": True, "text_config": {
        "vocab_size": 100_000, "hidden_size": 256, "intermediate_size": 64, "moe_intermediate_size": 16,
        "num_experts": 2, "top_k_experts": 1, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 32, "global_head_dim": 32, "sliding_window": 16,
        "layer_types": [SLIDING, FULL]}}
    cfg = ModelConfig.from_hf_dict(raw)
    model = loading.build_model(cfg)
    loading.save_checkpoint(model, tmp_path / "big")
    del model
    size = (tmp_path / "big" / "model.safetensors").stat().st_size
    assert size > 100e6
    # Warm up: the first model build on the meta device imports a lot of torch (sympy, ...), ~70 MB.
    loading.load_weights(ckpt_factory("tiny"))

    before = _anon_rss()
    loaded, cfg2, _, _ = loading.load_weights(tmp_path / "big")
    after = _anon_rss()
    assert cfg2.layers == cfg.layers
    assert loaded.embed_tokens.weight.shape == (100_000, 256)
    growth = after - before
    assert growth < 0.25 * size, f"anonymous RSS grew {growth / 1e6:.1f} MB for a {size / 1e6:.1f} MB file"
    # the weights are really there (reading the mapped pages is fine: they stay file-backed)
    assert float(loaded.embed_tokens.weight.detach().float().std()) == pytest.approx(0.02, rel=0.05)
    assert _anon_rss() - before < 0.25 * size


# ---------------------------------------------------------------------------------------------- saving
def _legacy_odd(ckpt_factory, tmp_path) -> Path:
    """The odd checkpoint with its config.json in the older global_head_dim serialisation."""
    ckpt = _copy(ckpt_factory("odd"), tmp_path, "odd_legacy")

    def edit(raw):
        text = raw["text_config"]
        text.pop("per_layer_config")
        text["global_head_dim"], text["num_global_key_value_heads"] = 24, 2

    _write_config(ckpt, edit)
    return ckpt


@pytest.mark.parametrize("name", ["tiny", "odd_legacy"])
def test_save_load_round_trip_and_transformers_parity(ckpt_factory, hf_model_factory, tmp_path, name):
    src = _legacy_odd(ckpt_factory, tmp_path) if name == "odd_legacy" else ckpt_factory(name)
    engine = dgemma.load(src)
    out = tmp_path / "saved"
    engine.save_pretrained(out)
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json"):
        assert (out / f).is_file(), f
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]

    again = dgemma.load(out)
    a, b = engine.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert again.config == engine.config
    assert again.defaults == engine.defaults

    hf = hf_model_factory(out)
    cfg = engine.config
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=g)
    canvas = torch.randint(0, cfg.vocab_size, (2, cfg.canvas_length), generator=g)
    with torch.no_grad():
        cache = KVCache(cfg, 2, 9 + cfg.canvas_length, dtype=torch.float32)
        again.model.encode(ids, cache)
        ours = again.model.decode(canvas, cache)
        ref = hf(input_ids=ids, decoder_input_ids=canvas).logits
    assert ours.shape == ref.shape == (2, cfg.canvas_length, cfg.vocab_size)
    assert (ours - ref).abs().max() <= 1e-4
    assert ref.abs().max() > 0.05


def test_interrupted_save_keeps_the_previous_checkpoint(ckpt_factory, tmp_path, monkeypatch):
    engine = dgemma.load(ckpt_factory("tiny"))
    out = tmp_path / "saved"
    engine.save_pretrained(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_save_file = loading.save_file

    class Killed(Exception):
        pass

    def half_then_die(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise Killed("killed mid-write")

    monkeypatch.setattr(loading, "save_file", half_then_die)
    with pytest.raises(Killed):
        engine.save_pretrained(out)
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after.keys() == before.keys()  # no stray temp files
    assert after["model.safetensors"] == before["model.safetensors"]
    monkeypatch.undo()
    reloaded = dgemma.load(out).model.state_dict()
    for k, v in engine.model.state_dict().items():
        assert torch.equal(v, reloaded[k]), k


def test_save_into_a_new_nested_directory(ckpt_factory, tmp_path):
    engine = dgemma.load(ckpt_factory("odd"))
    out = engine.save_pretrained(tmp_path / "a" / "b")
    assert Path(out) == tmp_path / "a" / "b"
    assert json.loads((out / "config.json").read_text())["text_config"]["vocab_size"] == 389


def test_saved_config_dtype_matches_saved_weights(ckpt_factory, tmp_path):
    src = ckpt_factory("tiny")
    assert json.loads((src / "config.json").read_text()).get("dtype") == "float32"
    out = dgemma.load(src, dtype="bfloat16").save_pretrained(tmp_path / "bf16")
    assert load_file(out / "model.safetensors")["model.decoder.embed_tokens.weight"].dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text()).get("dtype") == "bfloat16"


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_default_dtype_follows_the_cpus_bf16_support(ckpt_factory, tmp_path, monkeypatch, fast_bf16):
    """A bf16 checkpoint stays bf16 on a CPU with bf16 hardware and loads as fp32 where bf16 is emulated."""
    src = dgemma.load(ckpt_factory("tiny"), dtype="bfloat16").save_pretrained(tmp_path / "bf16")
    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda: fast_bf16)
    assert dgemma.load(src).model.dtype == (torch.bfloat16 if fast_bf16 else torch.float32)
    assert dgemma.load(src, dtype="bfloat16").model.dtype == torch.bfloat16  # an explicit dtype always wins
    assert loading.default_dtype("meta") is None  # only the CPU is second-guessed
