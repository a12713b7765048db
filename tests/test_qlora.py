"""QLoRA: LoRA adapters trained on a frozen int4 base (dgemma.quant.lora, model.quant in the train config).

The quantised model with adapters equals the float model holding the dequantised weights with the same adapter
applied by peft (outputs and adapter gradients); training moves only the adapters and the loss falls; the saved
adapter is a plain peft adapter that ``dgemma merge`` folds into the float checkpoint; resume continues the
same loss curve; bad configs are one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dgemma
from dgemma.cache import KVCache
from dgemma.cli import main as dgemma_main
from dgemma.loading import build_model, load_weights, save_checkpoint
from dgemma.model.moe import _GROUPED_MM
from dgemma.quant.modules import QuantizedWeight
from dgemma.quant import lora as qlora
from dgemma.tokenizer import Tokenizer, write_test_tokenizer
from dgemma.train import config, lora, model_setup
from dgemma.train.trainer import Trainer
from conftest import reverse_task

LORA = {"enabled": True, "rank": 4, "alpha": 8.0, "experts": True}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A tokenizer, reversal data and a random tiny float checkpoint (the base)."""
    d = tmp_path_factory.mktemp("qlora")
    write_test_tokenizer(d / "tok", 272)
    tok = Tokenizer.from_dir(d / "tok")
    raw = {"model": {"preset": "tiny", "tokenizer": str(d / "tok")}, "data": {"train": "x"}}
    model_cfg = model_setup.scratch_config(config.from_dict(raw), tok)
    model = build_model(model_cfg, device="cpu", dtype=torch.float32, seed=0)
    save_checkpoint(model, d / "base", model_setup._scratch_generation(tok, model_cfg))
    tok.save(d / "base")
    return {"base": d / "base", "train": reverse_task(d / "train.jsonl", 200, 0)}


def _cfg(task, out: Path, **sections) -> config.TrainConfig:
    raw = {
        "model": {"init": str(task["base"]), "quant": "int4"},
        "data": {"train": str(task["train"]), "max_length": 64},
        "lora": dict(LORA),
        "train": {"out": str(out), "steps": 4, "batch_size": 4, "micro_batch": 4, "lr": 2e-2, "min_lr": 2e-3,
                  "warmup": 0, "log_every": 1, "save_every": 2, "precision": "fp32"},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config.from_dict(raw)


def _run(cfg, resume=False):
    return Trainer(cfg, show_progress=False, log=lambda msg: None).run(resume=resume)


def _losses(out: Path) -> list[tuple[int, float]]:
    lines = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines() if ln.strip()]
    return [(e["step"], e["loss"]) for e in lines if "loss" in e]


def _float_path(name: str) -> str:
    return name.replace("base_model.model.", "").replace(".base_layer", "")


def _dequantized_twin(qmodel, base: Path):
    """The float model whose weights are ``qmodel``'s codes dequantised (fp32)."""
    fmodel = load_weights(base, dtype=torch.float32)[0]
    state = {}
    for name, m in qmodel.named_modules():
        if isinstance(m, qlora.FrozenQuantizedLinear):
            state[_float_path(name) + ".weight"] = m.q.dequantize(torch.float32)
        elif isinstance(m, qlora.FrozenQuantizedExperts):
            for t in qlora.NESTING:
                state[f"{_float_path(name)}.{t}"] = m.weight(t).dequantize(torch.float32)
    missing, unexpected = fmodel.load_state_dict(state, strict=False)
    assert not unexpected and len(state) > 0
    return fmodel


def _decode(model, prompt, canvas):
    cache = KVCache(model.cfg, 1, prompt.shape[1], device="cpu", dtype=torch.float32)
    model.encode(prompt, cache)
    return model.decode(canvas, cache)


