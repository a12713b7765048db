"""EngineCore: requests in, events out, one ``step()`` at a time. The only denoising loop in dgemma.

``step()`` advances every running request by one unit of work, in as few model calls as the shapes allow:

1. admit waiting requests into free KV slots (the prefix cache may already hold part of a prompt);
2. encoder: commits of finished canvases (one batched call) and prompt chunks (one right-padded call),
   under the scheduler's token budget; a request whose prompt is now encoded starts its first canvas;
3. decoder: one pass over every request that is denoising, whatever its canvas, attempt or step, then one
   sampler step (``dgemma.sampler.step``: each row at its own temperature, with its own entropy bound
   and its canvas constraint's rule: fixed tokens, allowed sets), then each constraint's update hook;
4. bookkeeping: stopping rule, restarts, the canvas's output cut at EOS / ``max_new_tokens``, retirement.

Rows of one pass are equal to the same request run alone up to float rounding (padding changes matmul
shapes), and draw the same random numbers (each request has its own generator), so a request's tokens do
not depend on what else runs unless a draw falls within that rounding of a decision.

Not thread-safe: one thread calls ``add`` / ``abort`` / ``step`` (the server's core thread, or
``Engine``'s calls in-process).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from dgemma import constraints, sampler
from dgemma.constraints import CanvasConstraint, CanvasRule
from dgemma.core.pool import SlotPool, available_memory, token_bytes
from dgemma.core.request import (ABORTED, COMMIT, DENOISE, FINISHED, Attempt, CanvasEvent, Request, StepEvent)
from dgemma.core.scheduler import Scheduler
from dgemma.params import SamplingParams

DEFAULT_MAX_MODEL_LEN = 8192  # positions per request unless told otherwise (capped by the model's context)
DEFAULT_BATCHED_TOKENS = 2048  # encoder tokens per step (at least one canvas)


@dataclass
class CoreStats:
    """Cumulative counters (the server's /metrics reads them)."""

    prefix_hit_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    encoded_tokens: int = 0  # tokens through the encoder (prompts and commits)
    denoise_steps: int = 0  # row-steps (one request, one step)
    decoder_passes: int = 0
    generated_tokens: int = 0
    last_rows: int = 0  # rows of the last decoder pass (0: the last step had none)


class EngineCore:
    def __init__(self, model, *, max_num_seqs: int = 16, kv_cache_bytes: int | None = None,
                 max_batched_tokens: int | None = None, max_model_len: int | None = None, pad_id: int = 0,
                 fused: bool = True, grow: bool = False):
        """``model``: what runs the passes (``encode``, ``decode_hidden``, ``cfg``, ``device``, ``dtype``, and
        what ``dgemma.denoise`` reads). ``grow``: in-process use; the pool starts small and grows, and
        ``max_model_len`` defaults to the whole context. Otherwise the pool is allocated now: ``slots =
        min(max_num_seqs, kv_cache_bytes // (max_model_len x bytes per position))``."""
        cfg = model.cfg
        self.model, self.cfg, self.pad_id, self.fused = model, cfg, pad_id, fused
        context = cfg.max_position_embeddings
        limit = max_model_len or (context if grow else min(context, DEFAULT_MAX_MODEL_LEN))
        if limit > context:
            raise ValueError(f"max_model_len {limit} is more than the model's context of {context} positions")
        self.max_model_len = limit
        per_position = token_bytes(cfg, model.dtype)
        if grow:
            slots = 1
        else:
            budget = kv_cache_bytes if kv_cache_bytes is not None else available_memory(model.device)
            slots = min(max_num_seqs, budget // (per_position * limit))
            if slots < 1:
                raise ValueError(
                    f"a KV cache of {budget / 2**30:.2f} GiB holds {budget // per_position} positions, less than one "
                    f"request of max_model_len {limit} ({per_position * limit / 2**30:.2f} GiB): give it more memory "
                    f"or lower max_model_len")
        self.pool = SlotPool(cfg, slots, limit, device=model.device, dtype=model.dtype, grow=grow,
                             max_slots=max_num_seqs)
        budget_tokens = max(max_batched_tokens or DEFAULT_BATCHED_TOKENS, cfg.canvas_length)
        self.scheduler = Scheduler(self.pool, max_num_seqs, budget_tokens)
        self.stats = CoreStats()
        self.steps = 0  # engine steps so far
        self._ids = itertools.count()

    # ------------------------------------------------------------------ requests
    @property
    def max_num_seqs(self) -> int:
        return self.scheduler.max_num_seqs

    @property
    def num_slots(self) -> int:
        """KV slots: how many requests can run at once (in grow mode, so far)."""
        return self.pool.slots

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def running_ids(self) -> list:
        return [r.request_id for r in self.scheduler.running]

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError unless the prompt and its canvases fit in ``max_model_len`` positions."""
        c = self.cfg.canvas_length
        need = len(prompt_ids) + math.ceil(params.max_new_tokens / c) * c
        if need > self.max_model_len:
            raise ValueError(
                f"prompt plus max_new_tokens needs {need} positions ({len(prompt_ids)} prompt tokens and "
                f"{math.ceil(params.max_new_tokens / c)} canvases of {c}), more than this model's context of "
                f"{self.max_model_len}")

    def add(self, prompt_ids: list[int], params: SamplingParams, request_id: Any = None,
            step_events: bool = False, initial: torch.Tensor | None = None,
            pinned: torch.Tensor | None = None, constraint: CanvasConstraint | None = None) -> Request:
        """Queue a request. ``constraint``: its canvases' fixed tokens, allowed sets and starting tokens
        (``dgemma.constraints``; one object per request if it keeps state). ``initial`` / ``pinned``
        (``[C]``) override ``params.initial_canvas`` / ``params.pinned_canvas``, which must then be one canvas;
        they are a constraint on canvas 0, combined with ``constraint``. Raises ValueError for a bad request."""
        cfg = self.cfg
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if any(t < 0 or t >= cfg.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {cfg.vocab_size})")
        self.check(prompt_ids, params)
        if initial is None and params.initial_canvas is not None:
            initial = sampler.canvas_rows(params, "initial_canvas", 1, cfg.canvas_length, cfg.vocab_size)[0]
        if pinned is None and params.pinned_canvas is not None:
            pinned = sampler.canvas_rows(params, "pinned_canvas", 1, cfg.canvas_length, cfg.vocab_size)[0]
        if initial is not None or pinned is not None:
            first = constraints.Rules({0: CanvasRule(
                fixed=None if pinned is None else torch.as_tensor(pinned),
                initial=None if initial is None else torch.as_tensor(initial))})
            constraint = first if constraint is None else constraints.Combined(first, constraint)
        if constraint is not None:
            if not isinstance(constraint, CanvasConstraint):
                raise ValueError("constraint must be a dgemma.constraints.CanvasConstraint")
            constraint.validate(cfg.canvas_length, cfg.vocab_size)
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        req = Request(
            request_id=next(self._ids) if request_id is None else request_id, prompt_ids=list(prompt_ids),
            params=params, gen=torch.Generator().manual_seed(seed),
            n_canvases=math.ceil(params.max_new_tokens / cfg.canvas_length), constraint=constraint,
            step_events=step_events)
        req.result.prompt_tokens = len(prompt_ids)
        self.scheduler.add(req)
        return req

    def abort(self, request_id: Any) -> bool:
        """Stop a request now and free its slot; False if it is not queued or running."""
        req = self.scheduler.find(request_id)
        if req is None:
            return False
        self.scheduler.retire(req, ABORTED)
        req.result.finish_reason = "abort"
        req.finished_at = time.monotonic()
        return True

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def step(self) -> list[StepEvent | CanvasEvent]:
        """One unit of work for every running request; returns the events it produced."""
        events: list[StepEvent | CanvasEvent] = []
        self.steps += 1
        for req in self.scheduler.admit(self.steps):
            self.stats.prefix_hit_tokens += req.encoded
            if req.encoded == len(req.prompt_ids):
                self._start_canvas(req)
        commits, chunks = self.scheduler.encoder_work(self.steps)
        if commits:
            self._encode([(r, r.pending.tolist()) for r in commits])
            for r in commits:
                r.result.committed_ids += r.pending.tolist()
                r.pending, r.canvas = None, r.canvas + 1
                self._start_canvas(r)
        if chunks:
            self._encode([(r, r.prompt_ids[r.encoded:r.encoded + n]) for r, n in chunks])
            for r, n in chunks:
                r.encoded += n
                if r.encoded == len(r.prompt_ids):
                    self._start_canvas(r)
        rows = self.scheduler.denoising()
        self.stats.last_rows = len(rows)
        if rows:
            self._denoise(rows, events)
        return events

    def _encode(self, items: list[tuple[Request, list[int]]]) -> None:
        """Encode each request's ``ids`` after what its slot holds: one right-padded call, except rows whose
        padding would run past the pool's capacity, which go alone."""
        longest = max(len(ids) for _, ids in items)
        lengths = self.pool.cache.lengths
        fits = [it for it in items if int(lengths[it[0].slot]) + longest <= self.pool.cache.capacity]
        groups = [fits] if fits else []
        groups += [[it] for it in items if it not in fits]
        for group in groups:
            t = max(len(ids) for _, ids in group)
            batch = torch.full((len(group), t), self.pad_id, dtype=torch.long)
            for i, (_, ids) in enumerate(group):
                batch[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            view = self.pool.rows([r.slot for r, _ in group])
            self.model.encode(batch.to(self.model.device), view, n_valid=torch.tensor([len(ids) for _, ids in group]))
            for r, ids in group:
                self.pool.extend(r.slot, ids)
                self.stats.encoded_tokens += len(ids)

    def _start_canvas(self, req: Request) -> None:
        """A fresh denoising of the request's current canvas (a new canvas, or a restart of this one)."""
        c, vocab = self.cfg.canvas_length, self.cfg.vocab_size
        rule = req.rule = None if req.constraint is None else self._rule(req.constraint.start(req.canvas, req.attempt))
        start = rule.initial if rule is not None else None
        x = start.clone() if start is not None else torch.randint(0, vocab, (c,), generator=req.gen)  # [C]
        if rule is not None and rule.fixed is not None:
            x = torch.where(rule.fixed >= 0, rule.fixed, x)
        req.x, req.soft, req.history, req.last = x, None, [], None
        req.step_index = req.params.max_denoising_steps
        req.status = DENOISE
        if req.attempt == 0:
            req.result.steps.append(0)
            req.best = None

    def _rule(self, rule: CanvasRule | None) -> CanvasRule | None:
        """A constraint's rule checked (ValueError) and resolved, its sets' table on the model's device."""
        if rule is None:
            return None
        rule.check(self.cfg.canvas_length, self.cfg.vocab_size)
        rule = rule.resolved()
        if rule.table is not None:
            rule = CanvasRule(rule.fixed, rule.set_index, rule.table.to(self.model.device), rule.initial)
        return rule

    def _finished(self, req: Request, tokens: torch.Tensor) -> torch.Tensor:
        """The constraint's ``finish`` of a canvas's kept tokens, checked (ValueError)."""
        out = req.constraint.finish(req.canvas, tokens.clone())
        c, vocab = self.cfg.canvas_length, self.cfg.vocab_size
        if not isinstance(out, torch.Tensor) or out.shape != (c,) or out.is_floating_point() or bool(
                ((out < 0) | (out >= vocab)).any()):
            raise ValueError(f"constraint.finish must return {c} token ids in [0, {vocab})")
        return out.long().to(tokens.device)

    def _denoise(self, rows: list[Request], events: list) -> None:
        """One decoder pass and one sampler step for ``rows``, then each row's stopping rule."""
        c, d, vocab, device = self.cfg.canvas_length, self.cfg.hidden_size, self.cfg.vocab_size, self.model.device
        x = torch.stack([r.x for r in rows]).to(device)  # [n, C]
        soft = None
        if any(r.soft is not None for r in rows):  # a zero input is exactly the no-input pass
            zero = torch.zeros(c, d, dtype=self.model.dtype, device=device)
            soft = torch.stack([r.soft if r.soft is not None else zero for r in rows])  # [n, C, d]
        h = self.model.decode_hidden(x, self.pool.rows([r.slot for r in rows]), soft)  # [n, C, d]
        u, noise = [], []
        for r in rows:  # each request's own draws: its uniforms, then its re-noise tokens
            u.append(torch.rand(c, generator=r.gen))
            noise.append(torch.randint(0, vocab, (c,), generator=r.gen))
        mask = constraints.stack([r.rule for r in rows], c)  # fixed [n, C], allowed sets; None: all free
        out = sampler.step(self.model, h, [r.params.temperature(r.step_index) for r in rows],
                           [r.params.entropy_bound for r in rows], torch.stack(u), torch.stack(noise), mask,
                           soft=any(r.step_index > 1 for r in rows), fused=self.fused)
        self.stats.decoder_passes += 1
        self.stats.denoise_steps += len(rows)
        for i, r in enumerate(rows):
            p = r.params
            r.result.steps[-1] += 1
            a = out.argmax[i]
            hist = r.history
            stable = len(hist) >= p.stability_threshold and all(
                torch.equal(prev, a) for prev in hist[len(hist) - p.stability_threshold:])
            if p.stability_threshold:
                hist.append(a)
                del hist[: -p.stability_threshold]
            settled = stable and out.mean_entropy[i] < p.confidence_threshold
            fixed = 0 if r.rule is None or r.rule.fixed is None else int((r.rule.fixed >= 0).sum())
            r.last = Attempt(a, settled, out.mean_entropy[i], out.mean_entropy[i] * c / max(1, c - fixed))
            if r.step_events:
                mask = out.accepted[i]
                events.append(StepEvent(r.request_id, r.canvas, r.result.steps[-1], a.tolist(), int(mask.sum()),
                                        out.mean_entropy[i], mask.tolist(), r.attempt))
            new = None if r.constraint is None else r.constraint.update(r.canvas, r.attempt, r.result.steps[-1], a)
            given_up = p.restart_after is not None and r.attempt < p.restarts and \
                p.max_denoising_steps - r.step_index + 1 >= p.restart_after
            if settled or r.step_index == 1 or given_up:
                self._end_attempt(r, events)
            else:
                r.step_index -= 1
                r.x, r.soft = out.next_x[i], out.soft[i]
                if new is not None:  # the hook's rule holds from the next step: its fixed tokens go in now
                    r.rule = self._rule(new)
                    if r.rule is not None and r.rule.fixed is not None:
                        r.x = torch.where(r.rule.fixed.to(r.x.device) >= 0, r.rule.fixed.to(r.x.device), r.x)

    def _end_attempt(self, req: Request, events: list) -> None:
        """Keep the better attempt; restart the canvas, or emit it and commit it or finish."""
        p = req.params
        if req.best is None or req.last.rank() < req.best.rank():
            req.best = req.last
        if not req.best.qualifies(p) and req.attempt < p.restarts:
            req.attempt += 1
            self._start_canvas(req)
            return
        req.attempt = 0
        tokens = req.best.tokens
        req.result.entropy.append(req.best.free_entropy)
        if req.constraint is not None:  # e.g. a grammar cuts each slot at the terminator the model chose
            tokens = self._finished(req, tokens)
        budget = p.max_new_tokens - len(req.result.token_ids)
        new, hit_eos = sampler.cut(tokens.tolist(), set(p.eos_token_id or ()), budget)
        req.result.token_ids += new
        self.stats.generated_tokens += len(new)
        finished = hit_eos or len(req.result.token_ids) >= p.max_new_tokens
        now = time.monotonic()
        if req.first_canvas_at is None:
            req.first_canvas_at = now
        events.append(CanvasEvent(req.request_id, req.canvas, new, finished))
        if finished:
            req.result.finish_reason = "stop" if hit_eos else "length"
            req.finished_at = now
            req.x = req.soft = req.last = req.best = None  # the soft input keeps a whole step's buffer alive
            req.history = []
            self.scheduler.retire(req, FINISHED)
        else:
            req.pending, req.status, req.ready_step = tokens, COMMIT, self.steps
