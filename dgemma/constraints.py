"""Canvas constraints: what the denoising loop must respect on a canvas, consulted on every canvas.

A :class:`CanvasConstraint` gives, for each canvas (and each restart of it), a :class:`CanvasRule`:

* ``fixed [C]``: token ids held at positions (-1: free). A fixed position is never re-noised, has entropy
  0 and is the draft's and the output's token (what ``pinned_canvas`` did for the first canvas);
* ``set_index [C]`` into ``table [S, V]``: a per-position allowed-token set (-1: any token), applied to the
  tempered logits before sampling, entropy and argmax: a disallowed token has probability exactly 0, so
  entropy and acceptance are over the allowed tokens. ``S`` distinct sets, never a dense ``[C, V]``. A
  position whose set holds one token behaves as a fixed one;
* ``initial [C]``: the canvas's starting tokens in place of uniform noise (``initial_canvas``).

The core calls ``start(canvas, attempt)`` when a denoising of a canvas begins and ``update(canvas, attempt,
step, draft)`` after each of its steps; a rule that ``update`` returns holds from the next step on (what a
grammar needs). ``finish(canvas, tokens)`` turns the kept attempt's tokens into the canvas's output (a
grammar cuts each value at the terminator the model placed, as EOS cuts an answer). With
``parallel_attempts`` above 1 the calls of several attempts of a canvas interleave: a constraint that keeps
state between them keeps it per attempt. Re-noised positions take uniform noise over the whole vocabulary
(the model's input noise), whatever their set: only what the sampler draws and the draft are constrained.
``EngineCore.add`` checks what it can (``validate``: static rules); a rule that ``start`` or ``update``
returns later is checked when it arrives, and a bad one raises ValueError from ``EngineCore.step``, as any
failing step does.

:class:`Rules` is a fixed map canvas -> rule; :func:`pinned`, :func:`initial` and :func:`allowed` build
one, :class:`Combined` merges several constraints. :class:`StepMask` is the rules of the rows of one
sampler step, as ``dgemma.sampler.step`` takes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch


@dataclass(frozen=True)
class CanvasRule:
    """One canvas's constraint; every field optional (None: no such constraint)."""

    fixed: torch.Tensor | None = None  # [C] long, -1 where free
    set_index: torch.Tensor | None = None  # [C] long row of ``table``, -1 where any token is allowed
    table: torch.Tensor | None = None  # [S, V] bool, True = allowed
    initial: torch.Tensor | None = None  # [C] long starting tokens

    def check(self, length: int, vocab: int, where: str = "constraint") -> None:
        """Raise ValueError unless shapes, ids and sets are valid for a canvas of ``length`` over ``vocab``."""
        for name in ("fixed", "set_index", "initial"):
            t = getattr(self, name)
            if t is not None and (not isinstance(t, torch.Tensor) or t.shape != (length,) or t.is_floating_point()
                                  or t.dtype == torch.bool):
                raise ValueError(f"{where}: `{name}` must be {length} integer ids (one per canvas position)")
        if self.fixed is not None and bool(((self.fixed < -1) | (self.fixed >= vocab)).any()):
            raise ValueError(f"{where}: fixed token ids must be in [0, {vocab}) or -1 (free)")
        if self.initial is not None and bool(((self.initial < 0) | (self.initial >= vocab)).any()):
            raise ValueError(f"{where}: initial token ids must be in [0, {vocab})")
        if (self.set_index is None) != (self.table is None):
            raise ValueError(f"{where}: allowed sets need both `set_index` and `table`")
        if self.table is None:
            return
        t = self.table
        if not isinstance(t, torch.Tensor) or t.dtype != torch.bool or t.ndim != 2 or t.shape[1] != vocab:
            raise ValueError(f"{where}: `table` must be a bool tensor [S, {vocab}] (one row per allowed set)")
        if bool(((self.set_index < -1) | (self.set_index >= t.shape[0])).any()):
            raise ValueError(f"{where}: `set_index` must be in [0, {t.shape[0]}) (a row of `table`) or -1 (any token)")
        empty = ~t.any(1)  # [S]
        used = self.set_index[self.set_index >= 0]
        if bool(empty[used.to(empty.device)].any()):
            raise ValueError(f"{where}: every position needs at least one allowed token (a set in `table` is empty)")
        if self.fixed is not None:
            both = (self.fixed >= 0) & (self.set_index >= 0)  # [C]
            if bool(both.any()):
                ok = t[self.set_index[both].to(t.device), self.fixed[both].to(t.device)]
                if not bool(ok.all()):
                    raise ValueError(f"{where}: a fixed token is not in its position's allowed set")

    def resolved(self) -> CanvasRule:
        """The same constraint with single-token sets turned into fixed tokens and fixed positions' sets
        dropped (None fields where nothing is left)."""
        long = lambda t: None if t is None else t.long().cpu()  # noqa: E731
        fixed, idx, table, start = long(self.fixed), long(self.set_index), self.table, long(self.initial)
        if table is not None:
            sizes = table.sum(1)  # [S]
            single = table.float().argmax(1)  # [S] the token of one-token sets
            on = idx >= 0
            look = idx.clamp(min=0).to(table.device)
            one = on & (sizes[look] == 1).cpu()  # [C]
            if bool(one.any()):
                base = fixed if fixed is not None else torch.full_like(idx, -1)
                fixed = torch.where(one & (base < 0), single[look].cpu(), base)
            if fixed is not None:
                idx = torch.where(fixed >= 0, -1, idx)
            if not bool((idx >= 0).any()):
                idx = table = None
        if fixed is not None and not bool((fixed >= 0).any()):
            fixed = None
        return CanvasRule(fixed=fixed, set_index=idx, table=table, initial=start)


