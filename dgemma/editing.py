"""Infill and in-line editing on the diffusion canvas: text for a gap between a prefix and a suffix.

Responsible for laying a gap and the text after it out on canvases (``dgemma.constraints``), running one
request per candidate gap length on the engine core, choosing the length, and splicing the result into the
original text. No model code: the engine is an argument.

Layout. The prompt (the prefix's tokens; with an instruction, the chat prompt and then the prefix's tokens,
so that the answer starts with the prefix) is in the KV cache. The gap of ``L`` tokens comes at the start of
the generation, after ``k`` tokens (below). Its positions may hold any token but EOS, pad, BOS and the
tokenizer's special tokens (one allowed set), and EOS stopping is off, so the gap is exactly ``L`` tokens. The
rest of the gap's last canvas holds the suffix's first tokens, fixed (held at every step and in the output); if
the suffix ends there, an end token (the model's EOS; with an instruction ``<turn|>`` when the model or its
tokenizer stops on it) is fixed after it and the positions after that are free. Canvases of pure suffix are
not denoised: a canvas never sees the canvases after it, so they cannot change the gap. So that the suffix
always takes part, the gap's last canvas keeps at least ``m = min(len(suffix) + 1 if there is an end token,
max(1, C // 4))`` positions after the gap: when ``L`` alone would leave fewer (a gap that ends on a canvas
boundary leaves none), the prefix's last ``k`` tokens move out of the prompt onto the start of the first
canvas, fixed, with ``k + L + m`` a whole number of canvases (the most gap positions that see ``m`` tokens of
suffix; :func:`shift`). They are context the canvas attends to both ways and are re-encoded with it at commit,
so the tokens before the gap are the same either way. At most the prefix's own tokens move (the prompt keeps
BOS or its first token, and the chat template): with fewer, ``k`` is as many as there are if that still
leaves ``m`` positions, else 0. Gaps that leave ``m`` positions by themselves run as before (``k = 0``). The
returned gap is the ``L`` tokens after the ``k``; ``Infill.moved`` is ``k``.

Choosing the length (``length=None`` or a list of lengths). Every candidate runs as its own request on the
core, in one batch, with the same seed. Each is then scored by the encoder (the model's causal mode, trained
with a next-token loss beside the diffusion loss) as the mean log-probability of the *score window* (the
suffix's first ``C`` tokens, plus the end token when the suffix is shorter) given the whole prompt (moved
tokens included, whatever each candidate's ``k``) and that candidate's gap: the length whose gap leads best
into the fixed suffix wins (ties: the shorter). The window is the same tokens for every candidate, so the
scores compare. One extra encoder pass over prompt + gap + window per candidate, batched. The defaults:
:data:`INFILL_LENGTHS`, or for an edit the span's token length scaled by :data:`EDIT_SCALES`.

Text. The gap's text is decoded in context (the prompt's last tokens before it, then removed), so a
tokenizer that strips a leading space at the start of a decode does not eat it. :func:`edit` builds its result
by concatenating ``text[:start]``, the gap's text and ``text[end:]``: the text outside the span is returned
byte for byte as given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from dgemma.cache import KVCache
from dgemma.constraints import CanvasRule, Rules

if TYPE_CHECKING:  # the engine is an argument; importing it here would make a cycle with Engine.infill
    from dgemma.engine import CanvasUpdate, Completion, Engine, StepUpdate

INFILL_LENGTHS = (4, 8, 16, 32, 64)  # candidate gap lengths (tokens) of an infill when none is given
EDIT_SCALES = (0.5, 0.75, 1.0, 1.5, 2.0)  # an edit's candidates: the span's token length times these
CONTEXT_SHARE = 4  # the gap's last canvas keeps >= C // 4 positions (at least 1) of suffix, when it has them
CONTEXT_TOKENS = 8  # prompt tokens decoded before the gap so that its text is cut from a decode in context
MARK_OPEN, MARK_CLOSE = "<edit>", "</edit>"  # what marks the span in an instruction's copy of the text
EDIT_REQUEST = ("{instruction}\n\nApply this only to the part of the text between {open} and {close}. Reply with "
                "the whole text, everything outside that part unchanged, without the markers.\n\n{marked}")

OnEvent = Callable[[int, "StepUpdate | CanvasUpdate"], None]


@dataclass
class Infill:
    """What :func:`infill` gives: the gap's ``text`` and ``token_ids`` (``length`` tokens), the chosen run's
    ``completion`` (``moved`` prefix tokens, the gap, then the rest of its last canvas: fixed suffix tokens,
    end token, free positions; None for a gap of 0 tokens), ``scores`` (length -> mean log-probability of the
    score window; empty when one length was given), and ``moved`` (how many of the prefix's last tokens the
    chosen run had on its first canvas instead of in its prompt; see the module docstring)."""

    text: str
    length: int
    token_ids: list[int]
    completion: Completion | None
    scores: dict[int, float] = field(default_factory=dict)
    moved: int = 0


def infill(engine: Engine, prefix: str | Sequence[int], suffix: str | Sequence[int],
           length: int | Sequence[int] | None = None, *, on_event: OnEvent | None = None, **params) -> Infill:
    """The text between ``prefix`` (the prompt) and ``suffix`` (fixed on the gap's canvases).

    ``length``: the gap in tokens; a list of candidates, or None for :data:`INFILL_LENGTHS`, to choose one
    (see the module docstring). ``on_event(length, event)`` gets each candidate's StepUpdates and
    CanvasUpdates as they come. ``params``: sampling overrides as in ``Engine.generate`` (``seed`` ...; not
    ``max_new_tokens``, which the gap sets). Text or token ids; text needs the model's tokenizer."""
    prompt = engine.encode_prompt(prefix)  # BOS first, as any prompt
    return _fill(engine, prompt, _ids(engine, suffix), _lengths(length, INFILL_LENGTHS), False, len(prompt) - 1,
                 on_event, params)


def rewrite(engine: Engine, text: str, start: int, end: int, instruction: str | None = None, *,
            length: int | Sequence[int] | None = None, on_event: OnEvent | None = None, **params) -> Infill:
    """The new text for ``text[start:end]`` (character offsets) as an :class:`Infill`; see :func:`edit`."""
    check_span(text, start, end)
    before, span, after = text[:start], text[start:end], text[end:]
    if engine.tokenizer is None:
        raise ValueError("this model has no tokenizer, so it cannot edit text")
    n = len(engine.tokenizer.encode(span))
    default = sorted({max(1, round(n * s)) for s in EDIT_SCALES}) if n else INFILL_LENGTHS
    lengths = _lengths(length, default)
    if instruction is None:
        prompt = engine.encode_prompt(before) if before else _bos(engine)
        return _fill(engine, prompt, _ids(engine, after), lengths, False, len(prompt) - 1, on_event, params)
    if not instruction.strip():
        raise ValueError("the instruction is empty")
    if engine.tokenizer.chat_template is None:
        raise ValueError("this model has no chat template, so it cannot follow an instruction: edit without one")
    marked = f"{before}{MARK_OPEN}{span}{MARK_CLOSE}{after}"
    message = EDIT_REQUEST.format(instruction=instruction.strip(), open=MARK_OPEN, close=MARK_CLOSE, marked=marked)
    head = _ids(engine, before)  # only the answer's own tokens move, never the chat template's
    prompt = engine.chat_ids([{"role": "user", "content": message}]) + head
    return _fill(engine, prompt, _ids(engine, after), lengths, True, len(head), on_event, params)


def edit(engine: Engine, text: str, start: int, end: int, instruction: str | None = None, *,
         length: int | Sequence[int] | None = None, on_event: OnEvent | None = None, **params) -> str:
    """``text`` with characters ``[start, end)`` rewritten; the rest comes back byte-identical.

    Without ``instruction``: an infill between ``text[:start]`` and ``text[end:]``. With one: the model is
    asked through its chat template (the text with the span marked) and its answer is laid out as the prefix
    (appended to the prompt), the gap, then the fixed suffix. ``start == end`` inserts. ``length``: as in
    :func:`infill`, default candidates around the span's token length. ValueError for a bad span."""
    result = rewrite(engine, text, start, end, instruction, length=length, on_event=on_event, **params)
    return text[:start] + result.text + text[end:]


# ---------------------------------------------------------------------------------------------- helpers
def check_span(text: str, start: int, end: int) -> None:
    if not isinstance(text, str):
        raise ValueError(f"the text must be a str, got {type(text).__name__}")
    for name, value in (("start", start), ("end", end)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"span {name} must be an integer character offset, got {value!r}")
    if not 0 <= start <= len(text) or not 0 <= end <= len(text):
        raise ValueError(f"span [{start}, {end}) is out of range: the text has {len(text)} characters")
    if start > end:
        raise ValueError(f"span [{start}, {end}) is reversed: start must not be after end")


def _lengths(length, default: Sequence[int]) -> list[int]:
    """The candidate lengths, checked (sorted, distinct)."""
    values = list(default) if length is None else [length] if isinstance(length, int) else list(length)
    if not values or any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in values):
        raise ValueError(f"length must be a number of tokens >= 0 or a list of them, got {length!r}")
    return sorted(set(values))


