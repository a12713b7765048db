"""The core thread: the only thread that touches the ``EngineCore``, and the per-request outboxes.

``CoreWorker`` owns an ``EngineCore``. Handlers on the event loop never call it: they put plain commands
(add, abort) into a ``queue.Queue`` inbox, which the thread drains between ``core.step()`` calls, and on
which it sleeps when the core has nothing to do. After each step the thread hands that step's events to
the requests' ``Collector``s through ``loop.call_soon_threadsafe``, one call per step.

A ``Collector`` belongs to one HTTP request and has one slot per choice. When the handler is slower than
the core, updates merge in the slot instead of queueing: a canvas's tokens append to those not yet taken
(so its text deltas append), a newer draft replaces the older one. The core never waits for a client.

If ``core.step()`` raises, the requests that were running in it are aborted and failed (their handlers
get the error), the exception is logged and the thread goes on serving the others.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Hashable

log = logging.getLogger("dgemma.server")


@dataclass
class Update:
    """What one choice has to report since its handler last looked."""

    tokens: list[int] = field(default_factory=list)  # new output tokens (canvases append)
    canvases: int = 0  # canvases those tokens came from
    draft: Any = None  # the latest StepEvent (drafts overwrite)
    finished: bool = False
    result: Any = None  # RowResult once finished
    error: str | None = None  # the request failed: why
    status: int = 500  # HTTP status of that failure (400: the core refused the request)


class Collector:
    """One HTTP request's outbox on the event loop: a merging slot per choice. Use it from the loop only."""

    def __init__(self) -> None:
        self._slots: dict[int, Update] = {}
        self._ready = asyncio.Event()

    def put(self, index: int, kind: str, payload: Any, extra: Any = None) -> None:
        slot = self._slots.setdefault(index, Update())
        if kind == "step":
            slot.draft = payload
        elif kind == "canvas":
            slot.tokens += payload.tokens
            slot.canvases += 1
            if payload.finished:
                slot.finished, slot.result = True, extra
        else:  # "error"
            slot.finished, slot.error, slot.status = True, payload, extra
        self._ready.set()

    async def get(self) -> dict[int, Update]:
        """Wait for news; the merged update of every choice that has some."""
        await self._ready.wait()
        self._ready.clear()
        slots, self._slots = self._slots, {}
        return slots


@dataclass
class _Target:
    loop: asyncio.AbstractEventLoop
    collector: Collector
    index: int
    request: Any = None  # the core's Request (its ``result`` is set when it finishes)


def _deliver(batch: list[tuple[Collector, int, str, Any, Any]]) -> None:
    for collector, index, kind, payload, extra in batch:
        collector.put(index, kind, payload, extra)


