"""The checkpoint's sampling defaults: which keys go to generation_config.json and which to dgemma's own file.

transformers 5.23's ``DiffusionGemmaGenerationConfig`` refuses any key it does not know and some values dgemma
allows (``t_max == t_min``, a ``confidence_threshold`` of 0 or an int), and it wants the entropy bound as
``"sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1}``. So a checkpoint that
dgemma writes holds its sampling defaults in two files:

* ``generation_config.json``: only keys and values that class accepts, the entropy bound as ``sampler_config``;
* ``dgemma_generation.json`` (:data:`DGEMMA_FILE`): the rest, which transformers never reads: ``restarts``,
  ``restart_entropy``, ``restart_after``, ``parallel_attempts``, ``seed``, any other key transformers does not
  know, and values it would refuse (then a temperature pair goes here whole, and transformers samples with its
  own defaults for it).

In memory dgemma keeps one flat dict, the *merged view* (:func:`merge`): generation_config.json with the
entropy bound flat and dgemma_generation.json laid over it; :func:`split` turns it back into the two files.
Metadata of whoever wrote the file (``transformers_version``, ``_from_model_config``, ``_commit_hash``) is
dropped on reading. This module does no I/O; ``dgemma.loading`` reads and writes the files.

Older dgemma checkpoints kept everything in generation_config.json. They still load (the dgemma keys are
honoured) with a one-line warning to re-save them; this fallback is meant to go after one release.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable

from dgemma.params import PER_CALL, SamplingParams

log = logging.getLogger("dgemma")

GENERATION_FILE = "generation_config.json"
DGEMMA_FILE = "dgemma_generation.json"
SAMPLER_CLASS = "EntropyBoundSamplerConfig"

# Every keyword DiffusionGemmaGenerationConfig.__init__ takes (transformers 5.23); any other key is an error there.
TRANSFORMERS_KEYS = frozenset({
    "max_new_tokens", "max_length", "return_dict_in_generate", "max_denoising_steps", "sampler_config",
    "t_min", "t_max", "stability_threshold", "confidence_threshold", "cache_implementation", "cache_config",
    "disable_compile", "bos_token_id", "pad_token_id", "eos_token_id",
    "_commit_hash", "_from_model_config", "transformers_version",
})
_METADATA = frozenset({"_commit_hash", "_from_model_config", "transformers_version"})


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# Values its validate() accepts, per key: (must the JSON value be a float, the rule). Where transformers is
# looser than dgemma (max_new_tokens need not be an int there) the stricter rule is kept: dgemma refuses the
# value anyway. The flat name `entropy_bound` stands for the sampler_config it becomes.
_VALUES: dict[str, tuple[bool, Callable[[Any], bool]]] = {
    "max_new_tokens": (False, lambda v: _int(v) and v > 0),
    "max_length": (False, lambda v: _int(v) and v > 0),
    "max_denoising_steps": (False, lambda v: _int(v) and v > 0),
    "t_min": (False, lambda v: _num(v) and v >= 0),
    "t_max": (False, lambda v: _num(v) and v >= 0),
    "stability_threshold": (False, lambda v: _int(v) and v >= 0),
    "confidence_threshold": (True, lambda v: _num(v) and v > 0),
    "entropy_bound": (True, lambda v: _num(v) and v > 0),
}


def _temperatures_ok(values: dict[str, Any], implied: bool = False) -> bool:
    """transformers wants t_max > t_min when it has both (dgemma allows equal: a constant temperature).
    ``implied``: a missing one counts as its default (the spec's, which are transformers' too), as it will
    be once sampling starts."""
    default = {"t_min": SamplingParams.t_min, "t_max": SamplingParams.t_max} if implied else {}
    t_min, t_max = (values.get(k, default.get(k)) for k in ("t_min", "t_max"))
    return t_min is None or t_max is None or not (_num(t_min) and _num(t_max)) or t_max > t_min


def _sampler(bound: float) -> dict[str, Any]:
    return {"_cls_name": SAMPLER_CLASS, "entropy_bound": float(bound)}


def split(merged: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The merged view -> ``(generation_config.json, dgemma_generation.json)`` contents. Nulls are left out
    (null and absent mean the same to both readers); an int entropy bound or confidence threshold is written
    as the equal float that transformers wants."""
    values = {k: v for k, v in _flatten(merged).items() if v is not None and k not in _METADATA}
    hf: dict[str, Any] = {}
    own: dict[str, Any] = {}
    temperatures_ok = _temperatures_ok(values, implied=True)
    for key, value in values.items():
        if key in ("t_min", "t_max") and not temperatures_ok:
            own[key] = value
        elif key in _VALUES:
            as_float, rule = _VALUES[key]
            ok = rule(value)
            value = float(value) if ok and as_float else value
            if not ok:
                own[key] = value
            elif key == "entropy_bound":
                hf["sampler_config"] = _sampler(value)
            else:
                hf[key] = value
        elif key in TRANSFORMERS_KEYS:
            hf[key] = list(value) if isinstance(value, tuple) else value
        else:
            own[key] = value
    return hf, own