def test_quantized_lora_equals_peft_on_the_dequantized_float_model(task):
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    setup = model_setup.build(_cfg(task, Path("unused")), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero B matrices: every adapter changes the output
        for n, p in setup.net.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    adapter = get_peft_model_state_dict(setup.net)
    assert any(".experts.lora_A" in k for k in adapter) and any(".experts.base_layer.lora_A" in k for k in adapter)
    fmodel = _dequantized_twin(setup.net, task["base"])
    fpeft = lora.apply(fmodel, config.LoraSection(**LORA), None)  # peft's own ParamWrapper on the experts
    want = get_peft_model_state_dict(fpeft)
    assert {k: v.shape for k, v in adapter.items()} == {k: v.shape for k, v in want.items()}  # peft's layout
    assert not set_peft_model_state_dict(fpeft, adapter).unexpected_keys
    prompt = torch.randint(0, fmodel.cfg.vocab_size, (1, 9), generator=g)
    canvas = torch.randint(0, fmodel.cfg.vocab_size, (1, fmodel.cfg.canvas_length), generator=g)
    outs, grads = [], []
    for net in (setup.net, fpeft):
        out = _decode(net.get_base_model(), prompt, canvas)
        out.float().pow(2).mean().backward()
        outs.append(out.detach())
        grads.append({n.replace(".default", ""): p.grad for n, p in net.named_parameters() if p.requires_grad})
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and all(n.count("lora_") == 1 for n in grads[0])
    for n, gq in grads[0].items():
        torch.testing.assert_close(gq, grads[1][n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    with torch.no_grad():  # the adapter switched off: the dequantised base itself
        with setup.net.disable_adapter():
            plain = _decode(setup.net.get_base_model(), prompt, canvas)
        twin = _decode(_dequantized_twin(setup.net, task["base"]), prompt, canvas)
    torch.testing.assert_close(plain, twin, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(_GROUPED_MM is None, reason="this torch has no grouped_mm")
def test_grouped_gemm_path_equals_the_expert_loop(task, monkeypatch):
    """CUDA's grouped path, run on the CPU: runs of experts dequantised apart, value and input gradient; then
    the whole model with grouped GEMMs for the quantised experts and their adapters (values only: the CPU
    grouped_mm has no backward for a weight that needs a gradient)."""
    torch.manual_seed(0)
    w = QuantizedWeight(torch.randn(6, 32, 16), "int4", 8)
    counts = torch.tensor([3, 0, 5, 2, 0, 4])
    offs = counts.cumsum(0).to(torch.int32)
    xs = torch.randn(int(counts.sum()), 16, requires_grad=True)
    ref = torch.cat([x @ w.dequantize(torch.float32, e).T for e, x in enumerate(xs.split(counts.tolist()))])
    for budget in (1 << 28, 32 * 16 * 4 * 2, 1):  # one run, runs of two experts, expert by expert
        monkeypatch.setattr(qlora, "DEQUANT_BYTES", budget)
        y = qlora.GroupedQuantizedProduct.apply(xs, w, offs)
        g = torch.randn_like(y)
        torch.testing.assert_close(y, ref)
        want = torch.autograd.grad(ref, xs, g, retain_graph=True)[0]
        torch.testing.assert_close(torch.autograd.grad(y, xs, g)[0], want)

    setup = model_setup.build(_cfg(task, Path("unused")), torch.device("cpu"))
    with torch.no_grad():
        for n, p in setup.net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model = setup.net.get_base_model()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 9), generator=g)
    canvas = torch.randint(0, model.cfg.vocab_size, (1, model.cfg.canvas_length), generator=g)
    monkeypatch.setattr(qlora, "grouped_gemm", lambda xs: True)
    outs = []
    for grouped in (False, True):
        for layer in model.layers:
            layer.experts.grouped = grouped
        with torch.no_grad():
            outs.append(_decode(model, prompt, canvas))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_gives_the_same_step_and_trains_only_adapters(task, tmp_path):
    steps = []
    for ckpt in (True, False):
        trainer = Trainer(_cfg(task, tmp_path / str(ckpt), train={"activation_checkpointing": ckpt}),
                          show_progress=False, log=lambda msg: None)
        trained = [n for n, p in trainer.objective.named_parameters() if p.requires_grad]
        assert trained and all("lora_" in n for n in trained)
        codes = {n: b.clone() for n, b in trainer.objective.named_buffers() if n.endswith(".codes")}
        steps.append(trainer.train_step(0))
        assert all(torch.equal(b, codes[n]) for n, b in trainer.objective.named_buffers() if n in codes)
    assert steps[0]["grad_norm"] > 0
    for key in ("loss", "grad_norm"):
        assert steps[0][key] == pytest.approx(steps[1][key], rel=1e-5, abs=1e-6), key


def test_qlora_run_learns_resumes_and_merges_into_the_float_checkpoint(task, tmp_path, monkeypatch):
    straight = _run(_cfg(task, tmp_path / "straight", lora={"merge_at_end": False}))
    curve = _losses(tmp_path / "straight")
    assert curve[-1][1] < curve[0][1] - 0.5, curve
    real_step = Trainer.train_step

    def crash_at_4(self, step):
        if step == 3:
            raise KeyboardInterrupt  # after the step-2 checkpoint
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "train_step", crash_at_4)
    with pytest.raises(KeyboardInterrupt):
        _run(_cfg(task, tmp_path / "resumed", lora={"merge_at_end": False}))
    monkeypatch.setattr(Trainer, "train_step", real_step)
    _run(_cfg(task, tmp_path / "resumed", lora={"merge_at_end": False}), resume=True)
    got = _losses(tmp_path / "resumed")
    assert [s for s, _ in got] == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(curve), atol=1e-6, rtol=0)

    saved = json.loads((straight.adapter / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(task["base"])
    assert sorted(saved["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"]
    # `dgemma merge` in this process (a new one spends ~15 s importing peft)
    assert dgemma_main(["merge", str(straight.adapter), "--out", str(tmp_path / "merged")]) in (0, None)
    merged = dgemma.load(tmp_path / "merged").model
    assert merged.dtype == torch.float32 and not any(n.endswith(".codes") for n, _ in merged.named_buffers())
    # merged - float base == what the trained QLoRA layers add to the dequantised codes (read through products)
    setup = model_setup.build(_cfg(task, tmp_path / "straight"), torch.device("cpu"))
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(setup.net, load_file(straight.adapter / "adapter_model.safetensors"))
    base = load_weights(task["base"], dtype=torch.float32)[0].state_dict()
    got_w = merged.state_dict()
    checked = 0
    with torch.no_grad():
        for name, m in setup.net.named_modules():
            if isinstance(m, qlora.LoraQuantizedLinear):
                w = _float_path(name) + ".weight"
                eye = torch.eye(m.in_features)
                delta = (m(eye) - m.base_layer(eye)).T
                torch.testing.assert_close(got_w[w] - base[w], delta, atol=1e-5, rtol=1e-4)
                checked += 1
            elif isinstance(m, qlora.ExpertLora) and not isinstance(m.base_layer, qlora.ExpertLora):
                outer = next(o for o in setup.net.modules() if isinstance(o, qlora.ExpertLora) and o.base_layer is m)
                core = m.base_layer
                for t in qlora.NESTING:
                    w = f"{_float_path(name)}.{t}"
                    for e in range(core.num_experts):
                        eye = torch.eye(core.shape_of(t)[-1])
                        delta = (outer.mm(t, e, eye) - core.mm(t, e, eye)).T
                        torch.testing.assert_close(got_w[w][e] - base[w][e], delta, atol=1e-5, rtol=1e-4)
                        checked += 1
    assert checked > 0 and any(not torch.allclose(got_w[k], base[k]) for k in base if "experts" in k)


@pytest.mark.parametrize("model, lora_on, match", [
    ({"quant": "int3"}, True, "model.quant must be one of int4, int8"),
    ({"quant": "int4"}, False, "model.quant needs lora.enabled: a quantized base is frozen"),
    ({"quant": "int4", "init": None, "preset": "tiny", "tokenizer": "bytes"}, True, "model.quant needs model.init"),
    ({"quant": "int4", "quant_group_size": 0}, True, "model.quant_group_size must be positive"),
])
def test_bad_qlora_configs_are_one_clear_line(task, tmp_path, model, lora_on, match):
    raw = {"model": {"init": str(task["base"]), **model}, "data": {"train": str(task["train"])},
           "lora": {"enabled": lora_on}}
    with pytest.raises(config.TrainConfigError, match=match) as info:
        config.from_dict(raw)
    assert "\n" not in str(info.value)


def test_a_quantized_checkpoint_is_refused_as_a_lora_base(task, tmp_path):
    from dgemma.quant.apply import quantize_model

    model, _, gen, _ = load_weights(task["base"], dtype=torch.float32)
    save_checkpoint(quantize_model(model, "int4", 64), tmp_path / "q", gen)
    Tokenizer.from_dir(task["base"]).save(tmp_path / "q")
    refused = "is a quantised checkpoint .* give its float original as"
    with pytest.raises(dgemma.DgemmaError, match=refused + " model.init") as info:
        model_setup.build(_cfg(task, tmp_path / "run", model={"init": str(tmp_path / "q")}), torch.device("cpu"))
    assert "\n" not in str(info.value)
    # Full training from it too (its codes are buffers: only norms would move, and the output would be neither
    # format), and a merge into it (peft cannot fold an adapter into codes).
    full = _cfg(task, tmp_path / "full", model={"init": str(tmp_path / "q"), "quant": None}, lora={"enabled": False})
    with pytest.raises(dgemma.DgemmaError, match=refused + " model.init"):
        model_setup.build(full, torch.device("cpu"))
    with pytest.raises(dgemma.DgemmaError, match=refused + " the base"):
        model_setup.merge_adapter(tmp_path / "q", tmp_path / "no-adapter", tmp_path / "merged")
