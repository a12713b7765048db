"""CPU fast paths of the quantised products: the weight dequantised into a reused per-thread workspace, then
one float matmul. Pure torch, no compiled code, reading the stored layouts of :mod:`dgemma.quant.formats`
as they are (no repacked copy).

Why this and not a fused kernel: on an AVX2 CPU (no AVX-512) torch 2.13's ``_weight_int8pack_mm`` with fp32
activations, ``_weight_int4pack_mm_for_cpu`` and ``torch._int_mm`` ran 16-70x slower than an fp32 matmul of
the same shape (docs/BENCHMARKS.md). What the reference path (``formats.dequantize_*`` then ``F.linear``) loses
besides the matmul is the dequantisation: fresh weight-sized tensors on every call (allocation, page faults)
and for int4 the scales repeated to the full weight size and several full-size temporaries. Here:

* int8: ``codes [N, K]`` int8 are converted into the workspace (one pass), multiplied in place by the per-row
  scale (one pass), then ``F.linear``. The weight equals ``formats.dequantize_int8``'s bit for bit, so the
  product equals the reference path's.
* int4: the packed bytes ``[N, K/2]`` are widened to int16 and split into their two nibbles with int16 ops
  (little-endian: the low byte of each int16 is input ``2j``, the high byte input ``2j + 1``), shifted to
  signed codes in int8, converted into the workspace, and multiplied in place by the group scales viewed
  ``[N, G, group]`` (the row padded to whole groups when the width is not a multiple of the group). The
  weight equals ``formats.dequantize_int4``'s bit for bit, so the product equals the reference path's.

Workspaces are per thread (a server worker and a caller never share one) and per dtype; they grow to the
largest weight block seen, at most ``BLOCK_ELEMENTS`` float elements (a larger weight is processed in blocks of
output rows), plus two int16 buffers of ``N * K`` bytes each for int4: at most 24 MiB per thread in fp32.
``*_weight`` return a workspace view, valid until the next call on the same thread; ``*_linear`` return the
product. Not for autograd (the workspace is overwritten): callers check :func:`supported`.
"""

from __future__ import annotations

import math
import sys
import threading

import torch
import torch.nn.functional as F

from dgemma.quant import formats

LITTLE_ENDIAN = sys.byteorder == "little"  # the int4 nibble split reads the bytes of int16s in this order
BLOCK_ELEMENTS = 1 << 22  # at most 4 Mi weight elements dequantised at a time (16 MiB of fp32 per thread)

_local = threading.local()


def workspace(tag: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A ``shape`` view of this thread's reusable buffer ``(tag, dtype, device)`` (views of one tag share its
    memory); its contents are garbage and are overwritten by the next call with the same tag. Views are cached
    (a product's per-call cost is mostly op launches at these sizes) and dropped when the buffer grows."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    key = (tag, dtype, device)
    buf, views = buffers.get(key, (None, None))
    view = views.get(shape) if views is not None else None
    if view is not None:
        return view
    numel = math.prod(shape)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
            buf, views = torch.empty(numel, dtype=dtype, device=device), {}
        buffers[key] = (buf, views)
    view = views[shape] = buf[:numel].view(shape)
    return view


def release_workspaces() -> None:
    """Frees this thread's workspaces (they are rebuilt on the next call)."""
    _local.buffers = {}


def supported(x: torch.Tensor, scheme: str = "int8") -> bool:
    """Whether the workspace path of ``scheme`` applies to activations ``x``: a float tensor on the CPU, no
    autograd (and for int4 a little-endian machine)."""
    return (x.device.type == "cpu" and x.is_floating_point() and (scheme == "int8" or LITTLE_ENDIAN)
            and not (x.requires_grad and torch.is_grad_enabled()))


def int8_weight(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``codes [n, K]`` int8, ``scale [n]`` -> the weight ``[n, K]`` in ``dtype``, in the workspace (equal to
    ``formats.dequantize_int8``: the same products of exact values)."""
    w = workspace("weight", tuple(codes.shape), dtype, codes.device)  # [n, K]
    w.copy_(codes)
    return w.mul_(scale[:, None])  # the bf16 scales are widened inside the op


def int4_weight(packed: torch.Tensor, scale: torch.Tensor, width: int, group_size: int,
                dtype: torch.dtype) -> torch.Tensor:
    """``packed [n, ceil(width / 2)]`` uint8, ``scale [n, G]`` -> the weight ``[n, width]`` in ``dtype``, in the
    workspace (equal to ``formats.dequantize_int4``; a view of ``[n, G * group_size]`` when the last group is
    short)."""
    n, half = packed.shape
    groups = scale.shape[-1]
    padded = groups * group_size  # >= width
    pairs = workspace("pairs", (n, half), torch.int16, packed.device)  # [n, K/2]
    high = workspace("high", (n, half), torch.int16, packed.device)
    pairs.copy_(packed)  # b = lo + 16 hi, widened
    torch.bitwise_and(pairs, 0xF0, out=high)  # 16 hi
    pairs.add_(high, alpha=15)  # lo + 256 hi: lo in the low byte, hi in the high byte
    codes = pairs.view(torch.int8).sub_(formats.INT4_OFFSET)  # [n, 2 * half] signed codes in input order
    w = workspace("weight", (n, padded), dtype, packed.device)  # [n, G * group]
    if padded == width == 2 * half:
        w.copy_(codes)
    else:  # an odd width or a short last group: zeros past the width (sliced off below)
        w[:, :width].copy_(codes[:, :width])
        w[:, width:].zero_()
    workspace("weight", (n, groups, group_size), dtype, packed.device).mul_(scale[:, :, None])  # [n, G, group]
    return w if padded == width else w[:, :width]


def int8_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [..., K] @ (codes [N, K] * scale [N]).T -> [..., N]`` through the workspace."""
    n, k = codes.shape
    if x.numel() == 0:
        return x.new_empty(*x.shape[:-1], n)
    if n * k <= BLOCK_ELEMENTS:
        return F.linear(x, int8_weight(codes, scale, x.dtype))
    rows = max(1, BLOCK_ELEMENTS // k)
    return torch.cat([F.linear(x, int8_weight(codes[lo:lo + rows], scale[lo:lo + rows], x.dtype))
                      for lo in range(0, n, rows)], dim=-1)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, width: int,
                group_size: int) -> torch.Tensor:
    """``x [..., width] @ W.T -> [..., N]`` for int4 ``packed [N, ceil(width / 2)]``, ``scale [N, G]``."""
    n = packed.shape[0]
    if x.numel() == 0:
        return x.new_empty(*x.shape[:-1], n)
    padded = scale.shape[-1] * group_size
    if n * padded <= BLOCK_ELEMENTS:
        return F.linear(x, int4_weight(packed, scale, width, group_size, x.dtype))
    rows = max(1, BLOCK_ELEMENTS // padded)
    return torch.cat([F.linear(x, int4_weight(packed[lo:lo + rows], scale[lo:lo + rows], width, group_size,
                                              x.dtype)) for lo in range(0, n, rows)], dim=-1)
