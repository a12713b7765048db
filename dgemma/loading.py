"""Checkpoint I/O: the only file that knows the checkpoint's tensor names.

Reads a directory written by transformers' ``save_pretrained`` (or a Hub snapshot of one, ``dgemma.hub``): config.json,
generation_config.json (plus dgemma's own dgemma_generation.json, see ``dgemma.genconfig``), single or sharded
safetensors. The model is built on the meta device and the memory-mapped tensors are assigned to it, so no
second copy is made when dtype and device already match. Loading is strict: a missing, unexpected or wrongly
shaped tensor is named in the error. Writes the same format back (``save_checkpoint``), loadable by
``DiffusionGemmaForBlockDiffusion.from_pretrained``. Quantised checkpoints, and float tensors quantised as they
are read, go through ``dgemma.quant.checkpoint`` (which maps the quantised modules' keys to stored names).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dgemma import genconfig
from dgemma.config import ModelConfig
from dgemma.errors import ConfigError, LoadError
from dgemma.fileio import atomic_write
from dgemma.hardware import cpu_has_fast_bf16
from dgemma.hub import resolve_source
from dgemma.model import DiffusionGemma
from dgemma.quant import checkpoint as qcheckpoint
from dgemma.quant.apply import QuantOptions, quantize_model

log = logging.getLogger("dgemma")

DECODER = "model.decoder."
ENCODER_TEXT = "model.encoder.language_model."
_ENCODER_SCALAR = re.compile(r"^model\.encoder\.language_model\.layers\.(\d+)\.layer_scalar$")
_SKIPPED_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
FLOAT_WEIGHTS = "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# ---------------------------------------------------------------------------------------------- configs
def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path} is not valid UTF-8 JSON ({e})") from None
    if not isinstance(data, dict):
        raise LoadError(f"{path} must hold a JSON object")
    return data


def read_config(ckpt: Path) -> ModelConfig:
    if not (ckpt / "config.json").is_file():
        raise LoadError(f"{ckpt} has no config.json; is it a DiffusionGemma checkpoint directory?")
    try:
        return ModelConfig.from_hf_dict(read_json(ckpt / "config.json"))
    except ConfigError as e:
        raise LoadError(f"{ckpt / 'config.json'}: {e}") from None


def read_generation_config(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's sampling defaults as one flat dict: generation_config.json with dgemma_generation.json
    laid over it (``genconfig.merge``); {} when it has neither."""
    hf, own = (ckpt / genconfig.GENERATION_FILE, ckpt / genconfig.DGEMMA_FILE)
    return genconfig.merge(read_json(hf) if hf.is_file() else {}, read_json(own) if own.is_file() else {},
                           source=str(hf))


