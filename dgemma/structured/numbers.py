"""Integers as per-position digit sets: every combination of allowed digits (cut where a position allows
the end) is an integer within the bounds, with no leading zero.

Two families, the one that can write the most values wins:

* variable length: a first digit in ``[a, b]``, any digits after it, ``kmin`` to ``kmax`` digits (the
  positions from ``kmin`` on allow the end). With ``a == 0`` a leading ``0`` is the number 0 (``finish`` cuts
  there); e.g. ``[0, 255]`` -> 0-9 one or two digits, or ``1xx``;
* fixed length: ``k`` digits, each position its own range (a box inside ``[lo, hi]``: a common prefix, then a
  range, then free digits, found by a small memoised recursion over the digits of the bounds).
"""

from __future__ import annotations

from dataclasses import dataclass

ALL = (0, 9)


@dataclass(frozen=True)
class Magnitude:
    digits: tuple[tuple[int, int], ...]  # per position, the allowed digit range (inclusive)
    kmin: int  # positions from kmin on allow the end of the number
    zero_cut: bool  # a first digit 0 is the whole number
    count: int  # how many values it can write


def magnitude(lo: int, hi: int) -> Magnitude:
    """The layout of a non-negative integer in ``[lo, hi]`` (``0 <= lo <= hi``) that writes the most values."""
    assert 0 <= lo <= hi
    best = None
    for cand in _variable(lo, hi) + _boxes(lo, hi):
        if best is None or cand.count > best.count:
            best = cand
    return best


def _variable(lo: int, hi: int) -> list[Magnitude]:
    out = []
    n = len(str(hi))
    for kmin in range(1, n + 1):
        for kmax in range(kmin, n + 1):
            for a in range(10):
                for b in range(max(a, 1), 10):
                    first = max(a, 1)
                    smallest = 0 if a == 0 else first * 10 ** (kmin - 1)
                    largest = (b + 1) * 10 ** (kmax - 1) - 1
                    if smallest < lo or largest > hi:
                        continue
                    count = (a == 0) + sum((b - first + 1) * 10 ** (k - 1) for k in range(kmin, kmax + 1))
                    digits = ((a, b),) + (ALL,) * (kmax - 1)
                    out.append(Magnitude(digits, kmin, a == 0 and kmax > 1, count))
    return out


def _boxes(lo: int, hi: int) -> list[Magnitude]:
    out = []
    memo: dict = {}
    for k in range(len(str(lo)), len(str(hi)) + 1):
        start = max(lo, 10 ** (k - 1) if k > 1 else 0)
        end = min(hi, 10 ** k - 1)
        if start > end:
            continue
        ranges, count = _box(str(start), str(end), memo)
        out.append(Magnitude(tuple(ranges), k, False, count))
    return out


def _box(low: str, high: str, memo: dict) -> tuple[list[tuple[int, int]], int]:
    """Per-position digit ranges of the largest box of same-length digit strings within [low, high]."""
    if not low:
        return [], 1
    if (low, high) in memo:
        return memo[low, high]
    n = len(low)
    l, h = int(low[0]), int(high[0])
    if l == h:
        rest, count = _box(low[1:], high[1:], memo)
        result = ([(l, l)] + rest, count)
    else:
        cands = []
        first = l if set(low[1:]) <= {"0"} else l + 1
        last = h if set(high[1:]) <= {"9"} else h - 1
        if first <= last:
            cands.append(([(first, last)] + [ALL] * (n - 1), (last - first + 1) * 10 ** (n - 1)))
        rest, count = _box(low[1:], "9" * (n - 1), memo)
        cands.append(([(l, l)] + rest, count))
        rest, count = _box("0" * (n - 1), high[1:], memo)
        cands.append(([(h, h)] + rest, count))
        result = max(cands, key=lambda c: c[1])
    memo[low, high] = result
    return result


def values(m: Magnitude) -> set[int]:
    """Every integer the layout can write (for tests; small layouts only)."""
    out: set[int] = set()

    def walk(i: int, text: str) -> None:
        if text and (i >= m.kmin or i == len(m.digits)):
            out.add(int(text))
        if i == len(m.digits) or (m.zero_cut and text == "0"):
            return
        a, b = m.digits[i]
        for d in range(a, b + 1):
            walk(i + 1, text + str(d))

    walk(0, "")
    return out
