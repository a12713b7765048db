"""What the host can do fast: whether this CPU multiplies bf16 matrices in hardware.

Read by the loader (the default dtype on a CPU) and by training (the autocast dtype).
"""

from __future__ import annotations

import functools
import os
import time

import torch

_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
_PROBE_SIZE = 128  # the probe's square matmul: 4 MFLOP, well under a millisecond in fp32
_PROBE_SLOWDOWN = 2.0  # bf16 slower than fp32 by more than this: emulated (hardware bf16 is ~1x or faster)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (x86: AVX-512 BF16 or AMX).

    Without it PyTorch emulates bf16 matmuls, about 100x slower than fp32 (measured on an AVX2 EPYC:
    1.5 vs 112 GFLOP/s), so a bf16 checkpoint is better run in fp32 there. On x86 Linux the answer is the
    ``avx512_bf16`` / ``amx_bf16`` flags of /proc/cpuinfo (an AVX-512 CPU without them emulates bf16 too);
    elsewhere a one-off timed matmul decides (``_bf16_probe``).
    """
    flags = _cpu_flags()
    if flags is not None:
        return bool(flags & _BF16_FLAGS)
    return _bf16_probe()


@functools.cache
def _cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> frozenset[str] | None:
    """The x86 feature flags of ``cpuinfo``'s first ``flags`` line; None where there is none (not Linux, or
    not x86: ARM lists ``Features`` instead)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        return None
    return None


@functools.cache
def _bf16_probe() -> bool:
    """Time a bf16 and an fp32 ``_PROBE_SIZE``-square matmul on one thread (best of 5 after a warm-up; one
    thread, because threads that wait for a busy core make the timings noise): bf16 is fast unless it is more
    than ``_PROBE_SLOWDOWN`` times slower (emulated it is 20-30x slower at this size: an AVX2 EPYC, torch
    2.13, one thread). Runs once per process, in about 10-60 ms where bf16 is emulated."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(_PROBE_SIZE, _PROBE_SIZE, generator=g)  # (N, N) fp32

    def best(x: torch.Tensor) -> float:
        x @ x  # warm-up: kernel selection, first-touch allocation
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            x @ x
            times.append(time.perf_counter() - t0)
        return min(times)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            return best(a.bfloat16()) <= _PROBE_SLOWDOWN * best(a)
    finally:
        torch.set_num_threads(threads)