def write_generation_config(path: Path, generation_config: dict[str, Any] | None) -> None:
    """Write ``generation_config`` (a merged view) as generation_config.json, which transformers loads, and
    dgemma_generation.json for the rest (removed when there is no rest), each atomically."""
    hf, own = genconfig.split(generation_config or {})
    _write_json(path / genconfig.GENERATION_FILE, hf)
    if own:
        _write_json(path / genconfig.DGEMMA_FILE, own)
    else:  # a stale one would override what was just written
        (path / genconfig.DGEMMA_FILE).unlink(missing_ok=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- tensors
def _weight_files(ckpt: Path) -> list[Path]:
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise LoadError(f"{index} has no weight_map")
        files = [ckpt / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise LoadError(f"{index} names shard {missing[0]}, which is not in {ckpt}")
        return files
    files = sorted(ckpt.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in ckpt.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise LoadError(
            f"{ckpt} holds only pickle weights ({pickles[0]}); dgemma loads safetensors only, because "
            "unpickling can run arbitrary code. Convert them with transformers "
            "(from_pretrained then save_pretrained(safe_serialization=True))"
        )
    raise LoadError(f"{ckpt} contains no *.safetensors weights")


def _open_tensors(files: list[Path]):
    """Yield ``(name, lazily-read tensor getter, shape)`` for every tensor in ``files``."""
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt")
            keys = list(handle.keys())
        except Exception as e:  # the Rust error types are not importable in a stable way
            raise LoadError(f"{file} is not a readable safetensors file (truncated or corrupt?): {e}") from None
        for key in keys:
            yield key, handle, file


def map_name(key: str) -> str | None:
    """Checkpoint tensor name -> dgemma parameter name; None for tensors that are tied duplicates."""
    m = _ENCODER_SCALAR.match(key)
    if m:
        return f"layers.{m.group(1)}.encoder_layer_scalar"
    if key.startswith(DECODER):
        return key[len(DECODER):]
    if key == "lm_head.weight" or key.startswith(ENCODER_TEXT):
        return None  # tied to model.decoder.* (the release format ties encoder and decoder weights)
    return key  # unknown: reported as unexpected


def read_state_dict(ckpt: Path, model: torch.nn.Module, dtype: torch.dtype | None, device,
                    quantize: bool = False, progress=None) -> dict[str, torch.Tensor]:
    """Read and check every tensor against ``model``'s (meta) state; returns tensors under its keys.

    ``model`` may be quantised (``dgemma.quant``): a quantised checkpoint's ``W.codes`` / ``W.scale`` are read
    as they are stored (their dtype checked, never cast), or with ``quantize`` a float checkpoint's ``W`` is
    quantised as it is read, one tensor at a time, so the float model is never whole in memory. ``dtype``
    casts the float tensors that stay float. ``progress(bytes_read, bytes_total)`` is called after each tensor.
    """
    files = _weight_files(ckpt)
    total, done = sum(f.stat().st_size for f in files), 0
    layout = qcheckpoint.Layout(model) if getattr(model, "quantization", None) else None
    expected = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    skipped = 0
    for key, handle, file in _open_tensors(files):
        if key.startswith(_SKIPPED_PREFIXES):
            skipped += 1
            continue
        name = map_name(key)
        if name is None:
            continue
        quantized = quantize and layout is not None and layout.quantized(name)
        if quantized:
            shape, stored = layout.float_shape(name), None
        else:
            name = layout.model_key(name) if layout is not None else name
            if name not in expected:
                raise LoadError(f"unexpected tensor {key} in {file.name}: it does not belong to this model config"
                                + (" (a quantised checkpoint?)" if not layout and key.endswith((".codes", ".scale"))
                                   else ""))
            shape, stored = expected[name]
        try:
            if quantized:  # its own short-lived mapping: the float pages leave the resident set with the tensor
                with safe_open(str(file), framework="pt") as own:
                    tensor = own.get_tensor(key)
            else:
                tensor = handle.get_tensor(key)
        except Exception as e:
            raise LoadError(f"cannot read tensor {key} from {file} (truncated or corrupt?): {e}") from None
        tensor_bytes = tensor.numel() * tensor.element_size()
        if tuple(tensor.shape) != tuple(shape):
            raise LoadError(f"tensor {key} in {file.name} has shape {list(tensor.shape)}, the config implies "
                            f"{list(shape)}")
        if quantized:  # on the target device: a GPU quantises the 26B model in seconds, a CPU in minutes
            parts = layout.quantize(name, tensor.to(device) if device is not None else tensor)
            del tensor  # the float tensor goes before the next is read
        elif layout is not None and layout.file_name(name) != name:  # codes or scales, as stored
            if tensor.dtype != stored:
                raise LoadError(f"tensor {key} in {file.name} is {tensor.dtype}; this format stores {stored}")
            parts = {name: tensor}
        else:
            if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                tensor = tensor.to(dtype)
            parts = {name: tensor}
        for k, t in parts.items():
            state[k] = t.to(device) if device is not None else t
        if progress is not None:
            done += tensor_bytes
            progress(done, total)
    missing = [k for k in expected if k not in state]
    if missing:
        name = layout.file_name(missing[0]) if layout is not None else missing[0]
        raise LoadError(f"checkpoint {ckpt} is missing tensor {_checkpoint_name(name)}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if skipped:
        log.warning("dgemma: skipped %d vision tensors (image input is not supported yet)", skipped)
    return state


def _checkpoint_name(name: str) -> str:
    m = re.fullmatch(r"layers\.(\d+)\.encoder_layer_scalar", name)
    return f"{ENCODER_TEXT}layers.{m.group(1)}.layer_scalar" if m else DECODER + name


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor] | None = None, device=None, dtype=None,
                seed: int | None = None, embed_std: float | None = None, structure: DiffusionGemma | None = None):
    """A model for ``cfg``: weights assigned from ``state`` (no copy), or randomly initialised if None.
    ``structure``: the storage-free model ``state`` is assigned to (default ``meta_model(cfg)``; a quantised
    one for quantised weights).

    The random model is allocated once, directly on ``device`` in ``dtype`` (a 26B config in bf16 needs
    its 52 GB only once, never an fp32 copy first). ``seed`` makes it reproducible on a given device;
    ``embed_std`` rescales the tied embedding (1.0 gives the peaked logits of a trained model).
    """
    if state is None:
        model = meta_model(cfg).to(dtype or torch.float32).to_empty(device=device or "cpu")
        gen = torch.Generator(device=model.device)
        gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,))))
        init_weights(model, generator=gen)
        if embed_std is not None:
            model.embed_tokens.weight.data.normal_(0.0, embed_std, generator=gen)
    else:
        model = structure if structure is not None else meta_model(cfg)
        model.load_state_dict(state, strict=True, assign=True)
        if getattr(model, "quantization", None):
            qcheckpoint.set_compute_dtype(model, next(model.parameters()).dtype)
    # Non-persistent buffers (RoPE frequencies, fp32 whatever the weights) are not in the checkpoint.
    with torch.device(model.device):
        fresh = DiffusionGemma.rope_buffers(cfg)
    for name, buf in fresh.items():
        setattr(model, name, buf)
    return model.eval()


