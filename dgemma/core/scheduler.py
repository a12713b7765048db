"""The scheduler: who gets a KV slot, and what the encoder does in the next engine step.

* Admission: waiting requests take a free slot in arrival order, whenever one is free (a request does not
  wait for running ones to finish a canvas); the prefix cache may already hold part of the prompt.
* Encoder work, under a token budget per step: commits of finished canvases (``C`` tokens each) and prompt
  chunks, oldest waiting first (a request waits from the step its canvas finished, it was admitted, or
  its last chunk was encoded), so neither kind can starve the other; a long prompt is encoded over
  several steps, going to the back of the line after each chunk.
* Retirement: a finished or aborted request gives its slot back at once; its tokens stay for the prefix
  cache (an aborted prefill's partial prompt is still a valid prefix).
"""

from __future__ import annotations

from collections import deque

from dgemma.core.pool import SlotPool
from dgemma.core.request import ABORTED, COMMIT, DENOISE, FINISHED, PREFILL, WAITING, Request


class Scheduler:
    def __init__(self, pool: SlotPool, max_num_seqs: int, max_batched_tokens: int):
        self.pool, self.max_num_seqs, self.budget = pool, max_num_seqs, max_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # holding a slot, in admission order

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def admit(self, step: int) -> list[Request]:
        """Give free slots to waiting requests, oldest first; returns those admitted."""
        admitted = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            got = self.pool.acquire(req.prompt_ids, self.need(req))
            if got is None:
                break
            self.waiting.popleft()
            req.slot, req.encoded = got
            req.ready_step = step
            req.result.cached_tokens = req.encoded
            req.status = PREFILL
            self.running.append(req)
            admitted.append(req)
        return admitted

    def need(self, req: Request) -> int:
        """Positions the request's slot must hold: its prompt and every canvas but the last."""
        return len(req.prompt_ids) + (req.n_canvases - 1) * self.pool.cfg.canvas_length

    def encoder_work(self, step: int) -> tuple[list[Request], list[tuple[Request, int]]]:
        """Step ``step``'s commits and prompt chunks ``(request, tokens)``, oldest waiting first, within the
        token budget (the first item always goes, so a commit or chunk longer than the budget cannot stall)."""
        ready = [r for r in self.running
                 if r.status == COMMIT or (r.status == PREFILL and r.encoded < len(r.prompt_ids))]
        ready.sort(key=lambda r: r.ready_step)  # stable: admission order among equals
        left = self.budget
        commits, chunks = [], []
        for req in ready:
            first = not (commits or chunks)
            if req.status == COMMIT:
                if left >= len(req.pending) or first:
                    commits.append(req)
                    left -= len(req.pending)
            elif left > 0 or first:
                rest = len(req.prompt_ids) - req.encoded
                n = min(rest, left) if left > 0 else rest
                chunks.append((req, n))
                left -= n
                req.ready_step = step  # the rest of a long prompt waits behind the others
        return commits, chunks

    def denoising(self) -> list[Request]:
        return [r for r in self.running if r.status == DENOISE]

    def retire(self, req: Request, status: str = FINISHED) -> None:
        """Take ``req`` out (finished or aborted) and free its slot at once."""
        if req in self.running:
            self.running.remove(req)
            # an aborted prefill's slot holds part of a prompt: still a valid prefix of what it records
            self.pool.release(req.slot)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = status
        req.slot = None

    def find(self, request_id) -> Request | None:
        for req in self.running:
            if req.request_id == request_id:
                return req
        for req in self.waiting:
            if req.request_id == request_id:
                return req
        return None


__all__ = ["Scheduler", "WAITING", "PREFILL", "DENOISE", "COMMIT", "FINISHED", "ABORTED"]