def merge(hf: dict[str, Any], own: dict[str, Any] | None = None, source: str = GENERATION_FILE) -> dict[str, Any]:
    """The merged view of a checkpoint's two files: ``hf`` (generation_config.json, either layout) with the
    entropy bound flat and the writer's metadata dropped, ``own`` (dgemma_generation.json) laid over it.
    Logs a warning when ``hf`` holds what transformers refuses (the older layout); ``source`` names it."""
    bad = refused(hf)
    if bad:
        log.warning("dgemma: %s holds keys or values transformers cannot load (%s); dgemma still reads them, "
                    "but re-save the checkpoint (dgemma.load(path).save_pretrained(path)) to move them to %s",
                    source, ", ".join(bad), DGEMMA_FILE)
    merged = {k: v for k, v in _flatten(hf).items() if k not in _METADATA}
    merged.update(own or {})
    return merged


def refused(hf: dict[str, Any]) -> list[str]:
    """The keys of a generation_config.json that ``DiffusionGemmaGenerationConfig`` would refuse (or whose
    value it would), in file order; [] for a file transformers loads."""
    bad = []
    for key, value in hf.items():
        if value is None:
            continue
        if key not in TRANSFORMERS_KEYS:
            bad.append(key)
        elif key == "sampler_config":
            if not (isinstance(value, dict) and value.get("_cls_name") == SAMPLER_CLASS
                    and set(value) == {"_cls_name", "entropy_bound"}
                    and isinstance(value["entropy_bound"], float) and value["entropy_bound"] > 0):
                bad.append(key)
        elif key in _VALUES:
            as_float, rule = _VALUES[key]
            if not rule(value) or (as_float and not isinstance(value, float)):
                bad.append(key)
    if not _temperatures_ok(hf):
        bad += [k for k in ("t_min", "t_max") if k not in bad]
    return bad


def with_params(merged: dict[str, Any], params: SamplingParams) -> dict[str, Any]:
    """``merged`` changed where ``params`` differs from what it gives, so that saving it keeps ``params``
    (the fields a checkpoint holds: all but the per-call ``seed``, ``initial_canvas``, ``pinned_canvas``)."""
    out = dict(merged)
    current = SamplingParams.from_generation_config(merged)
    for field in dataclasses.fields(SamplingParams):
        name, value = field.name, getattr(params, field.name)
        if name in PER_CALL or value == getattr(current, name):
            continue
        if name == "entropy_bound":
            out.pop("sampler_config", None)
        if value == field.default:  # absent means the default (None for eos/pad: the model's)
            out.pop(name, None)
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _flatten(gen: dict[str, Any]) -> dict[str, Any]:
    """``sampler_config`` (its serialised dict) -> a flat ``entropy_bound``; it wins over a flat one, as in
    ``SamplingParams.from_generation_config``."""
    out = dict(gen)
    sampler = out.pop("sampler_config", None)
    if isinstance(sampler, dict) and sampler.get("entropy_bound") is not None:
        out["entropy_bound"] = sampler["entropy_bound"]
    return out