def init_weights(model: DiffusionGemma, std: float = 0.02, generator: torch.Generator | None = None) -> None:
    """Random init in the spirit of the reference: normal(0, std) matrices, ones for norms and scales."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, std, generator=generator)
            else:
                p.fill_(1.0)
        for name, buf in model.named_buffers():
            if name.endswith("layer_scalar"):
                buf.fill_(1.0)


def default_dtype(device) -> torch.dtype | None:
    """The dtype to load in when the caller names none: the checkpoint's (None), except on a CPU that
    emulates bf16, where fp32 is ~50x faster for the price of twice the memory."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cpu" and not cpu_has_fast_bf16():
        return torch.float32
    return None


def load_weights(source, device=None, dtype=None, quant=None, progress=None):
    """``(model, config, generation_config dict, checkpoint dir)`` for a directory or Hub id.

    ``dtype=None`` keeps the checkpoint's dtype, except on CPUs without bf16 hardware (see default_dtype).
    A quantised checkpoint (``dgemma quantize``) loads quantised. ``quant`` (a scheme name, a dict or
    ``dgemma.quant.apply.QuantOptions``) quantises a float checkpoint tensor by tensor as it is read: the
    peak is the quantised model plus one float tensor (one expert's fp32 copy while it is quantised).
    ``progress``: see :func:`read_state_dict`.
    """
    wanted = QuantOptions.of(quant) if quant is not None else None  # bad options fail before any read
    ckpt = resolve_source(source)
    cfg = read_config(ckpt)
    try:
        stored = qcheckpoint.read_section(read_json(ckpt / "config.json"))
    except ValueError as e:
        raise LoadError(f"{ckpt / 'config.json'}: {e}") from None
    # A bare scheme name asks for that scheme only; a dict or QuantOptions for its fields too.
    if stored is not None and wanted is not None and not (
            wanted.scheme == stored.scheme if isinstance(quant, str) else wanted.matches(stored)):
        raise LoadError(f"{ckpt} is already quantised ({stored.scheme}, group size {stored.group_size}, embedding "
                        f"{stored.embedding}); load it as it is (no quant= / --quant), or quantise its float "
                        "original")
    if dtype is None:
        dtype = default_dtype(device)
        if dtype is not None:
            log.info("dgemma: this CPU has no bf16 matmul hardware; loading in %s", dtype)
    options = stored or wanted
    structure = meta_model(cfg)
    if options is not None:
        quantize_model(structure, **options.as_dict())  # meta: shapes and dtypes, no work; checks group size
    state = read_state_dict(ckpt, structure, dtype, device, quantize=stored is None and wanted is not None,
                            progress=progress)
    return build_model(cfg, state, structure=structure), cfg, read_generation_config(ckpt), ckpt


