"""Simple regular expressions of JSON Schema's ``pattern``: a sequence of atoms, each a character class
repeated between a minimum and a maximum number of times.

Supported: literal characters (``\\`` escapes a metacharacter), classes ``[a-z0-9_]``, ``[^...]``, ``.``,
``\\d \\w \\s`` and their negations ``\\D \\W \\S``, quantifiers ``{n}``, ``{n,}``, ``{n,m}``, ``?``, ``+``,
``*``, and the anchors ``^`` (first) and ``$`` (last). Groups, alternation, backreferences and lookaround
raise :class:`~dgemma.structured.schema.SchemaError`. A string that matches the atoms in full matches the
pattern as JSON Schema reads it (an unanchored pattern is searched for, so a full match also matches).
``\\w`` and ``\\d`` are taken as their ASCII sets, which Python's Unicode classes contain.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

UNBOUNDED = None  # the maximum of ``+``, ``*`` and ``{n,}``
_WORD = frozenset(string.ascii_letters + string.digits + "_")
_DIGITS = frozenset(string.digits)
_SPACE = frozenset(" \t\n\r\f\v")
_ESCAPES = {"d": (False, _DIGITS), "D": (True, _DIGITS), "w": (False, _WORD), "W": (True, _WORD),
            "s": (False, _SPACE), "S": (True, _SPACE)}
_CONTROL_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v"}
_UNSUPPORTED = "()|"


@dataclass(frozen=True)
class CharClass:
    """A set of characters: ``chars``, or every character but ``chars`` when ``negated``."""

    negated: bool
    chars: frozenset

    def __contains__(self, ch: str) -> bool:
        return (ch in self.chars) != self.negated


@dataclass(frozen=True)
class Atom:
    cls: CharClass
    min: int
    max: int | None  # None: unbounded


class PatternError(ValueError):
    """A pattern outside the supported subset (the caller turns it into a SchemaError)."""


def parse(pattern: str) -> list[Atom]:
    """The atoms of ``pattern`` (anchors dropped); PatternError for what is not supported."""
    s = pattern
    if s.startswith("^"):
        s = s[1:]
    if s.endswith("$") and not s.endswith("\\$"):
        s = s[:-1]
    atoms: list[Atom] = []
    i = 0
    while i < len(s):
        ch = s[i]
        if ch in _UNSUPPORTED:
            raise PatternError(f"`{ch}` (groups and alternation are not supported)")
        if ch in "^$":
            raise PatternError("anchors `^`/`$` only at the start and end")
        if ch in "?*+{":
            raise PatternError(f"a quantifier `{ch}` with nothing to repeat")
        if ch == "[":
            cls, i = _bracket(s, i + 1)
        elif ch == "\\":
            cls, i = _escape(s, i + 1)
        elif ch == ".":
            cls, i = CharClass(True, frozenset("\n")), i + 1
        else:
            cls, i = CharClass(False, frozenset(ch)), i + 1
        lo, hi, i = _quantifier(s, i)
        if hi is None or hi > 0:
            atoms.append(Atom(cls, lo, hi))
    return atoms


def _escape(s: str, i: int) -> tuple[CharClass, int]:
    if i >= len(s):
        raise PatternError("a trailing backslash")
    ch = s[i]
    if ch in _ESCAPES:
        neg, chars = _ESCAPES[ch]
        return CharClass(neg, chars), i + 1
    if ch in _CONTROL_ESCAPES:
        return CharClass(False, frozenset(_CONTROL_ESCAPES[ch])), i + 1
    if ch.isalnum():
        raise PatternError(f"the escape `\\{ch}`")
    return CharClass(False, frozenset(ch)), i + 1


def _bracket(s: str, i: int) -> tuple[CharClass, int]:
    negated = i < len(s) and s[i] == "^"
    i += negated
    chars: set[str] = set()
    first = True
    while True:
        if i >= len(s):
            raise PatternError("an unterminated `[`")
        ch = s[i]
        if ch == "]" and not first:
            return CharClass(negated, frozenset(chars)), i + 1
        first = False
        if ch == "\\":
            if i + 1 < len(s) and s[i + 1] in _ESCAPES:
                neg, extra = _ESCAPES[s[i + 1]]
                if neg:
                    raise PatternError(f"`\\{s[i + 1]}` inside a class")
                chars |= extra
                i += 2
                continue
            if i + 1 >= len(s) or s[i + 1].isalnum() and s[i + 1] not in _CONTROL_ESCAPES:
                raise PatternError("an escape inside a class")
            ch = _CONTROL_ESCAPES.get(s[i + 1], s[i + 1])
            i += 1
        if i + 2 < len(s) and s[i + 1] == "-" and s[i + 2] != "]":
            end = s[i + 2]
            if end == "\\":
                raise PatternError("an escaped range end")
            if ord(end) < ord(ch):
                raise PatternError(f"the range `{ch}-{end}` runs backwards")
            chars |= {chr(c) for c in range(ord(ch), ord(end) + 1)}
            i += 3
        else:
            chars.add(ch)
            i += 1


def _quantifier(s: str, i: int) -> tuple[int, int | None, int]:
    if i >= len(s):
        return 1, 1, i
    ch = s[i]
    if ch == "?":
        lo, hi, i = 0, 1, i + 1
    elif ch == "*":
        lo, hi, i = 0, UNBOUNDED, i + 1
    elif ch == "+":
        lo, hi, i = 1, UNBOUNDED, i + 1
    elif ch == "{":
        end = s.find("}", i)
        if end < 0:
            raise PatternError("an unterminated `{`")
        body = s[i + 1:end]
        parts = body.split(",")
        if len(parts) > 2 or not parts[0].isdigit() or (len(parts) == 2 and parts[1] and not parts[1].isdigit()):
            raise PatternError(f"the quantifier `{{{body}}}`")
        lo = int(parts[0])
        hi = lo if len(parts) == 1 else (int(parts[1]) if parts[1] else UNBOUNDED)
        if hi is not None and hi < lo:
            raise PatternError(f"the quantifier `{{{body}}}` (maximum below minimum)")
        i = end + 1
    else:
        return 1, 1, i
    if i < len(s) and s[i] in "?+":
        raise PatternError("lazy or possessive quantifiers")
    return lo, hi, i