def _ids(engine: Engine, x: str | Sequence[int]) -> list[int]:
    if isinstance(x, str):
        if engine.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass the prefix and suffix as token ids")
        return engine.tokenizer.encode(x) if x else []
    ids = [int(t) for t in x]
    if any(t < 0 or t >= engine.config.vocab_size for t in ids):
        raise ValueError(f"token ids must be in [0, {engine.config.vocab_size})")
    return ids


def _bos(engine: Engine) -> list[int]:
    bos = engine.config.bos_token_id
    if bos is None:
        raise ValueError("an edit at the start of the text needs a model with a BOS token (the prompt is empty)")
    return [bos]


def _end_token(engine: Engine, eos: tuple[int, ...], chat: bool) -> int | None:
    """The token fixed after a suffix that ends on the gap's last canvas: in a chat answer ``<turn|>`` when the
    model or its tokenizer stops on it, else the first EOS; None when the model has none."""
    tok = engine.tokenizer
    turn = tok.token_to_id("<turn|>") if tok is not None else None
    if chat and turn is not None and (turn in eos or turn in tok.stop_ids):
        return turn
    return eos[0] if eos else None


def _gap_set(engine: Engine, banned: set[int]) -> torch.Tensor:
    """``[1, V]`` bool: the tokens a gap position may take (none of ``banned``, no special token, and nothing
    past the tokenizer's vocabulary)."""
    vocab = engine.config.vocab_size
    ok = torch.ones(1, vocab, dtype=torch.bool)
    tok = engine.tokenizer
    if tok is not None:
        banned = banned | tok.special_ids
        ok[0, tok.vocab_size:] = False
    ok[0, [t for t in banned if 0 <= t < vocab]] = False
    if not bool(ok.any()):
        raise ValueError("this model's vocabulary has no token a gap may take (all are special)")
    return ok


