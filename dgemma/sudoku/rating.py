"""Sudoku difficulty by the solving techniques a person needs, and minimal symmetric puzzles of a chosen rating.

:func:`rate` solves a puzzle on a grid of candidate bitmasks (bits 1-9, as in ``board``) with human
techniques only, always using the easiest one that makes progress and starting again from the easiest after
each, so the hardest technique it used is the hardest the puzzle needs. Levels:

* ``easy``: naked and hidden singles alone solve it;
* ``medium``: also locked candidates (pointing, claiming: box/line reduction), naked and hidden pairs and
  triples;
* ``hard``: also X-wing;
* ``search``: those techniques stall (the puzzle needs harder techniques, trial or search; a puzzle with
  several solutions stalls too).

Every step is recorded (``Step``: the technique, the digits it placed, the candidates it removed), so a
rating can be checked against the solution. :func:`minimal_symmetric` thins a full grid by clue pairs that
mirror each other through the centre (180-degree rotational symmetry) while the solution stays unique, until
no pair can go; :func:`generate_rated` draws such puzzles, from seeded grids, until one has the asked rating
and a clue count in range.
"""

from __future__ import annotations

import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import combinations
from typing import Iterator, NamedTuple

from dgemma.sudoku.board import ALL, Board, BoardError, clues, count_solutions, random_grid

LEVELS = ("easy", "medium", "hard", "search")
# Techniques in the order they are tried, each with the level it belongs to.
TECHNIQUES = {"naked_single": "easy", "hidden_single": "easy", "pointing": "medium", "claiming": "medium",
              "naked_pair": "medium", "hidden_pair": "medium", "naked_triple": "medium",
              "hidden_triple": "medium", "x_wing": "hard"}
CLUE_RANGE = (22, 32)  # where minimal symmetric puzzles mostly fall, and what people's puzzles have
PROBE = 100  # grids after which a clue range that none of them fell in is refused

