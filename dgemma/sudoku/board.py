"""Sudoku boards: parsing (and reading puzzles from arguments, files or stdin), checking (and naming what
an answer breaks), solving (counting solutions) and generating unique puzzles.

A board is a tuple of 81 ints, row-major, 0 for a blank. The solver is a bitmask backtracking search that
always branches on the cell with the fewest candidates; ``count_solutions(board, limit=2)`` is the
uniqueness test the generator runs after every clue it removes. Generation is seedable and
deterministic: a random full grid, then clues removed in random order while the solution stays unique,
down to the requested count (a fresh grid is drawn if that grid cannot go so low).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable, TextIO

from dgemma.errors import DgemmaError

Board = tuple[int, ...]
ALL = 0x3FE  # bits 1..9
_ROW = [i // 9 for i in range(81)]
_COL = [i % 9 for i in range(81)]
_BOX = [(i // 27) * 3 + (i % 9) // 3 for i in range(81)]
_BITS = {1 << d: d for d in range(1, 10)}

# Clue-count buckets: easy / medium / hard, and the band of Unsloth's fine-tuning data. "hard" starts at 24:
# removing clues at random from a full grid very rarely reaches a unique puzzle with fewer.
BUCKETS: dict[str, tuple[int, int]] = {"easy": (40, 80), "medium": (30, 39), "hard": (24, 29), "unsloth": (36, 46)}


class BoardError(DgemmaError, ValueError):
    """A puzzle line that is not 81 cells of digits and blanks."""


def parse(text: str) -> Board:
    """81 characters, ``0`` or ``.`` for a blank (whitespace ignored) -> a board."""
    cells = [c for c in text if not c.isspace()]
    if len(cells) != 81 or any(c not in "0123456789." for c in cells):
        raise BoardError(f"a puzzle is 81 characters of 1-9 and 0 or '.' for blanks; got {len(cells)} "
                         f"characters{'' if len(cells) != 81 else ' with other symbols'}")
    return tuple(0 if c == "." else int(c) for c in cells)


def read_puzzles(inputs: list[str], stdin: TextIO) -> list[tuple[Board, str]]:
    """Puzzles from command-line arguments, each with where it came from (``argument 2``, ``FILE:LINE``).

    An argument that parses as a puzzle is one; ``-`` (or no argument) reads ``stdin``; anything else is a
    file of puzzles, one per line (blank lines skipped). Raises BoardError, in one line, for the rest.
    """
    out = []
    for k, arg in enumerate(inputs or ["-"], 1):
        try:
            out.append((parse(arg), f"argument {k}"))
            continue
        except BoardError as e:
            not_a_puzzle = e
        if arg == "-":
            name, text = "<stdin>", stdin.read()
        elif not Path(arg).is_file():
            shown = arg if len(arg) <= 90 else arg[:87] + "..."
            raise BoardError(f"{shown!r} is neither a file nor a puzzle ({not_a_puzzle})")
        else:
            try:
                name, text = arg, Path(arg).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise BoardError(f"cannot read {arg}: {e}") from None
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append((parse(line), f"{name}:{i}"))
                except BoardError as e:
                    raise BoardError(f"{name}:{i}: {e}") from None
    return out


def format_board(board: Iterable[int]) -> str:
    return "".join(str(v) for v in board)


def clues(board: Board) -> int:
    return sum(1 for v in board if v)


def is_consistent(board: Board) -> bool:
    """No digit twice in a row, column or box (blanks allowed)."""
    seen = set()
    for i, v in enumerate(board):
        if v:
            for key in (("r", _ROW[i], v), ("c", _COL[i], v), ("b", _BOX[i], v)):
                if key in seen:
                    return False
                seen.add(key)
    return True


def problems(board: Board, puzzle: Board | None = None) -> list[str]:
    """What keeps ``board`` from being a solution (of ``puzzle``, when given), in words; empty if it is one.

    Rows, columns and boxes are numbered from 1 (boxes row by row), cells as ``r2c5``.
    """
    out = []
    blank = sum(1 for v in board if not 1 <= v <= 9)
    if blank:
        out.append(f"{blank} cell{'s' if blank > 1 else ''} not filled")
    for kind, unit in (("row", _ROW), ("column", _COL), ("box", _BOX)):
        for u in range(9):
            values = [v for i, v in enumerate(board) if unit[i] == u and 1 <= v <= 9]
            for d in sorted({v for v in values if values.count(v) > 1}):
                times = "twice" if values.count(d) == 2 else f"{values.count(d)} times"
                out.append(f"{d} {times} in {kind} {u + 1}")
    if puzzle is not None:
        for i, (p, b) in enumerate(zip(puzzle, board)):
            if p and p != b:
                out.append(f"clue {p} at r{_ROW[i] + 1}c{_COL[i] + 1} changed to {b or 'a blank'}")
    return out


def is_solution(board: Board, puzzle: Board | None = None) -> bool:
    """A full valid grid (that keeps the puzzle's clues, when given)."""
    if len(board) != 81 or any(not 1 <= v <= 9 for v in board) or not is_consistent(board):
        return False
    return puzzle is None or all(p == 0 or p == b for p, b in zip(puzzle, board))


def _solve(board: Board, limit: int, rng: random.Random | None) -> tuple[int, Board | None]:
    cells = list(board)
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    for i, v in enumerate(cells):
        if v:
            bit = 1 << v
            if rows[_ROW[i]] & bit or cols[_COL[i]] & bit or boxes[_BOX[i]] & bit:
                return 0, None
            rows[_ROW[i]] |= bit
            cols[_COL[i]] |= bit
            boxes[_BOX[i]] |= bit
    empty = [i for i, v in enumerate(cells) if not v]
    found = [0, None]

    def search() -> bool:  # True: stop (limit reached)
        best, best_mask, best_n = -1, 0, 10
        for i in empty:
            if cells[i]:
                continue
            mask = ALL & ~(rows[_ROW[i]] | cols[_COL[i]] | boxes[_BOX[i]])
            n = bin(mask).count("1")
            if n < best_n:
                best, best_mask, best_n = i, mask, n
                if n <= 1:
                    break
        if best < 0:
            found[0] += 1
            if found[1] is None:
                found[1] = tuple(cells)
            return found[0] >= limit
        if best_n == 0:
            return False
        digits = [d for d in range(1, 10) if best_mask >> d & 1]
        if rng is not None:
            rng.shuffle(digits)
        r, c, b = _ROW[best], _COL[best], _BOX[best]
        for d in digits:
            bit = 1 << d
            cells[best] = d
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            stop = search()
            rows[r] &= ~bit
            cols[c] &= ~bit
            boxes[b] &= ~bit
            cells[best] = 0
            if stop:
                return True
        return False

    search()
    return found[0], found[1]


def solve(board: Board) -> Board | None:
    """A solution of ``board`` (the first found), or None."""
    return _solve(board, 1, None)[1]


def count_solutions(board: Board, limit: int = 2) -> int:
    """Number of solutions, counting stops at ``limit``."""
    return _solve(board, limit, None)[0]


def random_grid(rng: random.Random) -> Board:
    return _solve((0,) * 81, 1, rng)[1]


def generate(n_clues: int, rng: random.Random, max_grids: int = 50) -> tuple[Board, Board]:
    """``(puzzle, solution)`` with exactly ``n_clues`` clues and a unique solution."""
    if not 17 <= n_clues <= 81:
        raise BoardError(f"a unique puzzle has 17 to 81 clues; asked for {n_clues}")
    for _ in range(max_grids):
        solution = random_grid(rng)
        puzzle = list(solution)
        order = list(range(81))
        rng.shuffle(order)
        left = 81
        for i in order:
            if left == n_clues:
                break
            keep = puzzle[i]
            puzzle[i] = 0
            if count_solutions(tuple(puzzle), 2) == 1:
                left -= 1
            else:
                puzzle[i] = keep
        if left == n_clues:
            return tuple(puzzle), solution
    raise BoardError(f"could not reach {n_clues} clues with a unique solution in {max_grids} grids; "
                     "ask for more clues")


def _line_order(rng: random.Random) -> list[int]:
    """A validity-preserving order of 9 rows (or columns): bands shuffled, rows within each band shuffled."""
    bands = [0, 1, 2]
    rng.shuffle(bands)
    out = []
    for b in bands:
        rows = [3 * b, 3 * b + 1, 3 * b + 2]
        rng.shuffle(rows)
        out += rows
    return out


def relabel(puzzle: Board, solution: Board, rng: random.Random) -> tuple[Board, Board]:
    """The same puzzle seen through a random Sudoku symmetry: digits relabelled, bands, stacks, rows within
    bands and columns within stacks permuted, and a transpose half the time. Validity, the clue count and
    the uniqueness of the solution are preserved, so one generated puzzle yields many training examples.
    """
    digits = list(range(1, 10))
    rng.shuffle(digits)
    label = [0] + digits  # 0 (blank) stays blank
    rows, cols = _line_order(rng), _line_order(rng)
    cells = [9 * rows[r] + cols[c] for r in range(9) for c in range(9)]  # new cell -> old cell
    if rng.random() < 0.5:
        cells = [cells[9 * (i % 9) + i // 9] for i in range(81)]
    return (tuple(label[puzzle[i]] for i in cells), tuple(label[solution[i]] for i in cells))


def bucket_of(n: int) -> list[str]:
    return [name for name, (lo, hi) in BUCKETS.items() if lo <= n <= hi]