def shift(length: int, context: int, canvas: int, movable: int) -> int:
    """How many of the prompt's last tokens move onto the first canvas so that the gap's last canvas keeps
    ``context`` positions for what follows the gap: 0 when it already does (or the gap is empty); else the
    ``k`` with ``k + length + context`` a whole number of canvases (the most gap positions that still see that
    much suffix), or fewer when only ``movable`` tokens may move, as long as that still leaves ``context``
    positions; 0 when it cannot."""
    def room(k: int) -> int:  # positions after the gap on its last canvas
        return canvas - ((k + length - 1) % canvas + 1)

    if length == 0 or room(0) >= context:
        return 0
    k = min(-(length + context) % canvas, movable)
    return k if room(k) >= context else 0


def layout(length: int, suffix: list[int], canvas: int, end: int | None, table: torch.Tensor,
           head: Sequence[int] = ()) -> Rules:
    """The rules of ``head`` (the prefix's last tokens moved out of the prompt, fewer than ``canvas``), then a
    gap of ``length`` tokens, then ``suffix``: the head is fixed at the start of canvas 0, the gap's positions
    allow the gap set (row 0 of ``table``), and the gap's last canvas holds, after the gap, as much of the
    suffix as fits, fixed, then ``end`` (if not None) when the suffix ends there; free after that."""
    start, total = len(head), len(head) + length
    last = (total - 1) // canvas
    size = (last + 1) * canvas
    fixed = torch.full((size,), -1, dtype=torch.long)
    index = torch.full((size,), -1, dtype=torch.long)
    index[start:total] = 0
    room = size - total
    held = list(head) + [-1] * length + suffix[:room] + ([end] if end is not None and len(suffix) < room else [])
    fixed[:len(held)] = torch.tensor(held, dtype=torch.long)
    rules = {}
    for k in range(last + 1):
        f, i = fixed[k * canvas:(k + 1) * canvas], index[k * canvas:(k + 1) * canvas]
        rules[k] = CanvasRule(fixed=f.clone() if bool((f >= 0).any()) else None, set_index=i.clone(), table=table)
    return Rules(rules)


