"""What a live view shows, folded from ``Engine.stream`` events; pure Python, no rendering.

The draft is the current argmax canvas. A position is *settled* when the sampler accepted its token this
step (low entropy) and *noise* otherwise (it was re-drawn at random); *fresh* marks positions settled
now that were noise at the previous step (or hold a different token), which views highlight. What is not
known yet (tokens/s before the first commit, settled positions and entropy before a canvas's first step)
shows as ``-``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class CanvasState:
    max_steps: int
    eos_ids: frozenset[int] = frozenset()
    clock: Callable[[], float] = time.perf_counter
    committed: list[int] = field(default_factory=list)  # token ids of committed canvases
    committed_text: str = ""
    canvas: int = 0  # index of the canvas being denoised
    step: int = 0  # step within it, from 1 (with restarts: counting every attempt)
    attempt: int = 0  # restarts: which denoising of the canvas, from 0
    draft: list[int] = field(default_factory=list)
    settled: list[bool] = field(default_factory=list)
    fresh: list[bool] = field(default_factory=list)
    mean_entropy: float = math.nan
    steps_per_canvas: list[int] = field(default_factory=list)
    canvas_seconds: list[float] = field(default_factory=list)  # from the start to each commit
    completion: object = None  # the Engine's Completion, set by the last event
    started: float = 0.0

    def __post_init__(self):
        self.started = self.clock()

    @classmethod
    def for_params(cls, params) -> "CanvasState":
        """A fresh state for a run with these SamplingParams (step budget, EOS ids)."""
        return cls(max_steps=params.max_denoising_steps, eos_ids=frozenset(params.eos_token_id or ()))

    @property
    def done(self) -> bool:
        return self.completion is not None

    @property
    def elapsed(self) -> float:
        return self.clock() - self.started

    def tokens_per_s(self) -> float | None:
        """Committed tokens over the time since the start (None before the first commit: not known yet)."""
        return len(self.committed) / self.elapsed if self.committed else None

    def _rate(self) -> str:
        rate = self.tokens_per_s()
        return "- tok/s" if rate is None else f"{rate:.1f} tok/s"

    def visible_draft(self) -> list[tuple[int, bool, bool]]:
        """``(token, settled, fresh)`` of the draft up to (excluding) its first settled EOS."""
        out = []
        for tok, ok, new in zip(self.draft, self.settled, self.fresh):
            if ok and tok in self.eos_ids:
                break
            out.append((tok, ok, new))
        return out

    def update(self, event) -> None:
        """Fold one ``StepUpdate`` or ``CanvasUpdate`` in (duck-typed: views need no engine import)."""
        if hasattr(event, "draft_tokens"):  # a denoising step
            mask = list(event.accepted_mask) or [True] * len(event.draft_tokens)
            attempt = getattr(event, "attempt", 0)
            if event.canvas == self.canvas and event.step == self.step and attempt != self.attempt:
                return  # another attempt of the same pass (parallel_attempts): the view follows the first
            if event.canvas != self.canvas or event.step == 1 or attempt != self.attempt:
                before, before_ok = [None] * len(mask), [False] * len(mask)
            else:
                before, before_ok = self.draft, self.settled
            self.fresh = [ok and (not was or old != tok)
                          for tok, ok, old, was in zip(event.draft_tokens, mask, before, before_ok)]
            self.canvas, self.step, self.attempt = event.canvas, event.step, attempt
            self.draft, self.settled = list(event.draft_tokens), mask
            self.mean_entropy = event.mean_entropy
            return
        self.committed += list(event.tokens)
        self.committed_text += event.text_delta
        self.steps_per_canvas.append(self.step)
        self.canvas_seconds.append(self.elapsed)
        self.draft, self.settled, self.fresh = [], [], []
        self.canvas, self.step, self.attempt, self.mean_entropy = event.canvas + 1, 0, 0, math.nan
        if event.completion is not None:
            self.completion = event.completion

    def status(self) -> str:
        if self.done:
            steps = sum(self.steps_per_canvas)
            return (f"done: {len(self.committed)} tokens, {len(self.steps_per_canvas)} canvas(es), {steps} steps, "
                    f"{self.elapsed:.2f} s, {self._rate()}")
        entropy = "-" if math.isnan(self.mean_entropy) else f"{self.mean_entropy:.3f}"
        # Before a canvas's first step there is no draft yet: "-" rather than a misleading 0/0.
        settled = f"{sum(self.settled)}/{len(self.draft)}" if self.draft else "-"
        step = f"attempt {self.attempt + 1}  step {self.step}" if self.attempt else f"step {self.step}/{self.max_steps}"
        return (f"canvas {self.canvas + 1}  {step}  settled {settled}"
                f"  mean entropy {entropy}  {self._rate()}  {self.elapsed:.1f} s")
