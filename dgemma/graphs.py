"""CUDA graphs for the decoder pass: the denoising steps of a canvas replay one captured graph.

A decoder pass of a big MoE model at batch 1 is launch-bound on a GPU: the host needs longer to queue the
thousand-odd kernels than the GPU needs to run them (26B-A4B on an H200: 81 ms of host time for 42 ms of
kernels). Within a canvas every step has the same shapes and reads the same cache slots, so the pass can be
captured once (``torch.cuda.CUDAGraph``) and replayed: a replay is one launch.

:class:`GraphedDecoder` stands in for the model where the sampler takes one: every attribute is the model's,
except ``decode_hidden``, which

* runs eagerly off CUDA, with gradients enabled, or when the model cannot be captured (the per-expert
  loop, which reads the expert counts back to the host: fp32 or fp16 unless ``Experts.grouped`` is set);
* otherwise looks up a graph by everything the captured pass depends on (the cache's tensors, the rows'
  lengths, the canvas and soft-embedding shapes); on a miss it warms up on a side stream (once per shape),
  captures, and keeps at most ``keep`` graphs (one memory pool shared by all); on a hit it copies the
  canvas and the soft embedding into the graph's input buffers and replays. The first step of a canvas
  (no self-conditioning input) captures, with a zero soft embedding, the graph that its other steps replay:
  a zero input adds exactly 0 in ``SelfConditioning``, so this is the no-input pass.

With ``reuse=True`` the lengths are not part of the key: the graph is captured over
:class:`~dgemma.model.diffusion_gemma.StaticDecoderKV`, whose positions and masks are refilled before a
replay, so one capture serves every canvas of a generation while all its rows stay active (a pass over a
subset of the rows, a :class:`~dgemma.cache.CacheRows` view, is keyed by its rows and lengths, as without reuse).
Not yet measured on a GPU; off by default. It always passes masks, so the sliding layers lose their
unmasked kernel.

The host-side part of the pass (positions, masks) is computed once per graph by
:meth:`~dgemma.model.diffusion_gemma.DiffusionGemma.decode_inputs`; the captured part,
:meth:`~dgemma.model.diffusion_gemma.DiffusionGemma.decode_with`, makes no host reads or copies.
The eager path (:meth:`DiffusionGemma.decode_hidden`) stays the reference; a test compares them on CUDA
(on an H200: bitwise-equal passes on the small random model, the same tokens on the tiny one; the 26B
config's tokens are compared by ``benchmarks/gpu_graphs_check.py --preset 26b-a4b``). ``Engine`` uses graphs by default on CUDA.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch

from dgemma.cache import KVCache
from dgemma.model.diffusion_gemma import StaticDecoderKV


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    canvas: torch.Tensor  # [B, C] long, input buffer
    soft: torch.Tensor  # [B, C, d], input buffer
    out: torch.Tensor  # [B, C, d], written by each replay
    keep_alive: tuple  # positions and masks the graph reads
    kv: StaticDecoderKV | None = None  # reuse mode: the length inputs, refilled before a replay


class GraphedDecoder:
    """The model, with ``decode_hidden`` replayed from CUDA graphs where it can be (see the module doc)."""

    def __init__(self, model, keep: int = 2, reuse: bool = False):
        self.model, self.keep = model, keep
        # reuse: one graph per cache serves every canvas (StaticDecoderKV: the lengths are inputs), instead
        # of one per canvas. Saves a capture per canvas; attends over the whole cache on full layers.
        self.reuse = reuse
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()  # least recently used first
        self.pool = self.side = None  # graph memory pool and warm-up stream, made at the first capture
        self.warmed: set[tuple] = set()  # the shapes (and mask presence) a warm-up pass has run for
        self.disabled: str | None = None  # why capturing stopped, if it did
        self.captures = self.replays = 0

    def __getattr__(self, name):  # cfg, device, dtype, encode, logits, embed_tokens, ...
        return getattr(self.__dict__["model"], name)

    def capturable(self, canvas: torch.Tensor) -> bool:
        """Whether ``decode_hidden`` on this input can go through a graph."""
        if self.disabled or not canvas.is_cuda or torch.is_grad_enabled():
            return False
        # The per-expert loop reads the expert counts back to the host, which a capture cannot do.
        return all(layer.experts.uses_grouped(canvas.device, self.model.dtype) for layer in self.model.layers)

    def decode_hidden(self, canvas: torch.Tensor, cache: KVCache, soft: torch.Tensor | None = None) -> torch.Tensor:
        if not self.capturable(canvas):
            return self.model.decode_hidden(canvas, cache, soft)
        # The first step of a canvas has no self-conditioning input: it replays the same graph with a zero
        # soft embedding, which SelfConditioning turns into exactly the no-input pass (it adds exactly 0).
        shape, dtype = (*canvas.shape, self.model.cfg.hidden_size), self.model.dtype
        if soft is not None:
            shape, dtype = tuple(soft.shape), soft.dtype
        reuse = self.reuse and isinstance(cache, KVCache)  # a CacheRows view is keyed by its rows and lengths
        lengths = () if reuse else tuple(cache.lengths.tolist())
        key = (cache.key(), cache.capacity, lengths, tuple(canvas.shape), shape, dtype,
               torch.is_inference_mode_enabled(), reuse)
        g = self.graphs.get(key)
        if g is None:
            g = self._capture_or_none(canvas, cache, soft if soft is not None else canvas.new_zeros(shape, dtype=dtype),
                                      reuse)
            if g is None:
                return self.model.decode_hidden(canvas, cache, soft)
            self.graphs[key] = g
            while len(self.graphs) > self.keep:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        if g.kv is not None:
            g.kv.update(cache)  # the next canvas of the same cache: new lengths
        g.canvas.copy_(canvas)
        if soft is None:
            g.soft.zero_()
        else:
            g.soft.copy_(soft)
        g.graph.replay()
        self.replays += 1
        return g.out.clone()  # the buffer is overwritten by the next replay

    def release(self) -> None:
        """Drop every graph and the memory pool they share (the next pass captures afresh)."""
        self.graphs.clear()
        self.pool = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _capture_or_none(self, canvas: torch.Tensor, cache: KVCache, soft: torch.Tensor,
                         reuse: bool = False) -> _Graph | None:
        """A new graph, or None (decode this pass eagerly). Out of memory: eager this time only. Another
        failure (an op that syncs with the host, say): once more with a warm-up pass first, in case the
        skipped one was needed, then eager from now on."""
        for force_warmup in (False, True):
            try:
                return self._capture(canvas, cache, soft, force_warmup, reuse)
            except torch.OutOfMemoryError:
                self.release()
                return None
            except RuntimeError as e:
                torch.cuda.synchronize(canvas.device)
                if not force_warmup:
                    continue
                self.disabled = str(e)
                self.release()
                warnings.warn(f"CUDA graph capture failed, decoding eagerly: {e}", RuntimeWarning, stacklevel=3)
        return None

    def _capture(self, canvas: torch.Tensor, cache: KVCache, soft: torch.Tensor,
                 force_warmup: bool = False, reuse: bool = False) -> _Graph:
        device = canvas.device
        if reuse:
            kv = StaticDecoderKV(cache, canvas.shape[1], self.model.cfg.sliding_window, device)
            positions = kv.positions
        else:
            positions, kv = self.model.decode_inputs(cache, canvas.shape[1])
        static_canvas, static_soft = canvas.clone(), soft.clone()
        # Warm-up: lazy library state (handles, kernel choices) is set up outside the capture. A canvas after
        # the first has other cache lengths (a new graph) but the same shapes and kernels: no second warm-up,
        # which would cost an eager pass per canvas (if one were needed, the capture fails and
        # _capture_or_none retries it with the warm-up).
        shapes = (tuple(canvas.shape), tuple(soft.shape), soft.dtype, cache.lengths.unique().numel() == 1, reuse)
        if force_warmup or shapes not in self.warmed:
            if self.side is None:  # one side stream: blocks the warm-ups free stay reusable by the next ones
                self.side = torch.cuda.Stream(device)
            side = self.side
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                self.model.decode_with(static_canvas, positions, kv, static_soft)
            torch.cuda.current_stream(device).wait_stream(side)
            self.warmed.add(shapes)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.model.decode_with(static_canvas, positions, kv, static_soft)
        # The graph reads the cache by address; holding it would keep a dead cache alive. A CacheRows view's
        # row index is read by address too: it stays with the graph.
        rows = getattr(cache, "_device_index", None)
        kv.cache = None
        self.captures += 1
        return _Graph(graph, static_canvas, static_soft, out, (positions, kv, rows), kv if reuse else None)
