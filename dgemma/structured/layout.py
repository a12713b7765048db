"""The layout of a schema's answer: one entry per answer position, built from the node tree of
``schema.py`` with a tokenizer's :class:`~dgemma.structured.vocab.Vocabulary`.

Each position is a fixed structure token (``{``, ``"key":``, ``,``, a prefix or suffix, EOS), a position of
a value slot (string, integer, enum) with an allowed set, or the selector of a region:

* an optional array item (or free object entry) is a region ``, item`` whose first position allows ``,`` or
  whitespace: whitespace leaves it out, and every later optional item of the same array too;
* a nullable value is a region whose first position also allows the first token of ``null``.

A region that is left out is written as whitespace (or ``null`` then whitespace). Inside a region a structure
token is not fixed but allows itself or whitespace (``finish`` writes it when the region is kept), so that
``finish`` never overwrites a fixed token. Sets are keys ``(frozenset of ids, class)`` that
:mod:`dgemma.structured.plan` turns into table rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from dgemma.structured import numbers
from dgemma.structured.schema import Arr, Choice, Int, Nullable, Obj, SchemaError, Str

FIXED, FORCED, SLOT, SELECT, PAD = "fixed", "forced", "slot", "select", "pad"


@dataclass(frozen=True)
class Limits:
    """How much room values get where the schema sets no bound."""

    string_tokens: int = 16  # content positions of a string without maxLength (or with a larger one)
    array_items: int = 3  # most items of an array without maxItems (at least its minItems)
    object_entries: int = 3  # most free entries of an object without listed properties
    int_digits: int = 6  # digits of an integer without a bound on that side
    pattern_repeat: int = 6  # extra repetitions of a pattern's `+` / `*` beyond their minimum


@dataclass
class Position:
    kind: str
    token: int = -1  # FIXED / FORCED / SELECT: the structure token; SLOT: a token to force when in a region
    key: Any = None  # the allowed set's key (all but FIXED)
    slot: int = -1  # SLOT: which slot
    offset: int = 0  # SLOT: position within the slot
    regions: tuple = ()  # enclosing regions, outermost first


@dataclass
class Region:
    start: int
    end: int = -1
    off: int = -1  # the drawn token that leaves the region out
    off_tokens: list = field(default_factory=list)  # what a left-out region writes first (then whitespace)
    followers: list = field(default_factory=list)  # regions left out with it (later items of the array)


@dataclass
class Slot:
    kind: str  # "string", "integer", "enum"
    length: int
    signed: bool = False  # integer: offset 0 is the sign position
    zero_cut: bool = False  # integer: a first digit 0 is the whole number
    alts: list = field(default_factory=list)  # enum: token lists of the alternatives
    selectors: list = field(default_factory=list)  # enum: offset-0 token of each alternative


def _key(ids=(), cls=None):
    return (frozenset(ids), cls)


class Builder:
    def __init__(self, vocab, limits: Limits):
        self.v, self.limits = vocab, limits
        self.positions: list[Position] = []
        self.regions: list[Region] = []
        self.slots: list[Slot] = []
        self.stack: list[int] = []
        self.pending = ""
        self.null = vocab.encode_exact("null")

    # ------------------------------------------------------------------ emitting
    def text(self, s: str) -> None:
        self.pending += s

    def flush(self) -> None:
        if self.pending:
            ids = self.v.encode_exact(self.pending)
            self.pending = ""
            self.tokens(ids)

    def tokens(self, ids: list[int]) -> None:
        for t in ids:
            if self.stack:
                self.add(Position(FORCED, t, _key((t, self.v.ws))))
            else:
                self.add(Position(FIXED, t))

    def add(self, pos: Position) -> None:
        pos.regions = tuple(self.stack)
        if self.stack and pos.kind == SLOT and len(pos.key[0]) == 1 and pos.key[1] is None:
            (pos.token,) = pos.key[0]  # a one-token set in a region: whitespace too, finish writes the token
            pos.key = _key((pos.token, self.v.ws))
        self.positions.append(pos)

    def open_region(self, off: int, off_tokens: list[int]) -> int:
        self.flush()
        self.regions.append(Region(len(self.positions), off=off, off_tokens=off_tokens))
        self.stack.append(len(self.regions) - 1)
        return len(self.regions) - 1

    def close_region(self) -> None:
        self.flush()
        r = self.stack.pop()
        self.regions[r].end = len(self.positions)

    def slot(self, slot: Slot, keys: list) -> None:
        self.flush()
        self.slots.append(slot)
        for o, key in enumerate(keys):
            self.add(Position(SLOT, key=key, slot=len(self.slots) - 1, offset=o))

    # ------------------------------------------------------------------ nodes
    def node(self, n: Any) -> None:
        if isinstance(n, Obj):
            self.obj(n)
        elif isinstance(n, Arr):
            self.arr(n)
        elif isinstance(n, Str):
            self.string(n)
        elif isinstance(n, Int):
            self.integer(n)
        elif isinstance(n, Choice):
            self.choice(n.values)
        elif isinstance(n, Nullable):
            self.nullable(n.node)
        else:
            raise TypeError(f"unknown node {n!r}")

    def obj(self, n: Obj) -> None:
        self.text("{")
        for i, (name, sub) in enumerate(n.props):
            self.text(("," if i else "") + json.dumps(name, ensure_ascii=False) + ":")
            self.node(sub)
        if n.extra is not None:
            self.entries(n.extra)
        self.text("}")

    def entries(self, value: Any) -> None:
        """Free entries: a required first one, then optional ones (string keys of at least one character)."""
        key = Str(1, None)
        self.string(key)
        self.text(":")
        self.node(value)
        self.optional_items(lambda: (self.string(key), self.text(":"), self.node(value)),
                            self.limits.object_entries - 1)

    def optional_items(self, build, count: int) -> None:
        ids = []
        for _ in range(count):
            ids.append(self.open_region(self.v.ws, []))
            self.flush()
            comma = self.v.encode_exact(",")
            self.add(Position(SELECT, comma[0], _key((comma[0], self.v.ws))))
            self.tokens(comma[1:])
            build()
            self.close_region()
        for i, r in enumerate(ids):
            self.regions[r].followers = ids[i + 1:]

    def arr(self, n: Arr) -> None:
        self.text("[")
        if n.max == 0:
            self.text("]")
            return
        need = max(n.min, 1)
        most = max(need, min(n.max if n.max is not None else need + self.limits.array_items,
                             max(self.limits.array_items, need)))
        for i in range(need):
            if i:
                self.text(",")
            self.node(n.item)
        self.optional_items(lambda: self.node(n.item), most - need)
        self.text("]")

    def nullable(self, inner: Any) -> None:
        r = self.open_region(self.null[0], self.null)
        start = len(self.positions)
        self.node(inner)
        self.flush()
        while len(self.positions) - start < len(self.null):  # room to write null
            t = self.null[len(self.positions) - start]
            self.add(Position(PAD, key=_key((self.v.ws, t))))
        self.close_region()
        first = self.positions[start]
        ids, cls = first.key if first.key is not None else (frozenset({first.token}), None)
        first.key = (ids | {self.null[0]}, cls)
        if first.kind == FIXED:
            first.kind = FORCED
        assert self.regions[r].start == start

    def string(self, n: Str) -> None:
        self.text('"')
        q, ws = self.v.quote, self.v.ws
        if n.atoms is not None:
            keys = self.pattern_keys(n)
        else:
            cap = n.max if n.max is not None else max(n.min, self.limits.string_tokens)
            p = max(n.min, min(self.limits.string_tokens, cap))
            per = None if n.max is None or p == 0 else n.max // p  # most characters a token may write
            cls = ("str", per)
            keys = [_key((), cls) if o < n.min else _key((q,), cls) for o in range(p)]
        self.slot(Slot("string", len(keys) + 1), keys + [_key((q, ws))])

    def pattern_keys(self, n: Str) -> list:
        atoms = n.atoms
        counts = []
        for i, a in enumerate(atoms):
            if i == len(atoms) - 1:
                break
            counts.append(self._repeats(a))
        last = atoms[-1] if atoms else None
        fixed = sum(counts)
        lo = last.min if last else 0
        hi = self._repeats(last) if last else 0
        lo = max(lo, n.min - fixed)
        if last is not None and (last.max is None or last.max >= lo):
            hi = max(hi, lo)  # room for minLength in the last atom
        hi = min(hi, n.max - fixed if n.max is not None else hi)
        i = len(counts) - 1
        while hi < lo and i >= 0 and n.max is not None:  # shorten earlier atoms toward their minimum
            cut = min(counts[i] - atoms[i].min, lo - hi)
            counts[i] -= cut
            hi = min(hi + cut, last.max if last.max is not None else hi + cut)
            i -= 1
        if hi < lo or (last is None and n.min > 0):
            raise SchemaError("`pattern` together with `minLength`/`maxLength` leaves no length this layout can "
                              "write", "pattern")
        keys = []
        for a, c in zip(atoms, counts):
            keys += [_key((), ("class", a.cls))] * c
        if last is not None:
            keys += [_key((), ("class", last.cls)) if o < lo else _key((self.v.quote,), ("class", last.cls))
                     for o in range(hi)]
        return keys

    def _repeats(self, a) -> int:
        """How many times a pattern atom is written (its most, up to ``pattern_repeat`` beyond its least)."""
        most = a.min + self.limits.pattern_repeat
        return most if a.max is None else min(a.max, most)

    def integer(self, n: Int) -> None:
        span = 10 ** self.limits.int_digits - 1
        lo, hi = n.lo, n.hi
        if lo is None and hi is None:
            lo, hi = -span, span
        elif hi is None:
            hi = max(lo, 0) + span
        elif lo is None:
            lo = min(hi, 0) - span
        options = []
        if lo >= 0:
            options.append((False, False, numbers.magnitude(lo, hi)))
        elif hi < 0:
            options.append((True, False, numbers.magnitude(-hi, -lo)))
        else:
            options.append((False, False, numbers.magnitude(0, hi)))
            options.append((True, False, numbers.magnitude(1, -lo)))
            both = numbers.magnitude(0, min(-lo, hi))
            options.append((False, True, numbers.Magnitude(both.digits, both.kmin, both.zero_cut, 2 * both.count)))
        negative, signed, m = max(options, key=lambda o: o[2].count)
        if negative:
            self.text("-")
        d, ws = self.v.digits, self.v.ws
        keys = [_key((self.v.minus, ws))] if signed else []
        for j, (a, b) in enumerate(m.digits):
            ids = [d[x] for x in range(a, b + 1)] + ([ws] if j >= m.kmin else [])
            keys.append(_key(ids))
        self.slot(Slot("integer", len(keys), signed=signed, zero_cut=m.zero_cut), keys)

    def choice(self, values: list) -> None:
        alts = [self.v.encode_exact(json.dumps(v, ensure_ascii=False, separators=(",", ":"))) for v in values]
        if len(alts) == 1:
            self.flush()
            self.tokens(alts[0])
            return
        common = 0
        shortest = min(len(a) for a in alts)
        while common < shortest - 1 and len({a[common] for a in alts}) == 1:
            common += 1
        self.flush()
        self.tokens(alts[0][:common])
        rest = [a[common:] for a in alts]
        selectors: list[int] = []
        pool = iter(self.v.string_ids)
        for a in rest:
            pick = next((t for t in a if t not in selectors and t != self.v.ws), None)
            while pick is None:
                t = next(pool, None)
                if t is None:
                    raise SchemaError("`enum` has more values than this tokenizer has distinct tokens to choose "
                                      "them by", "enum")
                pick = t if t not in selectors and t != self.v.ws else None
            selectors.append(pick)
        length = max(len(a) for a in rest)
        keys = [_key(selectors)]
        for o in range(1, length):
            ids = {a[o] for a in rest if len(a) > o} | ({self.v.ws} if any(len(a) <= o for a in rest) else set())
            keys.append(_key(ids))
        self.slot(Slot("enum", length, alts=rest, selectors=selectors), keys)
