"""The two weight formats as tensor functions: int8 per output channel and int4 in groups, both symmetric.

Storage is what :mod:`dgemma.quant.accounting` counts, byte for byte:

* int8: codes ``[..., out, in]`` int8 in ``[-127, 127]`` and one bfloat16 scale per output row
  ``[..., out]``; ``w ~ code * scale``.
* int4: codes in ``[-7, 7]`` stored as ``code + 8`` (0..15), packed two per byte along the input dimension
  (input ``2j`` in the low nibble of byte ``j``, ``2j + 1`` in the high one; an odd width pads a zero code):
  ``[..., out, ceil(in / 2)]`` uint8, and one bfloat16 scale per group of ``group_size`` consecutive inputs
  of a row ``[..., out, ceil(in / group_size)]``; the last group of a row may be shorter (it holds what is
  left), so any positive group size works with any width.

Leading dimensions are batch dimensions: the experts' ``[E, out, in]`` tensors quantise expert by expert, each
row with its own scales. Symmetric rounding with ``scale = absmax / qmax`` rounded *up* to bfloat16 (so that
no code is clipped): every element's error is at most ``scale / 2``. An all-zero row or group gets scale 0
and codes 0 (exact).
"""

from __future__ import annotations

import torch

INT8_MAX = 127  # int8 codes in [-127, 127]: symmetric, -128 unused
INT4_MAX = 7  # int4 codes in [-7, 7], stored with an offset of 8 (nibble 0 unused)
INT4_OFFSET = 8
SCALE_DTYPE = torch.bfloat16  # as the accounting counts them (2 bytes)
SCHEMES = ("int8", "int4")
GROUP_SIZE = 64  # int4 inputs per scale, the default (as accounting.GROUP_SIZE)


def _scale(absmax: torch.Tensor, qmax: int) -> torch.Tensor:
    """``absmax / qmax`` (fp32) rounded up to bfloat16, so that ``absmax / scale <= qmax`` holds exactly."""
    exact = absmax.float() / qmax
    scale = exact.to(SCALE_DTYPE)
    up = torch.nextafter(scale, torch.full_like(scale, float("inf")))
    return torch.where(scale.float() < exact, up, scale)


def _codes(w: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """``round(w / scale)`` in ``[-qmax, qmax]`` (fp32 ``w``, ``scale`` broadcastable), 0 where the scale is 0."""
    s = scale.float()
    q = torch.where(s > 0, w / torch.where(s > 0, s, 1.0), 0.0)
    return q.round_().clamp_(-qmax, qmax)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., out, in]`` (any float dtype) -> codes ``[..., out, in]`` int8, scales ``[..., out]`` bf16."""
    wf = w.detach().float()
    scale = _scale(wf.abs().amax(dim=-1), INT8_MAX)  # [..., out]
    return _codes(wf, scale[..., None], INT8_MAX).to(torch.int8).contiguous(), scale


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes ``[..., out, in]`` int8, scales ``[..., out]`` -> ``[..., out, in]`` in ``dtype``."""
    return codes.to(dtype) * scale.to(dtype)[..., None]


def int4_groups(width: int, group_size: int) -> int:
    """Scales per row of ``width`` inputs: ``ceil(width / group_size)`` (the last group may be shorter)."""
    return -(-width // group_size)


def check_group_size(group_size) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, not {group_size!r}")
    return group_size


def quantize_int4(w: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., out, in]`` -> packed codes ``[..., out, ceil(in / 2)]`` uint8, scales
    ``[..., out, ceil(in / group_size)]`` bf16."""
    check_group_size(group_size)
    wf = w.detach().float()
    width = wf.shape[-1]
    groups = int4_groups(width, group_size)
    pad = groups * group_size - width  # the short last group, padded with zeros (they do not move absmax)
    grouped = torch.nn.functional.pad(wf, (0, pad)).unflatten(-1, (groups, group_size))  # [..., out, G, gs]
    scale = _scale(grouped.abs().amax(dim=-1), INT4_MAX)  # [..., out, G]
    codes = _codes(grouped, scale[..., None], INT4_MAX).flatten(-2)[..., :width]  # [..., out, in]
    return pack_int4(codes.to(torch.int16) + INT4_OFFSET), scale


def quantize(w: torch.Tensor, scheme: str, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` in ``scheme`` (:func:`quantize_int8` or :func:`quantize_int4`). A 3-D ``w [E, out, in]`` is
    quantised one leading slice (expert) at a time, so the fp32 temporaries are one expert's, not the whole
    tensor's (an expert tensor of the 26B model is 1 GB in bf16, its fp32 working copies several GB)."""
    one = quantize_int8 if scheme == "int8" else (lambda x: quantize_int4(x, group_size))
    if w.dim() < 3 or w.is_meta:
        return one(w)
    parts = [one(w[i]) for i in range(w.shape[0])]
    return torch.stack([c for c, _ in parts]), torch.stack([s for _, s in parts])


def pack_int4(nibbles: torch.Tensor) -> torch.Tensor:
    """Values in 0..15 ``[..., in]`` -> ``[..., ceil(in / 2)]`` uint8 (even inputs low, odd inputs high)."""
    if nibbles.shape[-1] % 2:  # an odd width: one padding code that dequantises to 0
        nibbles = torch.nn.functional.pad(nibbles, (0, 1), value=INT4_OFFSET)
    pairs = nibbles.to(torch.uint8).unflatten(-1, (-1, 2))  # [..., in/2, 2]
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, width: int) -> torch.Tensor:
    """``[..., ceil(width / 2)]`` uint8 -> signed codes ``[..., width]`` int8 in ``[-7, 7]``."""
    both = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)[..., :width]  # [..., width]
    return both.to(torch.int8) - INT4_OFFSET


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, width: int, group_size: int = GROUP_SIZE,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """packed ``[..., out, ceil(width / 2)]``, scales ``[..., out, G]`` -> ``[..., out, width]`` in ``dtype``."""
    codes = unpack_int4(packed, width)
    scales = scale.to(dtype).repeat_interleave(group_size, dim=-1)[..., :width]  # [..., out, width]
    return codes.to(dtype) * scales