ROWS = [[9 * r + c for c in range(9)] for r in range(9)]
COLS = [[9 * r + c for r in range(9)] for c in range(9)]
BOXES = [[9 * (3 * (b // 3) + k // 3) + 3 * (b % 3) + k % 3 for k in range(9)] for b in range(9)]
UNITS = ROWS + COLS + BOXES
PEERS = [tuple(sorted({p for u in UNITS if i in u for p in u} - {i})) for i in range(81)]
_UNITS_OF = [(i // 9, 9 + i % 9, 18 + 3 * (i // 27) + i % 9 // 3) for i in range(81)]  # indices into UNITS
_POP = [bin(m).count("1") for m in range(1024)]
_DIGIT = {1 << d: d for d in range(1, 10)}


def _segments() -> list[tuple[list[int], list[int], list[int]]]:
    """Each box's crossing with a row or column: (the 3 shared cells, the rest of the box, the rest of the line)."""
    out = []
    for box in BOXES:
        for line in [ROWS[box[0] // 9 + k] for k in range(3)] + [COLS[box[0] % 9 + k] for k in range(3)]:
            seg = [c for c in box if c in line]
            out.append((seg, [c for c in box if c not in seg], [c for c in line if c not in seg]))
    return out


SEGMENTS = _segments()


class Step(NamedTuple):
    technique: str
    placed: tuple[tuple[int, int], ...]  # (cell, digit)
    removed: tuple[tuple[int, int], ...]  # (cell, digit): candidates the technique itself ruled out


class Contradiction(BoardError):
    """The candidates leave a cell or a digit of a unit with no place: the puzzle has no solution."""


class Grid:
    """Placed digits and the candidates of the blank cells (bitmasks); placing a digit clears it from the peers."""

    __slots__ = ("values", "cands")

    def __init__(self, board: Board):
        if len(board) != 81:
            raise BoardError(f"a board has 81 cells, not {len(board)}")
        used = [0] * 27  # digits placed in each unit (rows, columns, boxes)
        for i, v in enumerate(board):
            if v:
                r, c, b = _UNITS_OF[i]
                bit = 1 << v
                if (used[r] | used[c] | used[b]) & bit:
                    raise BoardError("the puzzle repeats a digit in a row, column or box")
                used[r] |= bit
                used[c] |= bit
                used[b] |= bit
        self.values = list(board)
        self.cands = [0 if v else ALL & ~(used[r] | used[c] | used[b]) for v, (r, c, b) in zip(board, _UNITS_OF)]

    def place(self, i: int, d: int) -> None:
        self.values[i], self.cands[i] = d, 0
        keep, cands = ~(1 << d), self.cands
        for p in PEERS[i]:
            cands[p] &= keep

    def remove(self, cells, mask: int) -> tuple[tuple[int, int], ...]:
        """Clear the digits of ``mask`` from ``cells``; the (cell, digit) pairs that were candidates."""
        out, cands = [], self.cands
        for c in cells:
            hit = cands[c] & mask
            if hit:
                cands[c] &= ~hit
                out += [(c, d) for d in range(1, 10) if hit >> d & 1]
        return tuple(out)

    def board(self) -> Board:
        return tuple(self.values)

    def solved(self) -> bool:
        return all(self.values)


def naked_single(g: Grid) -> list[Step]:
    steps, values, cands = [], g.values, g.cands
    for i in range(81):
        m = cands[i]
        if not values[i] and not m & (m - 1):
            if not m:
                raise Contradiction(f"no digit fits r{i // 9 + 1}c{i % 9 + 1}")
            g.place(i, _DIGIT[m])
            steps.append(Step("naked_single", ((i, _DIGIT[m]),), ()))
    return steps


def hidden_single(g: Grid) -> list[Step]:
    steps, values, cands = [], g.values, g.cands
    for unit in UNITS:
        once = twice = placed = 0
        for c in unit:
            m = cands[c]
            twice |= once & m
            once |= m
            placed |= 1 << values[c]
        if (once | placed) & ALL != ALL:
            raise Contradiction("a digit has no place in a row, column or box")
        singles = once & ~twice
        while singles:
            bit = singles & -singles
            singles ^= bit
            cell = next((c for c in unit if cands[c] & bit), None)
            if cell is None:  # an earlier single of this unit took the only cell
                raise Contradiction("two digits need the same cell")
            g.place(cell, _DIGIT[bit])
            steps.append(Step("hidden_single", ((cell, _DIGIT[bit]),), ()))
    return steps


def _locked(g: Grid, pointing: bool) -> list[Step]:
    """Pointing: a digit of a box only on one line leaves the rest of that line. Claiming: a digit of a line
    only in one box leaves the rest of that box."""
    steps, cands = [], g.cands
    for seg, box_rest, line_rest in SEGMENTS:
        s = cands[seg[0]] | cands[seg[1]] | cands[seg[2]]
        if not s:
            continue
        inside, outside = (box_rest, line_rest) if pointing else (line_rest, box_rest)
        rest = 0
        for c in inside:
            rest |= cands[c]
        only = s & ~rest
        if only:
            removed = g.remove(outside, only)
            if removed:
                steps.append(Step("pointing" if pointing else "claiming", (), removed))
    return steps


def pointing(g: Grid) -> list[Step]:
    return _locked(g, True)


def claiming(g: Grid) -> list[Step]:
    return _locked(g, False)


def _naked(g: Grid, k: int, name: str) -> list[Step]:
    """k cells of a unit whose candidates together are k digits: those digits leave the unit's other cells."""
    steps, values, cands = [], g.values, g.cands
    for unit in UNITS:
        blank = [c for c in unit if not values[c]]
        if len(blank) <= k:
            continue
        for combo in combinations([c for c in blank if _POP[cands[c]] <= k], k):
            m = 0
            for c in combo:
                m |= cands[c]
            if _POP[m] == k:
                removed = g.remove([c for c in blank if c not in combo], m)
                if removed:
                    steps.append(Step(name, (), removed))
    return steps


def _hidden(g: Grid, k: int, name: str) -> list[Step]:
    """k digits of a unit that fit only k of its cells: those cells lose every other digit."""
    steps, cands = [], g.cands
    for unit in UNITS:
        where = [0] * 10  # digit -> bitmask of the unit's cells (by index in the unit) it fits
        for j, c in enumerate(unit):
            m = cands[c]
            while m:
                bit = m & -m
                m ^= bit
                where[_DIGIT[bit]] |= 1 << j
        open_digits = [d for d in range(1, 10) if where[d]]
        if len(open_digits) <= k:
            continue
        for combo in combinations([d for d in open_digits if _POP[where[d]] <= k], k):
            spots = 0
            for d in combo:
                spots |= where[d]
            if _POP[spots] == k:
                keep = sum(1 << d for d in combo)
                removed = g.remove([unit[j] for j in range(9) if spots >> j & 1], ALL & ~keep)
                if removed:
                    steps.append(Step(name, (), removed))
    return steps


def naked_pair(g: Grid) -> list[Step]:
    return _naked(g, 2, "naked_pair")


def hidden_pair(g: Grid) -> list[Step]:
    return _hidden(g, 2, "hidden_pair")


def naked_triple(g: Grid) -> list[Step]:
    return _naked(g, 3, "naked_triple")


def hidden_triple(g: Grid) -> list[Step]:
    return _hidden(g, 3, "hidden_triple")


def x_wing(g: Grid) -> list[Step]:
    """A digit that fits exactly the same two places in two rows (columns) leaves those two columns (rows)."""
    steps, cands = [], g.cands
    for d in range(1, 10):
        bit = 1 << d
        for lines, cross in ((ROWS, COLS), (COLS, ROWS)):
            seen: dict[int, int] = {}  # positions along the line -> the first line with them
            for n, line in enumerate(lines):
                spots = 0
                for j, c in enumerate(line):
                    if cands[c] & bit:
                        spots |= 1 << j
                if _POP[spots] != 2:
                    continue
                if spots not in seen:
                    seen[spots] = n
                    continue
                first = seen[spots]
                targets = [cross[j][o] for j in range(9) if spots >> j & 1 for o in range(9) if o not in (first, n)]
                removed = g.remove(targets, bit)
                if removed:
                    steps.append(Step("x_wing", (), removed))
    return steps


ORDER = (naked_single, hidden_single, pointing, claiming, naked_pair, hidden_pair, naked_triple, hidden_triple,
         x_wing)


@dataclass(frozen=True)
class Rating:
    level: str  # one of LEVELS
    techniques: dict[str, int]  # technique -> steps that used it, in the order of TECHNIQUES
    steps: tuple[Step, ...]
    board: Board  # how far the techniques got: the solution unless the level is "search"

    @property
    def solved(self) -> bool:
        return all(self.board)


def rate(puzzle: Board | Grid) -> Rating:
    """The hardest technique ``puzzle`` needs (a board, or a :class:`Grid` state, which is changed in place).

    Raises :class:`Contradiction` (a ``BoardError``) when the techniques prove the puzzle has no solution.
    """
    g = puzzle if isinstance(puzzle, Grid) else Grid(puzzle)
    steps: list[Step] = []
    while not g.solved():
        for technique in ORDER:
            found = technique(g)
            if found:
                steps += found
                break
        else:
            break
    used = {name: 0 for name in TECHNIQUES}
    for s in steps:
        used[s.technique] += 1
    used = {name: n for name, n in used.items() if n}
    level = "search" if not g.solved() else max((TECHNIQUES[t] for t in used), key=LEVELS.index, default="easy")
    return Rating(level, used, tuple(steps), g.board())


def check_level(level: str) -> str:
    if level not in LEVELS:
        raise ValueError(f"unknown rating {level!r}; choose from {', '.join(LEVELS)}")
    return level


def unavoidable_sets(solution: Board) -> list[int]:
    """Sets of cells (81-bit masks) of ``solution`` that a unique puzzle must keep a clue in: for two digits,
    the cells of a component of the graph linking the two cells holding them in each row, column and box.
    Swapping the two digits on such a component gives another valid grid."""
    at = [[0] * 27 for _ in range(10)]  # digit -> unit -> the cell holding it
    for u, unit in enumerate(UNITS):
        for c in unit:
            at[solution[c]][u] = c
    out = []
    for a, b in combinations(range(1, 10), 2):
        group = {c: 1 << c for u in range(27) for c in (at[a][u], at[b][u])}  # cell -> mask of its group
        for u in range(27):
            x, y = group[at[a][u]], group[at[b][u]]
            if x != y:
                merged = rest = x | y
                while rest:
                    low = rest & -rest
                    group[low.bit_length() - 1] = merged
                    rest ^= low
        out += set(group.values())
    return sorted(out, key=lambda m: bin(m).count("1"))


def _unique(puzzle: Board) -> bool:
    """``count_solutions(puzzle) == 1``, on the puzzle filled in by singles first (solved: unique)."""
    g = Grid(puzzle)
    try:
        while naked_single(g) or hidden_single(g):
            pass
    except Contradiction:
        return False
    return g.solved() or count_solutions(g.board(), 2) == 1


def minimal_symmetric(solution: Board, rng: random.Random) -> Board:
    """``solution`` thinned by pairs of cells that mirror each other through the centre, in a random order,
    each pair kept only when removing it would leave more than one solution. One pass is enough: a pair that
    cannot go cannot go later either (fewer clues never remove solutions), so no pair of the result can go.
    A removal that empties an unavoidable set (:func:`unavoidable_sets`) fails without a search; the others
    are checked by ``count_solutions`` after singles have filled in what they can (the same answer, faster).
    """
    puzzle, kept, sets = list(solution), (1 << 81) - 1, unavoidable_sets(solution)
    pairs = list(range(41))  # cell i with 80 - i; 40 is the centre, its own mirror
    rng.shuffle(pairs)
    for i in pairs:
        fewer = kept & ~(1 << i | 1 << (80 - i))
        if all(u & fewer for u in sets):
            puzzle[i] = puzzle[80 - i] = 0
            if _unique(tuple(puzzle)):
                kept = fewer
                continue
            puzzle[i], puzzle[80 - i] = solution[i], solution[80 - i]
    return tuple(puzzle)


def _rated(job: tuple[str, int, int, int, int, int]) -> tuple[Board, Board]:
    level, seed, k, lo, hi, max_grids = job
    rng = random.Random(f"rated:{level}:{seed}:{k}")  # one RNG per puzzle: the same set whatever the worker count
    in_range = 0
    for tried in range(1, max_grids + 1):
        solution = random_grid(rng)
        puzzle = minimal_symmetric(solution, rng)
        if lo <= clues(puzzle) <= hi:
            in_range += 1
            if rate(puzzle).level == level:
                return puzzle, solution
        elif tried == PROBE and not in_range:
            raise BoardError(f"none of {PROBE} minimal symmetric puzzles had {lo}-{hi} clues (most have 24-30)")
    raise BoardError(f"no {level} puzzle with {lo}-{hi} clues in {max_grids} grids; widen the clue range")


def generate_rated(rating: str, n: int, seed: int, clues: tuple[int, int] = CLUE_RANGE, workers: int = 1,
                   max_grids: int = 20_000) -> Iterator[tuple[Board, Board]]:
    """``n`` ``(puzzle, solution)`` pairs: minimal symmetric puzzles of level ``rating`` with a clue count in
    ``clues`` (inclusive), each from fresh seeded grids until one fits; the same for a seed whatever
    ``workers`` (processes, used from 2 puzzles on: one hard puzzle takes several hundred grids)."""
    check_level(rating)
    lo, hi = clues
    if not 17 <= lo <= hi <= 81:
        raise BoardError(f"the clue range must lie in 17..81 with LO <= HI, got {lo}-{hi}")
    jobs = ((rating, seed, k, lo, hi, max_grids) for k in range(n))
    if workers <= 1 or n < 2:
        yield from map(_rated, jobs)
        return
    with ProcessPoolExecutor(workers) as pool:
        yield from pool.map(_rated, jobs, chunksize=1)