def _fill(engine: Engine, prompt: list[int], suffix: list[int], lengths: list[int], chat: bool, movable: int,
          on_event: OnEvent | None, overrides: dict) -> Infill:
    """Run every candidate length (one batch, one seed), score them if there are several, keep the best.
    ``movable``: how many of the prompt's last tokens (the prefix's) may move onto the first canvas."""
    if "max_new_tokens" in overrides:
        raise ValueError("an infill sets max_new_tokens from the gap's length: give `length` instead")
    base = engine.params(**overrides)
    eos = tuple(base.eos_token_id or ())
    end = _end_token(engine, eos, chat)
    c = engine.config.canvas_length
    window = suffix[:c] + ([end] if end is not None and len(suffix) < c else [])
    if len(lengths) > 1 and not window:
        raise ValueError("choosing the gap's length needs a suffix (or a model with an EOS token) to score "
                         "it: give one length")
    seed = base.seed if base.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
    banned = set(eos) | {t for t in (end, base.pad_token_id, engine.config.pad_token_id, engine.config.bos_token_id)
                         if t is not None}
    table = _gap_set(engine, banned)
    context = min(len(suffix) + (end is not None), max(1, c // CONTEXT_SHARE))  # what the last gap canvas keeps
    moved = {n: shift(n, context, c, movable) for n in lengths}
    runs: dict[int, Completion | None] = {}
    reqs = {}
    try:
        for n in lengths:
            if n == 0:
                runs[n] = None
                continue
            k = moved[n]
            p = base.replace(eos_token_id=(), seed=seed, max_new_tokens=((k + n - 1) // c + 1) * c)
            reqs[n] = engine.submit(prompt[:len(prompt) - k], p, step_events=on_event is not None,
                                    constraint=layout(n, suffix, c, end, table, prompt[len(prompt) - k:]))
        runs.update(_drive(engine, reqs, on_event))
    finally:  # an error or Ctrl-C: no candidate stays on the core
        for req in reqs.values():
            if not req.done:
                engine.core.abort(req.request_id)
    gaps = {n: [] if run is None else run.token_ids[moved[n]:moved[n] + n] for n, run in runs.items()}
    # the moved tokens are context before the gap either way: every candidate is scored after the whole prompt
    scores = _scores(engine, prompt, gaps, window) if len(lengths) > 1 else {}
    best = max(lengths, key=lambda n: (scores[n], -n)) if scores else lengths[0]
    return Infill(_gap_text(engine, prompt, gaps[best]), best, gaps[best], runs[best], scores, moved[best])


def _drive(engine: Engine, reqs: dict, on_event: OnEvent | None) -> dict[int, Completion]:
    """Step the core until every request is done, handing each one's updates to ``on_event`` in turn; each
    request's Completion."""
    events = {n: engine.events(r) for n, r in reqs.items()}
    streams = {n: engine.updates(events[n], reqs[n], engine.completion) for n in reqs}
    out = {}
    try:
        while streams:
            # Round robin: a stream's next() pops its queue or steps the core once. Every stream has started
            # before ``on_event`` runs, so if it raises, closing them aborts every request.
            round_ = [(n, next(streams[n], None)) for n in list(streams)]
            for n, event in round_:
                if event is None:
                    del streams[n]
                    continue
                if on_event is not None:
                    on_event(n, event)
                if getattr(event, "completion", None) is not None:
                    out[n] = event.completion
    finally:  # an unfinished stream's events generator aborts its request when closed
        for stream in streams.values():
            stream.close()
        for gen in events.values():
            gen.close()
    return out


def _scores(engine: Engine, prompt: list[int], gaps: dict[int, list[int]], window: list[int]) -> dict[int, float]:
    """Mean log-probability of ``window`` after prompt + gap under the encoder (causal), per candidate: one
    right-padded pass, the LM head only on the window's positions."""
    model = engine.model
    room = model.cfg.max_position_embeddings - len(prompt) - max(len(g) for g in gaps.values())
    window = window[:max(1, room)]
    order = sorted(gaps)
    rows = [prompt + gaps[n] + window for n in order]
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), engine.pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    with torch.inference_mode():
        cache = KVCache(model.cfg, len(rows), t, device=model.device, dtype=model.dtype)
        h = model.encode(ids.to(model.device), cache, n_valid=torch.tensor([len(r) for r in rows]))  # [B, T, d]
        at = torch.tensor([[len(prompt) + len(gaps[n]) - 1 + j for j in range(len(window))] for n in order])
        h = h[torch.arange(len(rows))[:, None], at.to(h.device)]  # [B, W, d]: the states that predict the window
        logp = torch.log_softmax(model.logits(h), dim=-1)  # [B, W, V] fp32
        target = torch.tensor(window, device=logp.device).expand(len(rows), -1)  # [B, W]
        mean = logp.gather(-1, target[..., None])[..., 0].mean(-1)  # [B]
    return {n: float(v) for n, v in zip(order, mean.tolist())}


def _gap_text(engine: Engine, prompt: list[int], gap: list[int]) -> str:
    """The gap's text: decoded after the prompt's last tokens and cut from there (a decoder may drop a leading
    space at the start of a decode), or alone when that decode does not extend the context's."""
    if not gap:
        return ""
    context = prompt[-CONTEXT_TOKENS:]
    head, whole = engine.decode(context), engine.decode(context + gap)
    return whole[len(head):] if whole.startswith(head) else engine.decode(gap)