class CanvasConstraint:
    """Base and protocol: override ``start`` (and ``update`` for a rule that follows the draft)."""

    def start(self, canvas: int, attempt: int) -> CanvasRule | None:
        """The rule of a denoising of canvas ``canvas`` (from 0), restart ``attempt`` (from 0); None: free."""
        return None

    def update(self, canvas: int, attempt: int, step: int, draft: torch.Tensor) -> CanvasRule | None:
        """Called after each step with its draft (``[C]`` argmax tokens; ``step`` counts from 1 across
        restarts): a new rule for the next step, or None to keep the current one."""
        return None

    def finish(self, canvas: int, tokens: torch.Tensor) -> torch.Tensor:
        """The output of canvas ``canvas`` from the tokens of its kept attempt (``[C]``, what the last
        step drew under the rules): unchanged by default. A grammar whose rules let the model choose where
        a value ends (a terminator allowed at several positions) cuts each value there and pads the rest,
        as EOS cuts the answer; it must keep the fixed tokens. Called once per canvas, before the canvas is
        emitted and committed to the cache."""
        return tokens

    def validate(self, length: int, vocab: int) -> None:
        """Raise ValueError for what can be checked before the request runs (static rules)."""


class Rules(CanvasConstraint):
    """A fixed rule per canvas index (the same for every restart); canvases not in the map are free."""

    def __init__(self, rules: Mapping[int, CanvasRule]):
        self.rules = dict(rules)

    def start(self, canvas: int, attempt: int) -> CanvasRule | None:
        return self.rules.get(canvas)

    def validate(self, length: int, vocab: int) -> None:
        for k, rule in self.rules.items():
            if not isinstance(k, int) or k < 0:
                raise ValueError(f"constraint: canvas indices must be integers >= 0, got {k!r}")
            rule.check(length, vocab, f"constraint on canvas {k}")


def _long(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.long)


def pinned(tokens, canvases=(0,)) -> Rules:
    """``tokens [C]`` (-1 free) fixed on each of ``canvases`` (``pinned_canvas``: canvas 0)."""
    return Rules({k: CanvasRule(fixed=_long(tokens)) for k in canvases})


def initial(tokens, canvases=(0,)) -> Rules:
    """``tokens [C]`` as the starting canvas of each of ``canvases`` (``initial_canvas``: canvas 0)."""
    return Rules({k: CanvasRule(initial=_long(tokens)) for k in canvases})


def allowed(set_index, table: torch.Tensor, canvases=(0,)) -> Rules:
    """Per-position allowed sets (``set_index [C]`` rows of ``table [S, V]`` bool, -1 any) on ``canvases``."""
    return Rules({k: CanvasRule(set_index=_long(set_index), table=table) for k in canvases})


