"""The reverse (denoising) loop: block-autoregressive canvases, each refined by entropy-bound sampling.

Spec section 5, per canvas: start from uniform noise (or a given canvas); each step runs the decoder,
divides the logits by a linear temperature counting down, samples every position, accepts the
lowest-entropy positions under the entropy budget, re-noises the rest, and feeds the scaled logits back as
self-conditioning. A row stops when its argmax canvas is stable and its mean entropy is below the
confidence threshold, or after ``max_denoising_steps``; with ``restarts = N`` a row that ran out of steps
unsettled (or, with ``restart_entropy``, settled at a mean entropy not below it) is denoised again from
fresh noise, up to N times; the first attempt that qualifies is kept, else the most confident (settled
first, then the lowest final mean entropy), and its steps count them all. Positions of ``pinned_canvas``
hold their tokens in the first canvas (entropy 0: always accepted, never re-noised). The argmax canvas is
emitted, cut at the first EOS, and committed through the encoder before the next canvas starts.

Every row has its own CPU ``torch.Generator`` seeded with ``params.seed``, and only draws while it is still
denoising, so a row draws the same random numbers alone or in a batch, on any device. Its logits are equal
within float rounding, not bitwise (padding changes the matmul shapes; tests/test_reference.py bounds the
difference by 2e-5 of the largest logit), so its tokens are the solo run's unless a draw falls within that margin of a
decision (the tests' batches give identical tokens). ``run`` is a generator: it
yields :class:`StepEvent` / :class:`CanvasEvent` and returns the per-row :class:`RowResult` list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Generator, Sequence

import torch

from dgemma import denoise
from dgemma.cache import KVCache
from dgemma.model import DiffusionGemma
from dgemma.params import SamplingParams


@dataclass
class StepEvent:
    row: int
    canvas: int  # canvas index within this generation, from 0
    step: int  # denoising step within the canvas, from 1
    draft: list[int]  # current argmax canvas
    accepted: int  # positions that kept their sampled token this step
    mean_entropy: float
    accepted_mask: list[bool] = field(default_factory=list)  # which positions those are ([C])
    attempt: int = 0  # restarts: which denoising of this canvas, from 0


@dataclass
class CanvasEvent:
    row: int
    canvas: int
    tokens: list[int]  # the new tokens this canvas contributes (cut at EOS / max_new_tokens)
    finished: bool


@dataclass
class RowResult:
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (EOS) or "length"
    steps: list[int] = field(default_factory=list)  # denoising steps used by each canvas
    prompt_tokens: int = 0
    committed_ids: list[int] = field(default_factory=list)  # whole canvases committed to the cache, in order


@dataclass
class Attempt:
    """One denoising of a canvas: its argmax canvas, whether it met the stopping rule, its last mean entropy."""

    tokens: torch.Tensor  # [C]
    settled: bool
    entropy: float

    def qualifies(self, params: SamplingParams) -> bool:
        """Kept without a restart: settled, and below ``restart_entropy`` when that is set."""
        return self.settled and (params.restart_entropy is None or self.entropy < params.restart_entropy)

    def rank(self) -> tuple[bool, float]:
        """Lower is more confident: settled before unsettled, then lower final mean entropy."""
        return (not self.settled, self.entropy)


def entropy_bound_accept(entropy: torch.Tensor, bound: float) -> torch.Tensor:
    """Accept the k lowest-entropy positions with ``sum(h_1..h_k) - h_k <= bound`` (>= 1 per row).

    ``entropy [N, C]`` -> bool ``[N, C]``. Recomputed from scratch every step (nothing stays frozen).
    """
    sorted_h, order = torch.sort(entropy, dim=-1)
    keep = (torch.cumsum(sorted_h, dim=-1) - sorted_h) <= bound
    return torch.zeros_like(keep).scatter(-1, order, keep)


def _canvas_rows(params: SamplingParams, name: str, n_rows: int, length: int, vocab: int) -> list[torch.Tensor] | None:
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


def _cut(tokens: list[int], eos: set[int], budget: int) -> tuple[list[int], bool]:
    """Tokens up to (excluding) the first EOS and at most ``budget`` of them; whether an EOS was hit."""
    for i, t in enumerate(tokens[:budget]):
        if t in eos:
            return tokens[:i], True
    return tokens[:budget], False


def run(
    model: DiffusionGemma,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    pad_id: int = 0,
    step_events: bool = True,
    fused: bool = True,
    cache: KVCache | None = None,
) -> Generator[StepEvent | CanvasEvent, None, list[RowResult]]:
    """Generate for every row of ``prompts``; yields events, returns a RowResult per row.

    ``cache``: continue a cache that already holds each row's earlier tokens (a chat's history); then
    ``prompts`` are only the new tokens, encoded after them. It grows as needed and holds, after the
    run, each row's earlier tokens, its new tokens and its committed canvases (``RowResult.committed_ids``):
    every canvas but the row's last, which is never committed.
    """
    cfg = model.cfg
    n_rows, length, vocab = len(prompts), cfg.canvas_length, cfg.vocab_size
    device = model.device
    eos = set(params.eos_token_id or ())
    n_canvases = math.ceil(params.max_new_tokens / length)
    initial = _canvas_rows(params, "initial_canvas", n_rows, length, vocab)
    pinned = _canvas_rows(params, "pinned_canvas", n_rows, length, vocab)
    seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
    gens = [torch.Generator().manual_seed(seed) for _ in range(n_rows)]
    results = [RowResult(prompt_tokens=len(p)) for p in prompts]
    finished = [False] * n_rows

    # Prefill: right-padded prompts; each row keeps positions 0..P_b-1 and its own cache length.
    p_max = max(len(p) for p in prompts)
    need = p_max + (n_canvases - 1) * length
    if cache is None:
        cache = KVCache(cfg, n_rows, need, device=device, dtype=model.dtype)
    else:
        if cache.batch_size != n_rows:
            raise ValueError(f"the cache holds {cache.batch_size} rows, the call has {n_rows} prompts")
        cache.ensure(int(cache.lengths.max()) + need)
    ids = torch.full((n_rows, p_max), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    model.encode(ids.to(device), cache, n_valid=torch.tensor([len(p) for p in prompts]))

    for c in range(n_canvases):
        rows = [b for b in range(n_rows) if not finished[b]]
        first = c == 0
        start, pins = (initial, pinned) if first else (None, None)
        for b in rows:
            results[b].steps.append(0)
        final = yield from _denoise_canvas(model, cache, rows, gens, params, c, start, pins, results,
                                           step_events, fused)
        for attempt in range(1, params.restarts + 1):
            again = [b for b in rows if not final[b].qualifies(params)]  # denoise these again from noise
            if not again:
                break
            more = yield from _denoise_canvas(model, cache, again, gens, params, c, start, pins, results,
                                              step_events, fused, attempt)
            for b, candidate in more.items():  # the first attempt that qualifies, else the most confident
                if candidate.rank() < final[b].rank():
                    final[b] = candidate
        committed = torch.full((n_rows, length), pad_id, dtype=torch.long)
        for b in rows:
            committed[b] = final[b].tokens
            budget = params.max_new_tokens - len(results[b].token_ids)
            new, hit_eos = _cut(final[b].tokens.tolist(), eos, budget)
            results[b].token_ids += new
            if hit_eos or len(results[b].token_ids) >= params.max_new_tokens:
                finished[b] = True
                results[b].finish_reason = "stop" if hit_eos else "length"
            yield CanvasEvent(row=b, canvas=c, tokens=new, finished=finished[b])
        if all(finished) or c == n_canvases - 1:
            break
        # Commit the rows that go on; a finished row writes junk past its length that nobody reads.
        going = [b for b in rows if not finished[b]]
        valid = torch.tensor([length if b in going else 0 for b in range(n_rows)])
        model.encode(committed.to(device), cache, n_valid=valid)
        for b in going:
            results[b].committed_ids += final[b].tokens.tolist()
    return results


def _denoise_canvas(model, cache, rows, gens, params, c, initial, pinned, results, step_events, fused,
                    attempt=0):
    """Denoise one canvas for batch ``rows``; yields StepEvents and adds its steps to each row's last
    ``results[b].steps`` entry. Returns ``{row: Attempt}`` (its argmax canvas, stopping rule met, entropy).

    ``pinned`` (``[C]`` per row, -1 = free): those tokens are the canvas's at every step and in its argmax,
    with entropy 0 (always accepted, never re-noised, certain for the stopping rule).
    """
    length, vocab = model.cfg.canvas_length, model.cfg.vocab_size
    device = model.device
    step_fn = denoise.step_fused if fused else denoise.step_reference
    x = torch.stack([
        initial[b] if initial is not None else torch.randint(0, vocab, (length,), generator=gens[b])
        for b in rows
    ]).to(device)  # [n, C]
    pin_tok = torch.stack([pinned[b] for b in rows]).to(device) if pinned is not None else None  # [n, C]
    pin = pin_tok >= 0 if pin_tok is not None else None
    if pin is not None:
        x = torch.where(pin, pin_tok, x)
    active = list(rows)
    sub = cache if len(active) == cache.batch_size else cache.select(torch.tensor(active))
    soft = None  # self-conditioning input from the previous step, [n, C, d]
    history = {b: [] for b in rows}  # previous argmax canvases, newest last
    final: dict[int, Attempt] = {}
    for step in range(params.max_denoising_steps, 0, -1):
        h = model.decode_hidden(x, sub, soft)  # [n, C, d]
        u = torch.stack([torch.rand(length, generator=gens[b]) for b in active])  # [n, C]
        # The last possible step has no next step to self-condition: skip its soft embedding.
        stats = step_fn(model, h, params.temperature(step), u, soft=step > 1)
        entropy, sampled, argmax = stats.entropy, stats.sampled, stats.argmax
        if pin is not None:
            entropy = entropy.masked_fill(pin, 0.0)
            sampled, argmax = torch.where(pin, pin_tok, sampled), torch.where(pin, pin_tok, argmax)
        accept = entropy_bound_accept(entropy, params.entropy_bound)  # [n, C]
        noise = torch.stack([torch.randint(0, vocab, (length,), generator=gens[b]) for b in active])
        x = torch.where(accept, sampled, noise.to(device))
        mean_h = entropy.mean(-1).tolist()
        argmax = argmax.cpu()
        n_accepted = accept.sum(-1).tolist()
        keep = []
        for i, b in enumerate(active):
            results[b].steps[-1] += 1
            a = argmax[i]
            hist = history[b]
            stable = len(hist) >= params.stability_threshold and all(
                torch.equal(h_, a) for h_ in hist[len(hist) - params.stability_threshold:])
            if params.stability_threshold:
                hist.append(a)
                del hist[: -params.stability_threshold]
            settled = stable and mean_h[i] < params.confidence_threshold
            final[b] = Attempt(a, settled, mean_h[i])
            if step_events:
                yield StepEvent(row=b, canvas=c, step=results[b].steps[-1], draft=a.tolist(),
                                accepted=n_accepted[i], mean_entropy=mean_h[i], accepted_mask=accept[i].tolist(),
                                attempt=attempt)
            if not settled:
                keep.append(i)
        if not keep or step == 1:  # all rows stopped, or that was the last step (it made no soft input)
            break
        soft = stats.soft
        if len(keep) < len(active):
            idx = torch.tensor(keep)
            active = [active[i] for i in keep]
            x, soft = x[idx.to(device)], soft[idx.to(device)]
            if pin is not None:
                pin, pin_tok = pin[idx.to(device)], pin_tok[idx.to(device)]
            sub = cache.select(torch.tensor(active))
    return final
