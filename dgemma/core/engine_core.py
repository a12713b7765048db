"""EngineCore: requests in, events out, one ``step()`` at a time. The only denoising loop in dgemma.

``step()`` advances every running request by one unit of work, in as few model calls as the shapes allow:

1. admit waiting requests into free KV slots (the prefix cache may already hold part of a prompt);
2. encoder: commits of finished canvases (one batched call) and prompt chunks (one right-padded call),
   under the scheduler's token budget; a request whose prompt is now encoded starts its first canvas;
3. decoder: one pass over every attempt in progress of every request that is denoising (a request runs up
   to ``parallel_attempts`` attempts of its canvas at once, rows reading its one KV slot), whatever its
   canvas, attempt or step, then one sampler step (``dgemma.sampler.step``: each row at its own
   temperature, with its own entropy bound and its canvas constraint's rule: fixed tokens, allowed sets),
   then each constraint's update hook;
4. bookkeeping: stopping rule, restarts (the first attempt that qualifies ends the canvas), the canvas's
   output cut at EOS / ``max_new_tokens``, retirement.

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
from dgemma.core.request import (ABORTED, COMMIT, DENOISE, FINISHED, Attempt, CanvasEvent, Lane, Request,
                                 StepEvent)
from dgemma.core.scheduler import Scheduler
from dgemma.params import SamplingParams

DEFAULT_MAX_MODEL_LEN = 8192  # positions per request unless told otherwise (capped by the model's context)
DEFAULT_BATCHED_TOKENS = 2048  # encoder tokens per step (at least one canvas)


@dataclass
class CoreStats:
    """Cumulative counters (the server's /metrics reads them)."""

    prefix_hit_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    encoded_tokens: int = 0  # tokens through the encoder (prompts and commits)
    denoise_steps: int = 0  # row-steps (one attempt of one request, one step)
    decoder_passes: int = 0
    generated_tokens: int = 0
    last_rows: int = 0  # rows (attempts) of the last decoder pass (0: the last step had none)


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
        req.lanes, req.best = [], None  # a caller that keeps the request does not keep its pass's buffers
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
        denoising = self.scheduler.denoising()
        self.stats.last_rows = 0
        if denoising:
            self._denoise(denoising, events)
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
        """The denoising of the request's current canvas: its first ``parallel_attempts`` attempts (no more than
        ``1 + restarts``), each from fresh noise."""
        p = req.params
        req.attempts, req.best = 0, None
        lanes = [self._new_lane(req) for _ in range(min(p.parallel_attempts, p.restarts + 1))]  # may raise
        req.lanes, req.status = lanes, DENOISE
        req.result.steps.append(0)

    def _new_lane(self, req: Request) -> Lane:
        """The next attempt at the request's current canvas: its rule and starting tokens (drawn from
        ``req.gen`` unless the rule gives them)."""
        c, vocab = self.cfg.canvas_length, self.cfg.vocab_size
        attempt, req.attempts = req.attempts, req.attempts + 1
        rule = None if req.constraint is None else self._rule(req.constraint.start(req.canvas, attempt))
        start = rule.initial if rule is not None else None
        x = start.clone() if start is not None else torch.randint(0, vocab, (c,), generator=req.gen)  # [C]
        if rule is not None and rule.fixed is not None:
            x = torch.where(rule.fixed >= 0, rule.fixed, x)
        return Lane(attempt, x, rule, req.params.max_denoising_steps)

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

    def _denoise(self, reqs: list[Request], events: list) -> None:
        """One decoder pass and one sampler step for every lane of ``reqs`` (each lane a row reading its
        request's KV slot), then each lane's stopping rule."""
        c, d, vocab, device = self.cfg.canvas_length, self.cfg.hidden_size, self.cfg.vocab_size, self.model.device
        rows = [(r, lane) for r in reqs for lane in r.lanes]
        x = torch.stack([lane.x for _, lane in rows]).to(device)  # [n, C]
        soft = None
        if any(lane.soft is not None for _, lane in rows):  # a zero input is exactly the no-input pass
            zero = torch.zeros(c, d, dtype=self.model.dtype, device=device)
            soft = torch.stack([lane.soft if lane.soft is not None else zero for _, lane in rows])  # [n, C, d]
        h = self.model.decode_hidden(x, self.pool.rows([r.slot for r, _ in rows]), soft)  # [n, C, d]
        u, noise = [], []
        for r, _ in rows:  # each request's own draws, lane by lane: its uniforms, then its re-noise tokens
            u.append(torch.rand(c, generator=r.gen))
            noise.append(torch.randint(0, vocab, (c,), generator=r.gen))
        mask = constraints.stack([lane.rule for _, lane in rows], c)  # fixed [n, C], allowed sets; None: all free
        out = sampler.step(self.model, h, [r.params.temperature(lane.step_index) for r, lane in rows],
                           [r.params.entropy_bound for r, _ in rows], torch.stack(u), torch.stack(noise), mask,
                           soft=any(lane.step_index > 1 for _, lane in rows), fused=self.fused)
        self.stats.decoder_passes += 1
        self.stats.denoise_steps += len(rows)
        self.stats.last_rows = len(rows)
        for r in reqs:
            r.result.steps[-1] += 1
        ended: dict[Request, list[Lane]] = {}
        spare = {r: r.params.restarts + 1 - r.attempts for r in reqs}  # attempts each request can still start
        for i, (r, lane) in enumerate(rows):
            if self._advance(r, lane, out, i, events, spare[r] > 0):
                ended.setdefault(r, []).append(lane)
                spare[r] -= 1
        for r, lanes in ended.items():
            self._end_attempts(r, lanes, events)

    def _advance(self, r: Request, lane: Lane, out: sampler.Step, i: int, events: list, replaceable: bool) -> bool:
        """Lane ``lane`` after the step whose row ``i`` of ``out`` is its own: its attempt's state, its step
        event and constraint hook, then True if the attempt ends (settled, at the last step of the schedule, or
        given up after ``restart_after`` steps when ``replaceable``: a new attempt can still take the lane), else
        its next input."""
        p = r.params
        a = out.argmax[i]
        hist = lane.history
        stable = len(hist) >= p.stability_threshold and all(
            torch.equal(prev, a) for prev in hist[len(hist) - p.stability_threshold:])
        if p.stability_threshold:
            hist.append(a)
            del hist[: -p.stability_threshold]
        settled = stable and out.mean_entropy[i] < p.confidence_threshold
        fixed = 0 if lane.rule is None or lane.rule.fixed is None else int((lane.rule.fixed >= 0).sum())
        c = a.shape[0]
        lane.last = Attempt(a, settled, out.mean_entropy[i], out.mean_entropy[i] * c / max(1, c - fixed))
        step = r.result.steps[-1]
        if r.step_events:
            mask = out.accepted[i]
            events.append(StepEvent(r.request_id, r.canvas, step, a.tolist(), int(mask.sum()),
                                    out.mean_entropy[i], mask.tolist(), lane.attempt))
        new = None if r.constraint is None else r.constraint.update(r.canvas, lane.attempt, step, a)
        taken = p.max_denoising_steps - lane.step_index + 1  # steps of this attempt so far
        given_up = replaceable and p.restart_after is not None and taken >= p.restart_after
        if settled or lane.step_index == 1 or given_up:
            return True
        lane.step_index -= 1
        lane.x, lane.soft = out.next_x[i], out.soft[i]
        if new is not None:  # the hook's rule holds from the next step: its fixed tokens go in now
            lane.rule = self._rule(new)
            if lane.rule is not None and lane.rule.fixed is not None:
                fixed_tokens = lane.rule.fixed.to(lane.x.device)
                lane.x = torch.where(fixed_tokens >= 0, fixed_tokens, lane.x)
        return False

    def _end_attempts(self, req: Request, ended: list[Lane], events: list) -> None:
        """Attempts ``ended`` (lanes of ``req``, in lane order) are over: keep the most confident attempt so
        far; end the canvas if it qualifies or no attempt is left, else start new attempts in their lanes."""
        p = req.params
        for lane in ended:
            if req.best is None or lane.last.rank() < req.best.rank():
                req.best = lane.last
        if not req.best.qualifies(p):
            for lane in ended:
                i = req.lanes.index(lane)
                if req.attempts <= p.restarts:
                    req.lanes[i] = self._new_lane(req)
                else:
                    del req.lanes[i]
            if req.lanes:
                return
        self._end_canvas(req, events)

    def _end_canvas(self, req: Request, events: list) -> None:
        """Emit the kept attempt of the canvas, then commit it (more canvases to come) or finish."""
        p = req.params
        tokens = req.best.tokens
        if req.constraint is not None:  # e.g. a grammar cuts each slot at the terminator the model chose
            tokens = self._finished(req, tokens)
        req.lanes = []  # attempts still running lose to one that qualified (their soft inputs are whole buffers)
        req.result.entropy.append(req.best.free_entropy)
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
            req.best = None
            self.scheduler.retire(req, FINISHED)
        else:
            req.pending, req.status, req.ready_step = tokens, COMMIT, self.steps
