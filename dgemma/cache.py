"""KV cache written by encoder mode (prefill, canvas commit) and read by decoder mode (denoising).

One preallocated ``[B, H_kv, capacity, D]`` K and V tensor per layer, and a per-row length. Row ``b``'s
token at absolute position ``p`` lives in slot ``p``, so rows with prompts of different lengths keep their
own positions (no left-padding shift). Slots at or past a row's length hold junk (padding written by a
batched prefill) and are always masked; they are overwritten by that row's next commit.

Sliding-window layers keep every slot and mask by position; this is exactly the reference's dynamic-cache
semantics (the last ``W - 1`` cached positions) without a ring buffer. The cache is an explicit argument of
every model call and never stored on a module.

:class:`CacheRows` is a subset of a cache's rows that model calls take in place of a cache: it reads and
writes the rows it names in the parent's tensors, so the engine core (``dgemma.core``) can run a pass over
the requests that need one while each keeps its row (its slot) for its whole life, never copied.
"""

from __future__ import annotations

import torch

from dgemma.config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, batch_size: int, capacity: int, device=None, dtype=torch.float32):
        self.cfg = cfg
        self.capacity = capacity
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for spec in cfg.layers:
            shape = (batch_size, spec.num_kv_heads, capacity, spec.head_dim)
            self.k.append(torch.zeros(shape, device=device, dtype=dtype))
            self.v.append(torch.zeros(shape, device=device, dtype=dtype))
        self.lengths = torch.zeros(batch_size, dtype=torch.long)  # host copy: drives slicing, never synced

    def ensure(self, capacity: int) -> None:
        """Grow to at least ``capacity`` slots (by doubling, copying what is stored); never shrinks."""
        if capacity <= self.capacity:
            return
        new = max(capacity, min(2 * self.capacity, self.cfg.max_position_embeddings))

        def grow(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros(t.shape[0], t.shape[1], new, t.shape[3])
            out[:, :, : self.capacity] = t
            return out

        k, v = [grow(t) for t in self.k], [grow(t) for t in self.v]  # assigned only once all are grown
        self.k, self.v, self.capacity = k, v, new

    def add_rows(self, n: int) -> None:
        """Append ``n`` empty rows (length 0), copying what is stored; the existing rows keep their index."""
        def grow(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_zeros(n, *t.shape[1:])])

        k, v = [grow(t) for t in self.k], [grow(t) for t in self.v]
        self.k, self.v = k, v
        self.lengths = torch.cat([self.lengths, torch.zeros(n, dtype=torch.long)])

    def key(self) -> tuple:
        """What identifies the memory a pass over this cache reads (CUDA graphs are keyed by it)."""
        return tuple(t.data_ptr() for t in self.k + self.v)

    def rows(self, rows: list[int]) -> "KVCache | CacheRows":
        """The cache itself when ``rows`` is every row in order, else a :class:`CacheRows` view of them."""
        if rows == list(range(self.batch_size)):
            return self
        return CacheRows(self, rows)

    def truncate(self, length: int) -> None:
        """Forget every row's tokens from position ``length`` on (their slots are overwritten next)."""
        self.lengths = torch.minimum(self.lengths, torch.tensor(length))

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor) -> None:
        """Store new keys/values ``[B, H_kv, T, D]`` of row b at slots ``starts[b] .. starts[b] + T``."""
        _store(self, layer, None, k, v, starts)

    def view(self, layer: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots ``[lo, hi)`` for every row."""
        return self.k[layer][:, :, lo:hi], self.v[layer][:, :, lo:hi]


class CacheRows:
    """Rows ``rows`` of a :class:`KVCache`, usable wherever a model call takes a cache.

    ``lengths`` reads the parent's and writes back to it; ``write`` stores into the parent's rows; ``view``
    gathers the rows (a copy of the slots read, as the attention's concatenation with the canvas copies
    anyway). Nothing else of the parent is copied, so a row stopping or joining costs nothing.
    """

    def __init__(self, parent: KVCache, rows: list[int]):
        self.parent, self.cfg, self.capacity = parent, parent.cfg, parent.capacity
        self.index = torch.tensor(rows, dtype=torch.long)  # [n] host
        self._device_index = self.index.to(parent.k[0].device) if parent.k else self.index

    @property
    def lengths(self) -> torch.Tensor:
        return self.parent.lengths.index_select(0, self.index)

    @lengths.setter
    def lengths(self, value: torch.Tensor) -> None:
        self.parent.lengths[self.index] = value

    @property
    def batch_size(self) -> int:
        return self.index.shape[0]

    def key(self) -> tuple:
        return self.parent.key() + tuple(self.index.tolist())

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor) -> None:
        """Store ``[n, H_kv, T, D]`` of view row i at the parent's row ``rows[i]``, slots ``starts[i]`` on."""
        _store(self.parent, layer, self, k, v, starts)

    def view(self, layer: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[n, H_kv, hi - lo, D]`` of slots ``[lo, hi)`` of the view's rows."""
        return (self.parent.k[layer][:, :, lo:hi].index_select(0, self._device_index),
                self.parent.v[layer][:, :, lo:hi].index_select(0, self._device_index))


def _store(cache: KVCache, layer: int, rows: CacheRows | None, k: torch.Tensor, v: torch.Tensor,
           starts: torch.Tensor) -> None:
    """Write ``k``, ``v`` ``[n, H_kv, T, D]`` into ``cache``'s rows (all of them, or those of ``rows``) at
    slots ``starts[i] .. starts[i] + T``: one indexed copy when the starts are equal, else row by row."""
    t = k.shape[2]
    end = int(starts.max()) + t
    if end > cache.capacity:
        raise ValueError(f"KV cache overflow: need {end} slots, capacity is {cache.capacity}")
    index = slice(None) if rows is None else rows._device_index
    if bool((starts == starts[0]).all()):
        s = int(starts[0])
        cache.k[layer][index, :, s : s + t] = k
        cache.v[layer][index, :, s : s + t] = v
        return
    targets = range(k.shape[0]) if rows is None else rows.index.tolist()
    for i, (row, s) in enumerate(zip(targets, starts.tolist())):
        cache.k[layer][row, :, s : s + t] = k[i]
        cache.v[layer][row, :, s : s + t] = v[i]
