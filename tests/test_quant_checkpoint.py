"""The quantised checkpoint format and ``dgemma quantize``: quantising while loading equals quantising the loaded
float model; a written checkpoint loads, with the same tensors, and generates what the in-memory quantised model
generates; the bytes written are the accounting's; bad inputs are one line; transformers refuses the format
loudly instead of filling random weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import dgemma
from dgemma import loading
from dgemma.cli import main
from dgemma.errors import LoadError
from dgemma.quant import accounting, checkpoint, quantize_model
from dgemma.quant.modules import Int8Embedding, QuantizedExperts, QuantizedLinear

OPTIONS = [{"scheme": "int8"}, {"scheme": "int4"}, {"scheme": "int4", "group_size": 16, "embedding": "int8"}]


@pytest.fixture(scope="module")
def bf16_ckpt(ckpt_factory, tmp_path_factory):
    """The tiny checkpoint written in bfloat16 (the release dtype), with its tokenizer."""
    path = tmp_path_factory.mktemp("bf16")
    dgemma.load(ckpt_factory("tiny"), dtype=torch.bfloat16).save_pretrained(path)
    return path


def file_tensors(path):
    with safe_open(str(path / checkpoint.WEIGHTS_FILE), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
@pytest.mark.parametrize("name", ["tiny", "odd"])
def test_quantizing_while_loading_equals_quantizing_the_loaded_model(ckpt_factory, name, options):
    if name == "odd" and options.get("group_size") == 16:
        options = {**options, "group_size": 24}  # the odd widths (24, 48, 72, 144) take 24, not 16
    streamed = dgemma.load(ckpt_factory(name), dtype=torch.float32, quant=options).model
    after = quantize_model(dgemma.load(ckpt_factory(name), dtype=torch.float32).model, **options)
    same_state(streamed, after)
    assert streamed.quantization == after.quantization
    assert any(isinstance(m, QuantizedExperts) for m in streamed.modules())
    assert isinstance(streamed.embed_tokens, Int8Embedding) == (options.get("embedding") == "int8")


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_a_written_checkpoint_loads_the_same_tensors_and_generates_the_same(bf16_ckpt, tmp_path, options):
    engine = dgemma.load(bf16_ckpt, dtype=torch.bfloat16, quant=options)
    engine.save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "dgemma", "format_version": 1, "group_size": 64,
                                             "embedding": "bfloat16", **options}
    assert config["dtype"] == "bfloat16"
    assert not (tmp_path / "q" / "model.safetensors").exists()
    back = dgemma.load(tmp_path / "q", dtype=torch.bfloat16)
    same_state(back.model, engine.model)
    assert back.model.quantization == engine.model.quantization
    # The bytes in the file are the accounting's prediction for a bfloat16 checkpoint, exactly.
    written = sum(t.numel() * t.element_size() for t in file_tensors(tmp_path / "q").values())
    kw = {"group_size": options.get("group_size", 64), "embedding": options.get("embedding", "bfloat16")}
    assert written == accounting.total_bytes(back.model.cfg, options["scheme"], **kw)
    # The experts really are stored quantised: uint8 / int8 codes, no float expert tensor left.
    tensors = file_tensors(tmp_path / "q")
    assert tensors["model.decoder.layers.0.experts.gate_up_proj.codes"].dtype in (torch.int8, torch.uint8)
    assert "model.decoder.layers.0.experts.gate_up_proj" not in tensors
    want = engine.generate("Hello there", max_new_tokens=16, max_denoising_steps=8, seed=3)
    assert back.generate("Hello there", max_new_tokens=16, max_denoising_steps=8, seed=3).token_ids == want.token_ids


def test_quantize_command_writes_a_loadable_checkpoint(bf16_ckpt, tmp_path, capsys):
    out = tmp_path / "int4"
    assert main(["quantize", str(bf16_ckpt), str(out), "--scheme", "int4", "--group-size", "32"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    model = dgemma.load(out).model
    assert model.quantization == {"scheme": "int4", "group_size": 32, "embedding": "bfloat16"}
    assert all(not isinstance(m, torch.nn.Linear) or "router" in n for n, m in model.named_modules())
    assert any(isinstance(m, QuantizedLinear) for m in model.modules())
    same_state(model, dgemma.load(bf16_ckpt, quant={"scheme": "int4", "group_size": 32}).model)
    assert main(["generate", "--model", str(out), "--plain", "--max-new-tokens", "8", "--seed", "0", "hi"]) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    stored = json.loads(capsys.readouterr().out)["stored_quantized"]
    assert stored == {"scheme": "int4", "group_size": 32, "embedding": "bfloat16", "dtype": "bfloat16",
                      "bytes_with_bf16_float_parts": sum(t.numel() * t.element_size()
                                                         for t in file_tensors(out).values())}


@pytest.mark.parametrize("argv, match", [
    (["--scheme", "int3"], "unknown quantisation scheme `int3`"),
    (["--scheme", "int4", "--group-size", "48"], "group size 48 does not divide the width"),
    (["--scheme", "int4", "--group-size", "0"], "group_size must be a positive integer"),
    (["--scheme", "int8", "--group-size", "32"], "applies to int4 only"),
    (["--scheme", "int4", "--embedding", "int4"], "embedding"),
    (["--scheme", "int8", "--dtype", "int8"], "not a floating-point"),
])
def test_bad_quantize_options_are_one_line(bf16_ckpt, tmp_path, capsys, argv, match):
    with pytest.raises(SystemExit) as exit_:
        main(["quantize", str(bf16_ckpt), str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("dgemma: ") and "\n" not in err and match in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_a_quantized_checkpoint_is_not_quantized_again_and_out_must_be_new(bf16_ckpt, tmp_path, capsys):
    out = tmp_path / "int8"
    assert main(["quantize", str(bf16_ckpt), str(out), "--scheme", "int8"]) == 0
    capsys.readouterr()
    for argv, match in (([str(out), str(tmp_path / "again"), "--scheme", "int4"], "already quantised (int8)"),
                        ([str(bf16_ckpt), str(out), "--scheme", "int4"], "already exists"),
                        ([str(bf16_ckpt), str(bf16_ckpt), "--scheme", "int4"], "already exists")):
        with pytest.raises(SystemExit):
            main(["quantize", *argv])
        err = capsys.readouterr().err.strip()
        assert match in err and "\n" not in err, err
    with pytest.raises(LoadError, match="already quantised"):  # other options than the file's
        dgemma.load(out, quant="int4")
    assert dgemma.load(out, quant="int8").model.quantization["scheme"] == "int8"  # the same: fine
    assert dgemma.load(out, quant={"scheme": "int8"}).model.quantization["scheme"] == "int8"
    with pytest.raises(LoadError, match="already quantised"):
        dgemma.load(out, quant={"scheme": "int8", "embedding": "int8"})


def test_damaged_quantized_checkpoints_are_named(bf16_ckpt, tmp_path):
    out = tmp_path / "q"
    dgemma.load(bf16_ckpt, quant="int4").save_pretrained(out)
    tensors = file_tensors(out)
    from safetensors.torch import save_file

    key = "model.decoder.layers.1.self_attn.q_proj.weight.scale"
    save_file({k: v for k, v in tensors.items() if k != key}, str(out / checkpoint.WEIGHTS_FILE))
    with pytest.raises(LoadError, match="missing tensor model.decoder.layers.1.self_attn.q_proj.weight.scale"):
        dgemma.load(out)
    save_file({**tensors, key: tensors[key].float()}, str(out / checkpoint.WEIGHTS_FILE))
    with pytest.raises(LoadError, match="stores torch.bfloat16"):
        dgemma.load(out)
    config = json.loads((out / "config.json").read_text())
    for section, match in (({"quant_method": "gptq"}, "'gptq', which dgemma does not read"),
                           ({"quant_method": "dgemma", "format_version": 9, "scheme": "int4"}, "version 9"),
                           ({"quant_method": "dgemma", "scheme": "int2"}, "int2")):
        (out / "config.json").write_text(json.dumps({**config, "quantization_config": section}))
        with pytest.raises(LoadError, match=match):
            dgemma.load(out)
    # A float loader given codes (the section removed) names what it found.
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match="a quantised checkpoint"):
        loading.load_weights(out)


def test_saving_over_other_checkpoints_leaves_nothing_stale(ckpt_factory, bf16_ckpt, tmp_path):
    import shutil

    model = dgemma.load(bf16_ckpt, dtype=torch.bfloat16, quant="int4").model
    with pytest.raises(ValueError, match="no state="):
        loading.save_checkpoint(model, tmp_path / "s", {}, state=model.state_dict())
    # Quantised over a sharded float checkpoint: its index and shards go, so the loader reads only the new file.
    shutil.copytree(ckpt_factory("tiny", shard=True), tmp_path / "over")
    loading.save_checkpoint(model, tmp_path / "over", {})
    assert sorted(p.name for p in (tmp_path / "over").glob("*.safetensors*")) == [checkpoint.WEIGHTS_FILE]
    same_state(dgemma.load(tmp_path / "over", dtype=torch.bfloat16).model, model)
    # A float model whose config came from a quantised checkpoint is written as a float checkpoint.
    float_model = loading.build_model(loading.read_config(tmp_path / "over"), seed=0)
    loading.save_checkpoint(float_model, tmp_path / "over", {})
    assert "quantization_config" not in json.loads((tmp_path / "over" / "config.json").read_text())
    assert sorted(p.name for p in (tmp_path / "over").glob("*.safetensors*")) == ["model.safetensors"]
    assert not getattr(dgemma.load(tmp_path / "over").model, "quantization", None)


def test_transformers_refuses_a_quantized_checkpoint_instead_of_loading_random_weights(bf16_ckpt, tmp_path):
    from transformers import DiffusionGemmaForBlockDiffusion

    dgemma.load(bf16_ckpt, quant="int8").save_pretrained(tmp_path / "q")
    with pytest.raises(OSError, match="model.safetensors"):
        DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path / "q")