def merge(a: CanvasRule | None, b: CanvasRule | None) -> CanvasRule | None:
    """Both rules at once: ``b``'s fixed tokens and initial canvas win where both give one; allowed sets
    intersect (one row per distinct pair of sets)."""
    if a is None or b is None:
        return a if b is None else b
    fixed = a.fixed if b.fixed is None else b.fixed if a.fixed is None else torch.where(b.fixed >= 0, b.fixed, a.fixed)
    start = b.initial if b.initial is not None else a.initial
    idx, table = (a.set_index, a.table) if b.table is None else (b.set_index, b.table)
    if a.table is not None and b.table is not None:
        pairs, idx = torch.unique(torch.stack([a.set_index, b.set_index], 1), dim=0, return_inverse=True)  # [P, 2]
        full = torch.ones(1, a.table.shape[1], dtype=torch.bool, device=a.table.device)
        ta, tb = torch.cat([full, a.table]), torch.cat([full, b.table.to(a.table.device)])  # row 0: any token
        table = ta[pairs[:, 0] + 1] & tb[pairs[:, 1] + 1]  # [P, V]
        idx = torch.where((pairs[idx] < 0).all(1), -1, idx)
    return CanvasRule(fixed=fixed, set_index=idx, table=table, initial=start)


class Combined(CanvasConstraint):
    """Several constraints at once (later ones win on fixed and initial tokens; sets intersect). It keeps
    its parts' current rules for each attempt of the canvas in progress: one object per request."""

    def __init__(self, *parts: CanvasConstraint):
        self.parts = [p for p in parts if p is not None]
        self.current: dict[int, list[CanvasRule | None]] = {}  # attempt -> each part's rule

    def start(self, canvas: int, attempt: int) -> CanvasRule | None:
        if attempt == 0:  # a new canvas: the previous one's attempts are over
            self.current = {}
        self.current[attempt] = [p.start(canvas, attempt) for p in self.parts]
        return self._merged(attempt)

    def update(self, canvas: int, attempt: int, step: int, draft: torch.Tensor) -> CanvasRule | None:
        changed = False
        for i, p in enumerate(self.parts):
            new = p.update(canvas, attempt, step, draft)
            if new is not None:
                self.current[attempt][i], changed = new, True
        return self._merged(attempt) if changed else None

    def finish(self, canvas: int, tokens: torch.Tensor) -> torch.Tensor:
        for p in self.parts:
            tokens = p.finish(canvas, tokens)
        return tokens

    def _merged(self, attempt: int) -> CanvasRule | None:
        out = None
        for rule in self.current[attempt]:
            out = merge(out, rule)
        return out

    def validate(self, length: int, vocab: int) -> None:
        for p in self.parts:
            p.validate(length, vocab)
        static = [p for p in self.parts if type(p) is Rules]
        for k in sorted({k for p in static for k in p.rules}):  # what the fixed rules give together
            merged = None
            for p in static:
                merged = merge(merged, p.rules.get(k))
            merged.check(length, vocab, f"constraint on canvas {k}")


@dataclass
class StepMask:
    """The rules of the ``n`` rows of one sampler step (None fields: no row has such a constraint)."""

    fixed: torch.Tensor | None  # [n, C] long, -1 where free
    set_index: torch.Tensor | None  # [n, C] long (host) into ``table``, -1 where any token is allowed
    table: torch.Tensor | None  # [S, V] bool, the rows' sets stacked


def stack(rules: list[CanvasRule | None], length: int) -> StepMask | None:
    """One :class:`StepMask` for rows with these (resolved) rules; None when no row is constrained."""
    if all(r is None or (r.fixed is None and r.table is None) for r in rules):
        return None
    free = torch.full((length,), -1, dtype=torch.long)
    fixed = None
    if any(r is not None and r.fixed is not None for r in rules):
        fixed = torch.stack([r.fixed if r is not None and r.fixed is not None else free for r in rules])
    set_index = table = None
    if any(r is not None and r.table is not None for r in rules):
        rows, tables, offset = [], [], 0
        for r in rules:
            if r is None or r.table is None:
                rows.append(free)
                continue
            rows.append(torch.where(r.set_index >= 0, r.set_index + offset, -1))
            tables.append(r.table)
            offset += r.table.shape[0]
        set_index, table = torch.stack(rows), torch.cat(tables)
    return StepMask(fixed=fixed, set_index=set_index, table=table)
