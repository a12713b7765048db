"""Measuring instruments: a timing proxy around the model, peak memory, and the machine's matmul rate.

:class:`CallLog` wraps a :class:`~dgemma.model.DiffusionGemma` and records every ``encode`` / ``decode``
call (kind, rows, start lengths, seconds, useful FLOPs) while forwarding everything else, so the benchmark
counts what the sampler really did instead of trusting its own report. On CUDA each call is synchronised
so that its time is its own. Peak memory is the process's resident-set high-water mark on the CPU (reset
through ``/proc/self/clear_refs`` where Linux allows it) and ``max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import re
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dgemma.bench import flops


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mean_ms(fn, reps: int = 10, warmup: int = 3) -> float:
    """Milliseconds per call of ``fn()`` after ``warmup`` calls: CUDA events on a GPU, else one timed call."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        t = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - t)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


@dataclass
class Call:
    kind: str  # "prefill", "commit" or "decode"
    rows: int
    tokens: int  # new tokens per row (encode) or canvas length (decode)
    start: float  # perf_counter at entry
    seconds: float
    flops: int
    bytes: int = 0  # least memory traffic (decoder passes only)


@dataclass
class CallLog:
    """A stand-in for the model that logs each forward pass; everything else is forwarded to ``model``."""

    model: torch.nn.Module
    calls: list[Call] = field(default_factory=list)

    def __getattr__(self, name):  # cfg, device, dtype, logits, embed, ...
        return getattr(self.__dict__["model"], name)

    def _timed(self, kind: str, rows: int, tokens: int, work: int, fn, *args, traffic: int = 0, **kw):
        device = self.model.device
        synchronize(device)
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        synchronize(device)
        self.calls.append(Call(kind, rows, tokens, t0, time.perf_counter() - t0, work, traffic))
        return out

    def _decode_work(self, cache, self_conditioning: bool) -> dict:
        starts, cfg = cache.lengths.tolist(), self.model.cfg
        return {"work": flops.decode_flops(cfg, starts, self_conditioning),
                "traffic": flops.decode_bytes(cfg, starts, self_conditioning, self.model.dtype.itemsize)}

    def encode(self, ids, cache, n_valid=None):
        starts = cache.lengths.tolist()
        n_new = n_valid.tolist() if n_valid is not None else [ids.shape[1]] * ids.shape[0]
        kind = "prefill" if not any(starts) else "commit"
        work = flops.encode_flops(self.model.cfg, starts, n_new)
        return self._timed(kind, ids.shape[0], ids.shape[1], work, self.model.encode, ids, cache, n_valid)

    def decode(self, canvas, cache, sc_logits=None, sc_mask=None):
        w = self._decode_work(cache, sc_logits is not None)
        return self._timed("decode", canvas.shape[0], canvas.shape[1], w["work"], self.model.decode, canvas,
                           cache, sc_logits, sc_mask, traffic=w["traffic"])

    def decode_hidden(self, canvas, cache, soft=None):
        # The sampler's step then computes the LM head and the soft embedding: counted here as well.
        w = self._decode_work(cache, soft is not None)
        return self._timed("decode", canvas.shape[0], canvas.shape[1], w["work"], self.model.decode_hidden,
                           canvas, cache, soft, traffic=w["traffic"])

    def of(self, kind: str) -> list[Call]:
        return [c for c in self.calls if c.kind == kind]


# ---------------------------------------------------------------------------------------------- memory
_STATUS = Path("/proc/self/status")


def _vm_hwm_bytes() -> int | None:
    try:
        m = re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text())
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.bytes`` and ``peak.kind``."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.bytes = 0
        self.kind = "max_allocated" if self.device.type == "cuda" else "peak_rss"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:  # "5" resets the resident-set high-water mark (Linux >= 4.0)
                Path("/proc/self/clear_refs").write_text("5")
                self.kind = "peak_rss"
            except OSError:
                self.kind = "peak_rss_since_start"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = _vm_hwm_bytes()
            self.bytes = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return False


# ---------------------------------------------------------------------------------------------- roofline
def memory_rate(device: torch.device, megabytes: int = 256, reps: int = 5) -> float:
    """Measured bytes/s of a large device-to-device copy (bytes read plus bytes written)."""
    device = torch.device(device)
    src = torch.ones(megabytes << 18, device=device)  # fp32: megabytes MiB
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    synchronize(device)
    return 2 * src.numel() * 4 * reps / (time.perf_counter() - t0)


def matmul_rate(dtype: torch.dtype, device: torch.device, budget_s: float = 0.3, max_n: int = 4096) -> float:
    """Measured FLOP/s of a square matmul in ``dtype`` on ``device``, sized to take about ``budget_s``.

    Starts small and grows, so a dtype the hardware emulates slowly (bf16 on a CPU without AVX-512 BF16
    runs about 100x slower than fp32) is measured in a fraction of a second instead of minutes.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    n, best = 128, 0.0
    while True:
        a = torch.randn(n, n, device=device, generator=gen).to(dtype)
        b = torch.randn(n, n, device=device, generator=gen).to(dtype)
        a @ b  # warm-up
        synchronize(device)
        reps, t0 = 0, time.perf_counter()
        while True:
            a @ b
            reps += 1
            synchronize(device)
            elapsed = time.perf_counter() - t0
            if elapsed > budget_s / 4 or reps >= 50:
                break
        best = max(best, 2 * n**3 * reps / elapsed)
        if elapsed / reps * 8 > budget_s or n >= max_n:  # the next size would blow the budget
            return best
        n *= 2
