"""The scheduler: who gets a KV slot, and what the encoder does in the next engine step.

* Admission: waiting requests take a free slot in arrival order, whenever one is free (a request does not
  wait for running ones to finish a canvas); the prefix cache may already hold part of the prompt.
* Encoder work, under a token budget per step: first the commits of finished canvases (``C`` tokens each,
  so that those requests go on denoising), then prompt chunks of requests in prefill, in arrival order; a
  long prompt is encoded over several steps.
* Retirement: a finished or aborted request gives its slot back at once (its tokens stay for the prefix
  cache unless it was aborted mid-prefill).
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

    def admit(self) -> list[Request]:
        """Give free slots to waiting requests, oldest first; returns those admitted."""
        admitted = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            got = self.pool.acquire(req.prompt_ids, self.need(req))
            if got is None:
                break
            self.waiting.popleft()
            req.slot, req.encoded = got
            req.result.cached_tokens = req.encoded
            req.status = PREFILL
            self.running.append(req)
            admitted.append(req)
        return admitted

    def need(self, req: Request) -> int:
        """Positions the request's slot must hold: its prompt and every canvas but the last."""
        return len(req.prompt_ids) + (req.n_canvases - 1) * self.pool.cfg.canvas_length

    def encoder_work(self) -> tuple[list[Request], list[tuple[Request, int]]]:
        """This step's commits and prompt chunks ``(request, tokens)``, within the token budget (one item
        always goes, so a commit or chunk longer than the budget cannot stall)."""
        left = self.budget
        commits, chunks = [], []
        for req in self.running:
            if req.status == COMMIT and (left >= len(req.pending) or not (commits or chunks)):
                commits.append(req)
                left -= len(req.pending)
        for req in self.running:
            if req.status == PREFILL and req.encoded < len(req.prompt_ids):
                n = min(len(req.prompt_ids) - req.encoded, max(left, 0))
                if n == 0 and (commits or chunks):
                    break
                n = n or len(req.prompt_ids) - req.encoded
                chunks.append((req, n))
                left -= n
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