def stored_dtype(ckpt: Path) -> torch.dtype:
    """The dtype config.json says the checkpoint's float weights are in (float32 when it names none)."""
    raw = read_json(Path(ckpt) / "config.json")
    value = getattr(torch, str(raw.get("dtype") or raw.get("torch_dtype") or "float32"), None)
    return value if isinstance(value, torch.dtype) else torch.float32


def meta_model(cfg: ModelConfig) -> DiffusionGemma:
    """The model's structure with no storage: names and shapes for checking, a target for ``assign``."""
    with torch.device("meta"):
        return DiffusionGemma(cfg)


# ---------------------------------------------------------------------------------------------- saving
def export_state_dict(model: DiffusionGemma, to_cpu: bool = True,
                      state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """dgemma parameter names -> checkpoint names (the release layout: decoder weights + encoder scalars).

    ``to_cpu=False`` keeps the tensors where they are (no copy), to hand them to another in-memory model.
    ``state`` (dgemma names) replaces ``model.state_dict()``, e.g. weights gathered from shards. A quantised
    model's codes and scales go under the names of the quantised checkpoint format (``dgemma.quant.checkpoint``).
    """
    out = {}
    layout = qcheckpoint.Layout(model) if state is None and getattr(model, "quantization", None) else None
    for name, tensor in (model.state_dict() if state is None else state).items():
        name = layout.file_name(name) if layout is not None else name
        m = re.fullmatch(r"layers\.(\d+)\.encoder_layer_scalar", name)
        key = f"{ENCODER_TEXT}layers.{m.group(1)}.layer_scalar" if m else DECODER + name
        out[key] = tensor.detach().contiguous().cpu() if to_cpu else tensor.detach()
    return out


def _remove_stale_weights(path: Path, keep: str, other: str) -> None:
    """Remove what an earlier checkpoint in ``path`` left that the loader would read beside ``keep``: the other
    format's file, and a sharded checkpoint's index and the shards it names."""
    (path / other).unlink(missing_ok=True)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        for shard in set(weight_map.values()) if isinstance(weight_map, dict) else ():
            if shard != keep and "/" not in shard:
                (path / shard).unlink(missing_ok=True)
        index.unlink()


def save_checkpoint(model: DiffusionGemma, path, generation_config: dict[str, Any] | None = None,
                    state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write config.json, the generation config files (``write_generation_config``) and model.safetensors in
    the release format; a quantised model in the quantised format (``dgemma.quant.checkpoint``), which
    dgemma reads and transformers does not.

    ``state`` (dgemma names, e.g. gathered from FSDP shards) is written instead of the model's own tensors.
    """
    quantization = getattr(model, "quantization", None)
    if quantization and state is not None:
        raise ValueError("a quantised model is written from its own tensors (no state=): its codes are not "
                         "float weights")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.cfg.to_hf_dict()
    config.pop("torch_dtype", None)
    config.pop(qcheckpoint.CONFIG_KEY, None)  # the config read may be a quantised checkpoint's
    tensors = export_state_dict(model, state=state)
    # What the float weights below are stored in (a quantised model's float tensors are its parameters).
    dtype = next(model.parameters()).dtype if quantization else tensors[DECODER + "embed_tokens.weight"].dtype
    config["dtype"] = str(dtype).removeprefix("torch.")
    if quantization:
        config[qcheckpoint.CONFIG_KEY] = qcheckpoint.config_section(QuantOptions.of(quantization))
    name, other = ((qcheckpoint.WEIGHTS_FILE, FLOAT_WEIGHTS) if quantization else
                   (FLOAT_WEIGHTS, qcheckpoint.WEIGHTS_FILE))
    atomic_write(path / name, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _remove_stale_weights(path, keep=name, other=other)
    _write_json(path / "config.json", config)
    write_generation_config(path, generation_config)
    return path
