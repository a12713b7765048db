"""SamplingParams: the sampler's knobs, named as in the checkpoint's ``generation_config.json``.

Defaults are the spec's (section 2.4); :func:`SamplingParams.from_generation_config` overlays a checkpoint's
values, where ``null`` or absent fields keep the defaults. Unlike the reference, ``t_max == t_min`` (a
constant temperature) is allowed and ``confidence_threshold=0`` means "never stop early" (a fixed step
count). Every really invalid value raises ``ValueError`` naming the field. On disk, what transformers does
not accept (``restarts``, ``restart_entropy``, ``restart_after``, ``parallel_attempts``, such values) sits in
dgemma_generation.json (``dgemma.genconfig``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

# Fields that belong to one call, never to a checkpoint: a generation config's values for them are ignored.
PER_CALL = ("seed", "initial_canvas", "pinned_canvas")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


MAX_PARALLEL_ATTEMPTS = 64  # rows one request may add to a decoder pass


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_max: float = 0.8
    t_min: float = 0.4
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    # Not in the spec: a canvas that runs out of steps without meeting the stopping rule is denoised again
    # from fresh noise, up to this many times (0: never, the reference behaviour). With `restart_entropy`,
    # one that settles with a final mean entropy at or above it is denoised again too. The attempt kept is
    # the first that qualifies, else the most confident: settled before unsettled, then lowest entropy.
    restarts: int = 0
    restart_entropy: float | None = None
    # An attempt that has not settled after this many steps is given up when a new attempt can take its place
    # (it still competes as the most confident); the temperature schedule still runs over
    # `max_denoising_steps`, so a failing attempt costs fewer steps without cooling faster. None: every
    # attempt may run to the cap.
    restart_after: int | None = None
    # How many attempts of a canvas run at once, as rows of the same decoder pass reading the request's one
    # KV slot (at most 1 + restarts). The first that qualifies ends the canvas, so with restarts the answer
    # comes after fewer passes, each with more rows. 1: one attempt after another.
    parallel_attempts: int = 1
    eos_token_id: tuple[int, ...] | None = None  # None: the model's; () disables EOS stopping
    pad_token_id: int | None = None
    seed: int | None = None
    # Starting canvas for the first canvas: C token ids, or one row of C ids per prompt.
    initial_canvas: Sequence[int] | Sequence[Sequence[int]] | None = None
    # Pinned positions of the first canvas: C entries (or one row of C per prompt), a token id where the
    # canvas must hold that token at every step and in the output, -1 where it is free.
    pinned_canvas: Sequence[int] | Sequence[Sequence[int]] | None = None

    def __post_init__(self):
        eos = self.eos_token_id
        if eos is not None and not isinstance(eos, tuple):
            eos = (eos,) if _is_int(eos) else tuple(eos) if isinstance(eos, (list, tuple)) else eos
            object.__setattr__(self, "eos_token_id", eos)
        problems = {
            "max_new_tokens": _is_int(self.max_new_tokens) and self.max_new_tokens > 0,
            "max_denoising_steps": _is_int(self.max_denoising_steps) and self.max_denoising_steps > 0,
            "entropy_bound": _is_num(self.entropy_bound) and self.entropy_bound > 0,
            "t_max": _is_num(self.t_max) and self.t_max > 0,
            "t_min": _is_num(self.t_min) and self.t_min > 0,
            "stability_threshold": _is_int(self.stability_threshold) and self.stability_threshold >= 0,
            "confidence_threshold": _is_num(self.confidence_threshold) and self.confidence_threshold >= 0,
            "restarts": _is_int(self.restarts) and self.restarts >= 0,
            "restart_entropy": self.restart_entropy is None or (_is_num(self.restart_entropy)
                                                                and self.restart_entropy > 0),
            "restart_after": self.restart_after is None or (_is_int(self.restart_after) and self.restart_after > 0),
            "parallel_attempts": _is_int(self.parallel_attempts)
            and 1 <= self.parallel_attempts <= MAX_PARALLEL_ATTEMPTS,
            "eos_token_id": eos is None or (isinstance(eos, tuple) and all(_is_int(e) and e >= 0 for e in eos)),
            "pad_token_id": self.pad_token_id is None or (_is_int(self.pad_token_id) and self.pad_token_id >= 0),
            "seed": self.seed is None or _is_int(self.seed),
        }
        for name, ok in problems.items():
            if not ok:
                raise ValueError(f"invalid sampling parameter `{name}`: {getattr(self, name)!r} ({_RULES[name]})")
        if self.t_max < self.t_min:
            raise ValueError(f"invalid sampling parameter `t_max`: {self.t_max} is below t_min={self.t_min}")

    def temperature(self, step: int) -> float:
        """Temperature at ``step`` counting down from ``max_denoising_steps`` to 1 (spec 5.1)."""
        return self.t_min + (self.t_max - self.t_min) * step / self.max_denoising_steps

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_generation_config(cls, gen: dict[str, Any] | None, **overrides) -> "SamplingParams":
        """Defaults <- a generation config's values (nulls ignored) <- ``overrides``.

        ``gen`` is a ``generation_config.json`` or dgemma's merged view of a checkpoint's two files
        (``dgemma.genconfig``): the entropy bound as transformers' ``sampler_config`` (its serialised dict, which
        wins) or as a flat ``entropy_bound``; keys that are not fields (``transformers_version``, ...) are ignored.
        """
        values: dict[str, Any] = {}
        gen = gen or {}
        for f in dataclasses.fields(cls):
            if gen.get(f.name) is not None and f.name not in PER_CALL:
                values[f.name] = gen[f.name]
        sampler = gen.get("sampler_config")
        if isinstance(sampler, dict) and sampler.get("entropy_bound") is not None:
            values["entropy_bound"] = sampler["entropy_bound"]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


_RULES = {
    "max_new_tokens": "a positive integer",
    "max_denoising_steps": "a positive integer",
    "entropy_bound": "a number > 0",
    "t_max": "a number > 0",
    "t_min": "a number > 0",
    "stability_threshold": "an integer >= 0",
    "confidence_threshold": "a number >= 0; 0 means never stop early",
    "restarts": "an integer >= 0",
    "restart_entropy": "a number > 0, or None for the stopping rule alone",
    "restart_after": "an integer > 0, or None to let every attempt run to max_denoising_steps",
    "parallel_attempts": f"an integer from 1 to {MAX_PARALLEL_ATTEMPTS}",
    "eos_token_id": "a token id or a list of token ids",
    "pad_token_id": "a token id or None",
    "seed": "an integer or None",
}
