"""The KV pool: one preallocated :class:`~dgemma.cache.KVCache` whose rows are slots, lent to requests.

A request holds one slot (one row of ``max_model_len`` positions) from admission to its end; its K/V are
written there by prefill and commits and read by its denoising passes, through a
:class:`~dgemma.cache.CacheRows` view of the rows a pass needs. A slot is never copied when a request stops.

Prefix cache: a slot remembers the token ids whose K/V it holds (a request's prompt and committed
canvases) after it is freed. A new request takes the free slot that shares the longest prefix with its
prompt and keeps those positions (the encoder is causal, so a position's K/V depend only on the tokens up
to it); failing that, when a running request's slot shares at least ``MIN_COPY`` tokens, those positions
are copied into the new slot. Free slots are otherwise reused least recently freed first.

Size: ``slots x max_model_len`` positions, from a memory budget in bytes. With ``grow`` (in-process use,
where the budget is not known) the pool starts small and adds rows or positions as requests need them.
"""

from __future__ import annotations

import os

import torch

from dgemma.cache import CacheRows, KVCache
from dgemma.config import ModelConfig

MIN_COPY = 16  # fewest shared tokens worth copying from a running request's slot instead of encoding them
CPU_BUDGET_SHARE = 0.25  # default KV budget: this share of the available memory (CPU) ...
GPU_BUDGET_SHARE = 0.8  # ... or of the free device memory after the weights (CUDA)


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def available_memory(device: torch.device) -> int:
    """Bytes free for the KV pool on ``device``: the device's free memory (CUDA), else MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_BUDGET_SHARE)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * CPU_BUDGET_SHARE)
    except OSError:
        pass
    pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
    return int(pages * os.sysconf("SC_PAGE_SIZE") * CPU_BUDGET_SHARE)


def token_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of K and V for one position over all layers."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(2 * spec.num_kv_heads * spec.head_dim * size for spec in cfg.layers)


class SlotPool:
    def __init__(self, cfg: ModelConfig, slots: int, max_model_len: int, device=None,
                 dtype: torch.dtype = torch.float32, grow: bool = False, max_slots: int | None = None):
        self.cfg, self.max_model_len, self.grow = cfg, max_model_len, grow
        self.max_slots = max_slots if max_slots is not None else slots
        # grow: start with room for what the first requests need; the pool extends on demand
        capacity = min(max_model_len, 2 * cfg.canvas_length) if grow else max_model_len
        self.cache = KVCache(cfg, slots, capacity, device=device, dtype=dtype)
        self.held: list[list[int]] = [[] for _ in range(slots)]  # ids whose K/V slot s holds (its length)
        self.busy = [False] * slots
        self.free_order: list[int] = list(range(slots))  # least recently freed first

    @property
    def slots(self) -> int:
        return self.cache.batch_size

    def acquire(self, prompt: list[int], need: int) -> tuple[int, int] | None:
        """A slot for a request whose prompt is ``prompt`` and which will use ``need`` positions, and how
        many of the prompt's tokens it already holds; None when no slot is free."""
        if need > self.cache.capacity:
            self.cache.ensure(need)  # only in grow mode: otherwise need <= max_model_len = capacity
        if not self.free_order:
            if not self.grow or self.slots >= self.max_slots:
                return None
            n = self.slots
            self.cache.add_rows(min(n, self.max_slots - n) or 1)  # double, up to max_slots
            self.held += [[] for _ in range(self.slots - n)]
            self.busy += [False] * (self.slots - n)
            self.free_order += list(range(n, self.slots))
        hits = [(_common(self.held[s], prompt), s) for s in self.free_order]
        best, hit = max(hits, key=lambda h: (h[0], -self.free_order.index(h[1])))  # ties: least recently freed
        shared = [(_common(self.held[s], prompt), s) for s in range(self.slots) if self.busy[s]]
        copy, source = max(shared, default=(0, -1))
        if copy >= MIN_COPY and copy > best:  # a running request holds more of the prompt: copy its positions
            slot = next((s for s in self.free_order if s != hit or best == 0), hit)  # keep a partial hit if we can
            self._copy(source, slot, copy)
            best = copy
        else:
            slot = hit if best > 0 else self.free_order[0]
        self.free_order.remove(slot)
        self.busy[slot] = True
        self.truncate(slot, prompt[:best])
        return slot, best

    def _copy(self, source: int, target: int, n: int) -> None:
        """Positions ``[0, n)`` of slot ``source`` into slot ``target`` (every layer)."""
        for t in self.cache.k + self.cache.v:
            t[target, :, :n] = t[source, :, :n]
        self.cache.lengths[target] = n
        self.held[target] = self.held[source][:n]

    def truncate(self, slot: int, ids: list[int]) -> None:
        """Slot ``slot`` holds exactly ``ids`` (a prefix of what it held)."""
        self.held[slot] = list(ids)
        self.cache.lengths[slot] = len(ids)

    def extend(self, slot: int, ids: list[int]) -> None:
        """Record that ``ids`` were just encoded after what slot ``slot`` held."""
        self.held[slot] += ids

    def release(self, slot: int, keep: bool = True) -> None:
        """Free ``slot``; with ``keep`` its tokens stay for the prefix cache (else it is forgotten)."""
        self.busy[slot] = False
        if not keep:
            self.truncate(slot, [])
        self.free_order.append(slot)

    def rows(self, slots: list[int]) -> KVCache | CacheRows:
        return self.cache.rows(slots)
