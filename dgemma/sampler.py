"""The math of one denoising step over a batch of canvases, each row with its own settings.

Spec section 5, per step: the decoder's hidden states give tempered logits (each row at its own point of the
linear temperature schedule), every position is sampled, the lowest-entropy positions under the row's
entropy budget keep their samples, the rest are re-noised, and the tempered distribution is fed back as the
next step's self-conditioning input. A row's canvas constraint (``dgemma.constraints``) restricts each
position to its allowed tokens (in the tempered logits, so entropy and acceptance are over them) and holds
its fixed tokens (entropy 0: always accepted, never re-noised, certain for the stopping rule).

The loop around it (which rows step, when a canvas stops, restarts, commits) is the engine core's
(``dgemma.core``): one step function for every request, batched or alone. Random numbers come from the
caller (each request's own generator), so a row's draws do not depend on its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dgemma import denoise
from dgemma.constraints import StepMask
from dgemma.params import SamplingParams


def entropy_bound_accept(entropy: torch.Tensor, bound: float | torch.Tensor) -> torch.Tensor:
    """Accept the k lowest-entropy positions with ``sum(h_1..h_k) - h_k <= bound`` (>= 1 per row).

    ``entropy [N, C]``, ``bound`` a number or ``[N, 1]`` -> bool ``[N, C]``. Recomputed from scratch every
    step (nothing stays frozen).
    """
    sorted_h, order = torch.sort(entropy, dim=-1)
    keep = (torch.cumsum(sorted_h, dim=-1) - sorted_h) <= bound
    return torch.zeros_like(keep).scatter(-1, order, keep)


def canvas_rows(params: SamplingParams, name: str, n_rows: int, length: int, vocab: int) -> list[torch.Tensor] | None:
    """``params.<name>`` (``initial_canvas`` or ``pinned_canvas``) as one ``[C]`` tensor per row, validated;
    ``pinned_canvas`` also takes -1 (a free position)."""
    value = getattr(params, name)
    if value is None:
        return None
    try:
        canvas = torch.as_tensor(value, dtype=torch.long)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"invalid sampling parameter `{name}`: expected {length} integers "
                         f"(or {n_rows} rows of {length})") from None
    if canvas.ndim == 1:
        canvas = canvas.expand(n_rows, -1)
    if canvas.ndim != 2 or canvas.shape != (n_rows, length):
        raise ValueError(
            f"invalid sampling parameter `{name}`: expected {length} token ids "
            f"(or {n_rows} rows of {length}), got shape {list(canvas.shape)}"
        )
    low = -1 if name == "pinned_canvas" else 0
    if bool(((canvas < low) | (canvas >= vocab)).any()):
        allowed = f"in [0, {vocab})" + (" or -1 (free)" if low < 0 else "")
        raise ValueError(f"invalid sampling parameter `{name}`: token ids must be {allowed}")
    return list(canvas)


def cut(tokens: list[int], eos: set[int], budget: int) -> tuple[list[int], bool]:
    """Tokens up to (excluding) the first EOS and at most ``budget`` of them; whether an EOS was hit."""
    for i, t in enumerate(tokens[:budget]):
        if t in eos:
            return tokens[:i], True
    return tokens[:budget], False




@dataclass
class Step:
    """What one denoising step decided, for ``n`` rows."""

    next_x: torch.Tensor  # [n, C] next decoder input: accepted samples, fresh noise elsewhere
    argmax: torch.Tensor  # [n, C] long, on the host: the draft
    accepted: torch.Tensor  # [n, C] bool, on the host
    mean_entropy: list[float]  # per row, fixed positions counting 0
    soft: torch.Tensor | None  # [n, C, d] the next step's self-conditioning input


def one_of(values: list[float]) -> float | torch.Tensor:
    """One number when every row has the same value (the cheaper path), else ``[n]`` float64."""
    return values[0] if all(v == values[0] for v in values) else torch.tensor(values, dtype=torch.float64)


def step(model, h: torch.Tensor, temperature: list[float], entropy_bound: list[float], u: torch.Tensor,
         noise: torch.Tensor, mask: StepMask | None = None, soft: bool = True, fused: bool = True) -> Step:
    """One step for rows with hidden states ``h [n, C, d]``: per-row ``temperature`` and ``entropy_bound``,
    uniforms ``u [n, C]`` and re-noise tokens ``noise [n, C]`` (from each row's generator), the rows'
    canvas constraints ``mask`` (``dgemma.constraints.StepMask``: fixed tokens and allowed sets; None: no
    row is constrained, the same path with nothing to apply). ``soft``: compute the self-conditioning input
    (not needed when no row takes another step)."""
    step_fn = denoise.step_fused if fused else denoise.step_reference
    sets = {} if mask is None or mask.table is None else {"set_index": mask.set_index, "table": mask.table}
    stats = step_fn(model, h, one_of(temperature), u, soft=soft, **sets)
    entropy, sampled, argmax = stats.entropy, stats.sampled, stats.argmax
    if mask is not None and mask.fixed is not None:  # fixed tokens: entropy 0, sampled and drafted as given
        fixed = mask.fixed.to(h.device)  # [n, C]
        pin = fixed >= 0
        entropy = entropy.masked_fill(pin, 0.0)
        sampled, argmax = torch.where(pin, fixed, sampled), torch.where(pin, fixed, argmax)
    bound = one_of(entropy_bound)
    if isinstance(bound, torch.Tensor):  # rounded to fp32 once, as a Python number compared with fp32 is
        bound = bound.float().to(h.device)[:, None]
    accept = entropy_bound_accept(entropy, bound)  # [n, C]
    next_x = torch.where(accept, sampled, noise.to(h.device))
    return Step(next_x=next_x, argmax=argmax.cpu(), accepted=accept.cpu(),
                mean_entropy=entropy.mean(-1).tolist(), soft=stats.soft)
