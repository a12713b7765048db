"""A request's state in the engine core, and the events and result the core reports for it.

Life of a :class:`Request`: ``waiting`` (queued) -> ``prefill`` (holds a KV slot; its prompt is encoded,
in chunks under the step's token budget, after whatever the prefix cache already held) -> ``denoise``
(canvas k: one decoder pass and one sampler step per engine step for each of its attempts in progress, its
:class:`Lane` s) -> ``commit`` (the chosen canvas goes through the encoder) -> ``denoise`` (canvas k+1) ... ->
``finished``; ``aborted`` from any state. The last canvas is never committed.

Attempts (restarts): a canvas is denoised up to ``1 + params.restarts`` times from fresh noise, up to
``params.parallel_attempts`` of them at once, each a row of the same decoder pass reading the request's one
KV slot. The first attempt that qualifies (``Attempt.qualifies``) ends the canvas; if none does, the most
confident one is kept when the last ends.

A request owns its RNG: one CPU ``torch.Generator`` seeded with ``params.seed`` that draws only for this
request (a canvas's starting noise, then per step the uniforms and the re-noise tokens), so its random
numbers do not depend on what else is running (its lanes draw in lane order).

A request holds one canvas constraint (``dgemma.constraints``; ``initial_canvas`` and ``pinned_canvas``
are one), asked for a rule at the start of each denoising of a canvas and after each of its steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Hashable

import torch

from dgemma.constraints import CanvasConstraint, CanvasRule
from dgemma.params import SamplingParams

WAITING, PREFILL, DENOISE, COMMIT, FINISHED, ABORTED = "waiting", "prefill", "denoise", "commit", "finished", "aborted"


@dataclass
class StepEvent:
    request_id: Hashable
    canvas: int  # canvas index within this generation, from 0
    step: int  # decoder pass of the canvas, from 1 (restarts go on counting; the attempts of a pass share it)
    draft: list[int]  # current argmax canvas
    accepted: int  # positions that kept their sampled token this step
    mean_entropy: float
    accepted_mask: list[bool] = field(default_factory=list)  # which positions those are ([C])
    attempt: int = 0  # restarts: which denoising of this canvas, from 0


@dataclass
class CanvasEvent:
    request_id: Hashable
    canvas: int
    tokens: list[int]  # the new tokens this canvas contributes (cut at EOS / max_new_tokens)
    finished: bool  # the request's last event; its Request.result is then set


@dataclass
class RowResult:
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (EOS), "length", or "abort"
    steps: list[int] = field(default_factory=list)  # denoising steps used by each canvas
    prompt_tokens: int = 0
    committed_ids: list[int] = field(default_factory=list)  # whole canvases committed to the cache, in order
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (not encoded)
    # each canvas's kept attempt: the mean entropy of its last step over the positions a constraint did
    # not fix (the model's own uncertainty about what it chose; lower is more confident)
    entropy: list[float] = field(default_factory=list)


@dataclass
class Attempt:
    """One denoising of a canvas: its argmax canvas, whether it met the stopping rule, its last mean entropy."""

    tokens: torch.Tensor  # [C]
    settled: bool
    entropy: float  # mean over the canvas, fixed positions counting 0
    free_entropy: float = 0.0  # mean over the positions the constraint left free

    def qualifies(self, params: SamplingParams) -> bool:
        """Kept without a restart: settled, and below ``restart_entropy`` when that is set."""
        return self.settled and (params.restart_entropy is None or self.entropy < params.restart_entropy)

    def rank(self) -> tuple[bool, float]:
        """Lower is more confident: settled before unsettled, then lower final mean entropy."""
        return (not self.settled, self.entropy)


@dataclass(eq=False)
class Lane:
    """One attempt at a canvas in progress: a row of the decoder pass that reads its request's KV slot."""

    attempt: int  # which attempt of the canvas, from 0
    x: torch.Tensor  # [C] decoder input of the next step
    rule: CanvasRule | None  # the constraint's rule for the next step (resolved; None: free)
    step_index: int  # counts down from max_denoising_steps to 1 (the temperature schedule's index)
    soft: torch.Tensor | None = None  # [C, d] self-conditioning input of the next step (None: first step)
    history: list[torch.Tensor] = field(default_factory=list)  # previous argmax canvases, newest last
    last: Attempt | None = None  # this attempt's state after its latest step


@dataclass(eq=False)
class Request:
    request_id: Any
    prompt_ids: list[int]
    params: SamplingParams
    gen: torch.Generator  # this request's random numbers, and only its
    n_canvases: int
    constraint: CanvasConstraint | None = None  # its canvases' fixed tokens, allowed sets, starting tokens
    step_events: bool = False
    status: str = WAITING
    slot: int | None = None  # its row of the KV pool while it holds one
    encoded: int = 0  # prompt tokens whose K/V are in the slot (prefix-cache hits included)
    # the canvas in progress
    canvas: int = 0
    lanes: list[Lane] = field(default_factory=list)  # its attempts in progress (params.parallel_attempts at most)
    attempts: int = 0  # attempts of this canvas started so far
    best: Attempt | None = None  # the most confident finished attempt of this canvas
    pending: torch.Tensor | None = None  # [C] the canvas to commit next
    ready_step: int = 0  # the engine step since which it waits for the encoder (commit or prompt chunk)
    result: RowResult = field(default_factory=RowResult)
    arrival: float = field(default_factory=time.monotonic)
    first_canvas_at: float | None = None
    finished_at: float | None = None

    @property
    def done(self) -> bool:
        return self.status in (FINISHED, ABORTED)
