"""Shared fixtures: tiny random DiffusionGemma checkpoints written by transformers' ``save_pretrained``.

Several configs exercise different code paths: odd sizes, a context longer than the sliding window,
distinct encoder/decoder layer scalars, the older ``global_head_dim`` serialisation, sharded weights.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

import dgemma
from dgemma.errors import LoadError

# The spec's tiny config (a copy of the one beside the spec, kept with the tests so they need nothing outside).
SPEC_CONFIG = Path(__file__).resolve().parent / "data" / "tiny-diffusiongemma-config.json"

TINY = {
    "model_type": "diffusion_gemma",
    "architectures": ["DiffusionGemmaForBlockDiffusion"],
    "canvas_length": 16,
    "boi_token_id": 500, "eoi_token_id": 501, "image_token_id": 502,
    "tie_word_embeddings": True,
    "text_config": {
        "model_type": "diffusion_gemma_text",
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
        "num_experts": 4, "top_k_experts": 2, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16,
        "per_layer_config": {"1": {"head_dim": 32, "num_key_value_heads": 1},
                             "3": {"head_dim": 32, "num_key_value_heads": 1}},
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        "sliding_window": 16, "max_position_embeddings": 4096,
        "rope_parameters": {
            "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
        },
        "use_bidirectional_attention": "vision", "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
    },
    "vision_config": {
        "model_type": "gemma4_vision", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16, "patch_size": 16,
        "pooling_kernel_size": 3, "position_embedding_size": 64, "standardize": False,
        "rope_parameters": {"rope_theta": 100.0, "rope_type": "axial"},
    },
}

# Odd sizes, 3 layers with one full layer, 5 experts top-3, canvas 12, older head-dim serialisation.
ODD = copy.deepcopy(TINY)
ODD["canvas_length"] = 12
ODD["text_config"].update({
    "vocab_size": 389, "hidden_size": 48, "intermediate_size": 72, "moe_intermediate_size": 24,
    "num_experts": 5, "top_k_experts": 3, "num_hidden_layers": 3, "num_attention_heads": 6,
    "num_key_value_heads": 3, "head_dim": 12, "global_head_dim": 24, "num_global_key_value_heads": 2,
    "layer_types": ["sliding_attention", "sliding_attention", "full_attention"], "sliding_window": 7,
})
del ODD["text_config"]["per_layer_config"]

CONFIGS = {"tiny": TINY, "odd": ODD}


def write_hf_checkpoint(path: Path, raw: dict, seed: int = 0, distinct_scalars: bool = True,
                        shard: bool = False, vocab_tokenizer: bool = True, embed_std: float = 1.0) -> Path:
    """Build a random transformers model from ``raw`` and ``save_pretrained`` it (plus a byte tokenizer).

    ``embed_std`` sets the (tied) embedding's spread: the reference init (0.02) gives near-uniform logits
    whose top-2 gaps are so small that even a 1e-4 temperature leaves sampling random; 1.0 gives the
    peaked distributions of a trained model.
    """
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig(**copy.deepcopy(raw))).eval()
    with torch.no_grad():
        # Random norms and scalars so that a swapped or ignored tensor shows up in the parity checks.
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
        emb = model.model.decoder.embed_tokens.weight
        emb.mul_(embed_std / emb.std())
        if distinct_scalars:
            n = raw["text_config"]["num_hidden_layers"]
            for i in range(n):
                model.model.encoder.language_model.layers[i].layer_scalar.fill_(0.6 + 0.1 * i)
                model.model.decoder.layers[i].layer_scalar.fill_(1.3 - 0.1 * i)
    model.save_pretrained(path, max_shard_size="200KB" if shard else "5GB")
    if vocab_tokenizer:
        from dgemma.tokenizer import write_test_tokenizer
        write_test_tokenizer(path, raw["text_config"]["vocab_size"])
    return path


@pytest.fixture(scope="session")
def ckpt_factory(tmp_path_factory):
    """``ckpt_factory(name, **kw)`` -> path of a cached checkpoint directory for one of CONFIGS."""
    made: dict[tuple, Path] = {}

    def make(name: str = "tiny", **kw) -> Path:
        key = (name, tuple(sorted(kw.items())))
        if key not in made:
            path = tmp_path_factory.mktemp(f"ckpt_{name}")
            made[key] = write_hf_checkpoint(path, CONFIGS[name], **kw)
        return made[key]

    return make


@pytest.fixture(scope="session")
def hf_model_factory():
    """Load a checkpoint directory with transformers (eval; fp32 unless ``dtype`` says otherwise)."""
    from transformers import DiffusionGemmaForBlockDiffusion

    cache: dict[tuple, object] = {}

    def load(path: Path, dtype: torch.dtype = torch.float32):
        if (path, dtype) not in cache:
            # transformers' grouped-GEMM experts have no float64 kernel; its eager loop computes the same
            kw = {"experts_implementation": "eager"} if dtype == torch.float64 else {}
            cache[path, dtype] = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=dtype, **kw).eval()
        return cache[path, dtype]

    return load


def run_main(capsys, *argv) -> tuple[int, str, str]:
    """``dgemma ARGV`` in this process: ``(exit status, stdout, stderr)``."""
    from dgemma.cli import main

    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


SPEC_DEFAULTS = {"max_new_tokens": 256, "max_denoising_steps": 48, "entropy_bound": 0.1, "t_max": 0.8,
                 "t_min": 0.4, "stability_threshold": 1, "confidence_threshold": 0.005}


# ------------------------------------------------------------------ helpers for the loader/config tests
def _copy(src: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _write_config(ckpt: Path, edit) -> None:
    raw = json.loads((ckpt / "config.json").read_text())
    edit(raw)
    (ckpt / "config.json").write_text(json.dumps(raw))


def _load_error(source, **kw) -> str:
    with pytest.raises(LoadError) as info:
        dgemma.load(source, **kw)
    assert type(info.value) is LoadError
    return str(info.value)


@pytest.fixture
def tiny(ckpt_factory, tmp_path):
    """A private, corruptible copy of the tiny checkpoint."""
    return _copy(ckpt_factory("tiny"), tmp_path)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Commands run in-process set torch's thread count for their model (``cli.options.set_threads``);
    restore it after each test, so later tests and their subprocesses sum in the same order as before."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_grad_mode_leaks():
    """A test must leave autograd as it found it: a generator suspended inside ``torch.inference_mode`` (or a
    mode entered and never left) would silently break every later training test."""
    yield
    leaked = torch.is_inference_mode_enabled() or not torch.is_grad_enabled()
    assert not leaked, "this test left inference mode on or gradients off"


def reverse_task(path: Path, n: int, seed: int = 0) -> Path:
    """A JSONL training file of ``n`` letter strings (3-7 of a-h) to reverse, drawn from ``seed``."""
    r = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            s = "".join(r.choice("abcdefgh") for _ in range(r.randint(3, 7)))
            f.write(json.dumps({"prompt": s, "completion": s[::-1]}) + "\n")
    return path
