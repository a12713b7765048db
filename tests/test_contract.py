"""The checkpoint contract: every directory dgemma writes loads in transformers 5.23 and means the same there.

Each writer (Engine.save_pretrained, a training run's step checkpoint and final/, a LoRA merge, `dgemma sudoku
train`, and the models shipped in the package) is loaded with ``DiffusionGemmaForBlockDiffusion`` and
``DiffusionGemmaGenerationConfig``; transformers must see the sampling values dgemma reads from
generation_config.json, and compute the same decoder logits on one canvas. dgemma's own keys (restarts, a
constant temperature, ...) live in dgemma_generation.json and survive a save/load round trip. Also: the split
itself against transformers' own validation, the older single-file layout, and the fast-bf16 detection.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion
from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

import dgemma
from dgemma import genconfig, hardware, loading
from dgemma.cache import KVCache
from dgemma.params import SamplingParams
from dgemma.train import config
from dgemma.train.trainer import Trainer, resolve_precision
from conftest import reverse_task

MODELS = Path(dgemma.__file__).resolve().parent / "models"
# Sampling defaults with every kind of key: transformers-visible values that differ from its defaults, and
# dgemma-only ones (restarts, a constant temperature, a confidence threshold of 0 = a fixed step count).
PARAMS = SamplingParams(max_new_tokens=32, max_denoising_steps=6, entropy_bound=0.3, t_max=0.3, t_min=0.3,
                        stability_threshold=2, confidence_threshold=0, restarts=2, restart_entropy=1e-9)
# Sampling values that generation_config.json holds under the same name for transformers and dgemma.
_SHARED = ("max_new_tokens", "max_denoising_steps", "t_max", "t_min", "stability_threshold", "confidence_threshold",
           "pad_token_id")


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def check_transformers_loads(path: Path) -> None:
    """``path`` loads in transformers (model and generation config), transformers holds the sampling values
    dgemma reads from generation_config.json, and its decoder logits of one canvas equal dgemma's (fp32)."""
    hf_file = _read(path / genconfig.GENERATION_FILE)
    assert genconfig.refused(hf_file) == []
    gen = DiffusionGemmaGenerationConfig.from_pretrained(path)
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32).eval()
    seen = SamplingParams.from_generation_config(hf_file)  # what dgemma makes of the file transformers reads
    for key in _SHARED:
        if key in hf_file:
            assert getattr(gen, key) == getattr(seen, key) == getattr(hf.generation_config, key), key
    if "sampler_config" in hf_file:
        assert gen.sampler_config.entropy_bound == seen.entropy_bound
    if "eos_token_id" in hf_file:
        assert tuple(gen.eos_token_id) == seen.eos_token_id

    model = dgemma.load(path, dtype=torch.float32).model
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (1, 7), generator=g)  # (1, P)
    canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=g)  # (1, C)
    with torch.no_grad():
        from transformers import DynamicCache

        ref_cache = DynamicCache(config=hf.config.get_text_config(decoder=True))
        hf.model.encoder(input_ids=prompt, past_key_values=ref_cache)
        ref = hf(decoder_input_ids=canvas, past_key_values=ref_cache).logits  # (1, C, V)
        cache = KVCache(cfg, 1, prompt.shape[1] + cfg.canvas_length)
        model.encode(prompt, cache)
        ours = model.decode(canvas, cache)  # (1, C, V)
    # fp32 on both sides, different kernels and summation orders (AVX2 / AVX-512): a tolerance scaled to
    # the logits' magnitude, as tests/test_reference.py's 1e-4 is for logits of order 1.
    assert (ours - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    assert ref.abs().max() > 1e-3  # not trivially zero


def _engine_with(params: SamplingParams, src: Path) -> dgemma.Engine:
    engine = dgemma.load(src, dtype=torch.float32)
    return dgemma.Engine(engine.model, engine.tokenizer, defaults=params, generation_config=engine.generation_config)


@pytest.fixture(scope="module")
def saved(ckpt_factory, tmp_path_factory) -> Path:
    """A transformers-written tiny checkpoint, re-saved by an Engine whose defaults are PARAMS."""
    out = tmp_path_factory.mktemp("contract") / "saved"
    _engine_with(PARAMS, ckpt_factory("tiny")).save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------- the split
def test_split_puts_each_key_in_its_file():
    merged = {"max_new_tokens": 64, "max_denoising_steps": 8, "entropy_bound": 1, "t_max": 0.5, "t_min": 0.5,
              "stability_threshold": 1, "confidence_threshold": 0, "restarts": 3, "restart_entropy": 1e-6,
              "seed": 7, "some_later_key": [1, 2], "eos_token_id": (1, 5), "pad_token_id": 0, "bos_token_id": 2,
              "cache_implementation": "static", "return_dict_in_generate": True, "transformers_version": "5.23.0",
              "_from_model_config": True, "pinned_canvas": None}
    hf, own = genconfig.split(merged)
    assert hf == {"max_new_tokens": 64, "max_denoising_steps": 8, "stability_threshold": 1,
                  "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 1.0},
                  "eos_token_id": [1, 5], "pad_token_id": 0, "bos_token_id": 2, "cache_implementation": "static",
                  "return_dict_in_generate": True}
    assert isinstance(hf["sampler_config"]["entropy_bound"], float)  # transformers refuses an int bound
    # t_max == t_min goes whole (transformers wants t_max > t_min); a 0 threshold is refused there too
    assert own == {"t_max": 0.5, "t_min": 0.5, "confidence_threshold": 0, "restarts": 3, "restart_entropy": 1e-6,
                   "seed": 7, "some_later_key": [1, 2]}
    DiffusionGemmaGenerationConfig(**copy.deepcopy(hf))  # the oracle accepts it
    back = genconfig.merge(hf, own)
    assert SamplingParams.from_generation_config(back) == SamplingParams.from_generation_config(merged)
    assert back["seed"] == 7 and back["some_later_key"] == [1, 2] and "transformers_version" not in back

    # t_min 0.8 alone meets transformers' default t_max 0.8 when it samples: a pair it refuses
    assert genconfig.split({"t_min": 0.8, "t_max": None}) == ({}, {"t_min": 0.8})
    hf, own = genconfig.split({"t_max": 0.8, "t_min": 0.4, "confidence_threshold": 1})  # valid there: all in hf
    assert own == {} and hf == {"t_max": 0.8, "t_min": 0.4, "confidence_threshold": 1.0}
    assert isinstance(hf["confidence_threshold"], float)


@pytest.mark.parametrize("hf_file", [
    {}, {"sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.2}},
    {"t_max": 0.8, "t_min": 0.4, "confidence_threshold": 0.01, "max_denoising_steps": 3, "stability_threshold": 0},
    {"t_max": None, "t_min": None, "sampler_config": None, "transformers_version": "5.23.0"},
    {"entropy_bound": 0.1}, {"restarts": 2}, {"seed": 0}, {"t_max": 0.3, "t_min": 0.3}, {"t_max": 0.2, "t_min": 0.4},
    {"confidence_threshold": 0.0}, {"confidence_threshold": 1}, {"max_denoising_steps": 0},
    {"stability_threshold": -1}, {"sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 1}},
    {"sampler_config": {"entropy_bound": 0.1}}, {"t_min": -0.1},
])
def test_refused_agrees_with_transformers(hf_file):
    """``genconfig.refused`` (what the legacy notice and the split rely on) says what transformers says."""
    try:
        DiffusionGemmaGenerationConfig(**copy.deepcopy(hf_file))
        accepted = True
    except (ValueError, TypeError, AttributeError):  # 5.23's threshold messages name a missing attribute
        accepted = False
    assert (genconfig.refused(hf_file) == []) == accepted, genconfig.refused(hf_file)


def test_sampling_params_read_both_entropy_bound_forms():
    serialised = {"sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.25}}
    assert SamplingParams.from_generation_config(serialised).entropy_bound == 0.25
    assert SamplingParams.from_generation_config({"entropy_bound": 0.35}).entropy_bound == 0.35
    assert genconfig.merge(serialised) == {"entropy_bound": 0.25}  # the merged view holds it flat
    both = {"entropy_bound": 0.35, **serialised}  # transformers' form wins, in both readers
    assert SamplingParams.from_generation_config(both).entropy_bound == 0.25 == genconfig.merge(both)["entropy_bound"]


# ---------------------------------------------------------------------------------------------- writers
def test_save_pretrained_loads_in_transformers_and_round_trips(saved, hf_model_factory, tmp_path):
    own = _read(saved / genconfig.DGEMMA_FILE)
    assert own == {"t_max": 0.3, "t_min": 0.3, "confidence_threshold": 0, "restarts": 2, "restart_entropy": 1e-9}
    check_transformers_loads(saved)
    engine = dgemma.load(saved)
    assert engine.defaults == PARAMS.replace(eos_token_id=engine.config.eos_token_id)
    again = tmp_path / "again"
    engine.save_pretrained(again)  # the merged view round-trips, files byte for byte
    for name in (genconfig.GENERATION_FILE, genconfig.DGEMMA_FILE):
        assert (again / name).read_bytes() == (saved / name).read_bytes(), name
    assert dgemma.load(again).defaults == engine.defaults

    # A seed kept in a checkpoint's dgemma file survives too (SamplingParams takes a seed per call only).
    seeded = dgemma.Engine(engine.model, engine.tokenizer, generation_config={**engine.generation_config, "seed": 4})
    seeded.save_pretrained(tmp_path / "seeded")
    assert _read(tmp_path / "seeded" / genconfig.DGEMMA_FILE)["seed"] == 4
    assert dgemma.load(tmp_path / "seeded").generation_config["seed"] == 4

    # Defaults that transformers accepts whole leave no dgemma file behind (a stale one would override them).
    plain = SamplingParams(max_denoising_steps=5, t_max=0.5, t_min=0.25)
    _engine_with(plain, saved).save_pretrained(again)
    assert not (again / genconfig.DGEMMA_FILE).exists()
    assert dgemma.load(again).defaults.replace(eos_token_id=None) == plain


def test_deterministic_canvas_matches_transformers_with_the_saved_config(saved):
    """transformers samples with the generation_config.json dgemma wrote (steps cap, entropy bound,
    stability); at a near-zero temperature from a given canvas its tokens and steps equal dgemma's."""
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(saved, dtype=torch.float32).eval()
    assert hf.generation_config.max_denoising_steps == PARAMS.max_denoising_steps
    assert hf.generation_config.sampler_config.entropy_bound == PARAMS.entropy_bound
    engine = dgemma.load(saved, dtype=torch.float32)
    seen = SamplingParams.from_generation_config(_read(saved / genconfig.GENERATION_FILE))
    cfg = engine.config
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, cfg.vocab_size, (1, 12), generator=g)  # (1, P)
    init = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=g)  # (1, C)
    ref = hf.generate(prompt, decoder_input_ids=init.clone(), max_new_tokens=cfg.canvas_length, t_max=2e-4,
                      t_min=1e-4, eos_token_id=None, pad_token_id=None)
    out = engine.generate(prompt[0].tolist(), seen, max_new_tokens=cfg.canvas_length, t_max=2e-4, t_min=1e-4,
                          initial_canvas=init[0].tolist(), eos_token_id=())
    assert out.token_ids == ref.sequences[0, prompt.shape[1]:].tolist()
    assert out.steps == [round(cfg.canvas_length / float(ref.tokens_per_forward[0]))]



def _train(out: Path, init: Path, data: Path, **sections):
    raw = {"model": {"init": str(init)}, "data": {"train": str(data), "max_length": 64},
           "train": {"out": str(out), "steps": 2, "batch_size": 2, "micro_batch": 2, "lr": 1e-3, "warmup": 1,
                     "log_every": 1, "save_every": 1, "precision": "fp32"}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return Trainer(config.from_dict(raw), show_progress=False, log=lambda msg: None).run()


def test_training_outputs_load_in_transformers(saved, tmp_path):
    """Full fine-tuning: a step checkpoint and final/ keep the base's defaults in the two files; a LoRA run's
    merged final/ (``merge_adapter``, as `dgemma merge` writes it) too."""
    data = reverse_task(tmp_path / "train.jsonl", 16)
    full = _train(tmp_path / "full", saved, data)
    step = tmp_path / "full" / "checkpoints" / "step-00000001"
    lora = _train(tmp_path / "lora", saved, data, lora={"enabled": True, "rank": 4}, train={"steps": 1})
    assert lora.adapter is not None
    for path in (step, full.final, lora.final):
        assert _read(path / genconfig.DGEMMA_FILE) == _read(saved / genconfig.DGEMMA_FILE), path
        assert _read(path / genconfig.GENERATION_FILE) == _read(saved / genconfig.GENERATION_FILE), path
        check_transformers_loads(path)
        assert dgemma.load(path).defaults == dgemma.load(saved).defaults


def test_sudoku_train_output_loads_in_transformers(tmp_path, capsys):
    from dgemma.cli import main
    from dgemma.sudoku.solve import SOLVE_DEFAULTS

    assert main(["sudoku", "train", "--out", str(tmp_path), "--puzzles", "8", "--augment", "1", "--steps", "1",
                 "--set", "train.batch_size=4", "--set", "train.micro_batch=4", "--set", "train.save_every=0"]) == 0
    final = Path(json.loads(capsys.readouterr().out.splitlines()[-1])["model"])
    assert _read(final / genconfig.DGEMMA_FILE) == {k: SOLVE_DEFAULTS[k] for k in ("restarts", "restart_entropy",
                                                                                  "parallel_attempts", "seed")}
    check_transformers_loads(final)
    params = dgemma.load(final).defaults
    assert {k: getattr(params, k) for k in SOLVE_DEFAULTS if k != "seed"} == \
        {k: v for k, v in SOLVE_DEFAULTS.items() if k != "seed"}


@pytest.mark.parametrize("name", sorted(p.name for p in MODELS.iterdir() if (p / "config.json").is_file()))
def test_shipped_models_load_in_transformers(name, caplog):
    with caplog.at_level(logging.WARNING, logger="dgemma"):
        loading.read_generation_config(MODELS / name)
    assert not caplog.records  # not the older layout
    check_transformers_loads(MODELS / name)


# ---------------------------------------------------------------------------------------------- older layout
def test_legacy_single_file_layout_loads_with_a_notice(ckpt_factory, tmp_path, caplog):
    """Before the split every key sat in generation_config.json: dgemma still honours them, says once to
    re-save, and a re-save gives a checkpoint that transformers loads, with the same SamplingParams."""
    old = tmp_path / "old"
    shutil.copytree(ckpt_factory("tiny"), old)
    legacy = {"max_new_tokens": 32, "max_denoising_steps": 6, "entropy_bound": 0.3, "t_max": 0.3, "t_min": 0.3,
              "stability_threshold": 2, "confidence_threshold": 0, "restarts": 2, "restart_entropy": 1e-9,
              "seed": 0, "eos_token_id": [1], "pad_token_id": 0, "transformers_version": "5.23.0"}
    (old / genconfig.GENERATION_FILE).write_text(json.dumps(legacy))
    with pytest.raises(ValueError, match="Unexpected kwargs"):
        DiffusionGemmaGenerationConfig.from_pretrained(old)
    with caplog.at_level(logging.WARNING, logger="dgemma"):
        engine = dgemma.load(old)
    notices = [r.getMessage() for r in caplog.records if "vision tensors" not in r.getMessage()]
    assert len(notices) == 1 and "\n" not in notices[0]
    assert "re-save" in notices[0] and str(old / genconfig.GENERATION_FILE) in notices[0]
    assert "restarts" in notices[0] and genconfig.DGEMMA_FILE in notices[0]
    assert engine.defaults == PARAMS.replace(eos_token_id=(1,), pad_token_id=0)

    caplog.clear()
    engine.save_pretrained(tmp_path / "new")
    with caplog.at_level(logging.WARNING, logger="dgemma"):
        again = dgemma.load(tmp_path / "new")
    assert not caplog.records and again.defaults == engine.defaults
    assert again.generation_config["seed"] == 0  # kept, in the dgemma file
    DiffusionGemmaGenerationConfig.from_pretrained(tmp_path / "new")


# ---------------------------------------------------------------------------------------------- fast bf16
@pytest.mark.parametrize("flags, probe, fast", [
    (frozenset({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq"}), True, False),  # AVX-512, no BF16
    (frozenset({"avx2", "avx512f", "avx512_bf16"}), False, True),
    (frozenset({"avx2", "amx_bf16", "amx_tile"}), False, True),
    (None, True, True),  # no x86 flags line (another OS or an ARM CPU): the timed probe decides
    (None, False, False),
])
def test_bf16_detection_drives_load_dtype_and_training_precision(monkeypatch, flags, probe, fast):
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(hardware, "_bf16_probe", lambda: probe)
    assert hardware.cpu_has_fast_bf16() is fast
    assert loading.default_dtype("cpu") == (None if fast else torch.float32)  # None: the checkpoint's dtype
    assert resolve_precision("auto", torch.device("cpu")) == (torch.bfloat16 if fast else None)
    assert resolve_precision("fp32", torch.device("cpu")) is None


def test_cpu_flags_come_from_the_x86_flags_line(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert hardware._cpu_flags.__wrapped__(x86) == frozenset({"fpu", "avx2", "avx512f", "avx512_bf16"})
    assert hardware._cpu_flags.__wrapped__(arm) is None
    assert hardware._cpu_flags.__wrapped__(tmp_path / "absent") is None
    flags = hardware._cpu_flags()  # this machine's
    if flags is not None:
        assert hardware.cpu_has_fast_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})