class CoreWorker:
    """Runs ``core`` on its own thread. ``submit`` / ``abort`` from the event loop; everything else inside."""

    def __init__(self, core, metrics=None, capacity: int | None = None):
        self.core = core
        self.metrics = metrics
        self.capacity = capacity or getattr(core, "max_num_seqs", 1)
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._undrained = 0  # adds in the inbox
        self._core_waiting = 0  # the core's counts after its last drain or step
        self._core_running = 0
        self._ids = itertools.count()
        self._live: dict[Hashable, _Target] = {}  # core thread only
        self._thread: threading.Thread | None = None
        self._counters: dict[str, int] = {}

    # ------------------------------------------------------------------ event loop side
    def start(self) -> None:
        if self._thread is None:
            self._counters = self._read_counters()
            self._thread = threading.Thread(target=self._run, name="dgemma-core", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._inbox.put(("stop",))
            self._thread.join(timeout)
            self._thread = None

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def queue_depth(self) -> int:
        """Requests waiting for a slot (queued in the core or not yet handed to it)."""
        with self._lock:
            return self._core_waiting + self._undrained

    def running(self) -> int:
        with self._lock:
            return self._core_running

    def submit(self, jobs: list[tuple], collector: Collector, step_events: bool = False,
               max_queue: int | None = None) -> list[int] | None:
        """Queue one core request per ``(prompt_ids, params)`` or ``(prompt_ids, params, constraint)``; their
        ids, or None when the waiting queue would grow past ``max_queue`` (free slots do not count as queue)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if max_queue is not None:
                free = max(0, self.capacity - self._core_running)
                if self._core_waiting + self._undrained + len(jobs) > max_queue + free:
                    return None
            self._undrained += len(jobs)
            ids = [next(self._ids) for _ in jobs]
        for index, (rid, job) in enumerate(zip(ids, jobs)):
            prompt, params, constraint = (*job, None)[:3]
            self._inbox.put(("add", rid, prompt, params, step_events, _Target(loop, collector, index), constraint))
        return ids

    def abort(self, request_ids: list[int]) -> None:
        """Stop these requests; their slots are free before the next step. Unknown or finished ids are ignored."""
        if request_ids:
            self._inbox.put(("abort", list(request_ids)))

    # ------------------------------------------------------------------ core thread
    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                try:
                    if not self._drain(block=not self.core.has_work()):
                        break
                    if self.core.has_work():
                        self._step()
                except Exception:  # noqa: BLE001 - a bug in bookkeeping must not take the server down
                    log.exception("the core thread hit an error; it goes on")
        for rid in list(self._live):  # stopping: whoever still waits gets an answer
            self._fail([rid], "the server is shutting down", 503)

    def _drain(self, block: bool) -> bool:
        """Apply the inbox's commands (waiting for one if ``block``); False on stop."""
        drained = 0
        try:
            while True:
                cmd = self._inbox.get() if block else self._inbox.get_nowait()
                block = False
                if cmd[0] == "stop":
                    return False
                if cmd[0] == "add":
                    drained += 1
                    self._add(*cmd[1:])
                else:
                    for rid in cmd[1]:
                        if self._live.pop(rid, None) is not None:
                            self.core.abort(rid)
        except queue.Empty:
            pass
        finally:
            self._publish(drained)
        return True

    def _add(self, rid, prompt, params, step_events, target: _Target, constraint=None) -> None:
        try:
            target.request = self.core.add(prompt, params, request_id=rid, step_events=step_events,
                                           constraint=constraint)
        except ValueError as e:
            self._send({target.loop: [(target.collector, target.index, "error", str(e), 400)]})
            return
        except Exception as e:  # noqa: BLE001 - a broken request must not stop the thread
            log.exception("adding request %s failed", rid)
            self._send({target.loop: [(target.collector, target.index, "error", f"internal error: {e}", 500)]})
            return
        self._live[rid] = target

    def _publish(self, drained: int = 0) -> None:
        with self._lock:
            self._undrained -= drained
            self._core_waiting = self.core.num_waiting
            self._core_running = self.core.num_running

    def _step(self) -> None:
        try:
            events = self.core.step()
        except Exception as e:  # noqa: BLE001 - fail the requests in this step, keep serving the rest
            log.exception("engine step failed")
            running = [rid for rid in self.core.running_ids() if rid in self._live]
            self._fail(running or list(self._live), f"generation failed: {type(e).__name__}: {e}", 500)
            self._publish()
            return
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for event in events:
            target = self._live.get(event.request_id)
            if target is None:
                continue
            if hasattr(event, "draft"):
                item = (target.collector, target.index, "step", event, None)
            else:
                result = None
                if event.finished:
                    del self._live[event.request_id]
                    result = getattr(target.request, "result", None)
                item = (target.collector, target.index, "canvas", event, result)
            batches.setdefault(target.loop, []).append(item)
        self._send(batches)
        self._publish()
        self._observe()

    def _fail(self, rids: list, message: str, status: int) -> None:
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for rid in rids:
            target = self._live.pop(rid, None)
            try:
                self.core.abort(rid)
            except Exception:  # noqa: BLE001 - the core is already in trouble; the request is failed anyway
                log.exception("aborting request %s failed", rid)
            if target is not None:
                batches.setdefault(target.loop, []).append((target.collector, target.index, "error", message, status))
        self._send(batches)

    @staticmethod
    def _send(batches: dict) -> None:
        for loop, batch in batches.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                pass

    def _read_counters(self) -> dict[str, int]:
        stats = getattr(self.core, "stats", None)
        names = ("generated_tokens", "denoise_steps", "prefix_hit_tokens")
        return {n: int(getattr(stats, n, 0) or 0) for n in names}

    def _observe(self) -> None:
        if self.metrics is None:
            return
        now = self._read_counters()
        deltas = {k: now[k] - self._counters.get(k, 0) for k in now}
        self._counters = now
        rows = int(getattr(getattr(self.core, "stats", None), "last_rows", 0) or 0)
        self.metrics.on_step(deltas, rows)
