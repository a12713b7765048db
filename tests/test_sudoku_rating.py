"""The technique rater (dgemma.sudoku.rating), rated minimal symmetric puzzles, and their commands."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest

from dgemma.sudoku import board as sb
from dgemma.sudoku import buckets, task
from dgemma.sudoku import rating as R

ROOT = Path(__file__).resolve().parents[1]
# A valid full grid: row r is 1..9 shifted by 3r + r // 3 (each box gets every digit once).
GRID = tuple((3 * r + r // 3 + c) % 9 + 1 for r in range(9) for c in range(9))
# Arto Inkala's "world's hardest Sudoku" (2012) and Easter Monster: no single, locked candidate, subset or
# X-wing applies on their first grid (they need chains and nets), so the rater stalls at once.
INKALA = "800000000003600000070090200050007000000045700000100030001000068008500010090000400"
EASTER_MONSTER = "1.......2.9.4...5...6...7...5.9.3.......7.......85..4.7.....6...3...9.8...2.....1"
# Wikipedia's example Sudoku: solved by singles alone (every cell is a naked or hidden single in turn).
WIKIPEDIA = "530070000600195000098000060800060003400803001700020006060000280000419005000080079"
# Seeds whose first rated puzzle comes from a few grids (found by trying seeds), to keep the tests fast.
QUICK = {"easy": 1, "medium": 1, "hard": 5}


def _empty(**remove: list[int]) -> R.Grid:
    """An empty grid with candidates removed: ``d5=[cells]`` removes 5 from those cells."""
    g = R.Grid((0,) * 81)
    for name, cells in remove.items():
        g.remove(cells, 1 << int(name[1:]))
    return g


def _first_progress(g: R.Grid) -> list[R.Step]:
    """The steps of the first technique, in the rater's order, that changes ``g`` (as ``rate`` takes them)."""
    for technique in R.ORDER:
        steps = technique(g)
        if steps:
            return steps
    return []


def _removed(steps) -> set[tuple[int, int]]:
    return {x for s in steps for x in s.removed}


def test_naked_singles_alone_solve_a_grid_with_one_blank_per_row():
    puzzle = tuple(0 if i % 10 == 0 else v for i, v in enumerate(GRID))  # the diagonal blanked
    r = R.rate(puzzle)  # each blank has the other eight digits of its row placed: one candidate left
    assert r.level == "easy" and r.techniques == {"naked_single": 9} and r.board == GRID
    wiki = R.rate(sb.parse(WIKIPEDIA))
    assert wiki.level == "easy" and set(wiki.techniques) <= {"naked_single", "hidden_single"}
    assert wiki.board == sb.solve(sb.parse(WIKIPEDIA))


def test_a_hidden_single_is_the_only_move():
    # 7 removed from every cell of row 4 but r4c6: it fits one cell of that row; every cell keeps 8 or 9 digits
    g = _empty(d7=[27 + c for c in range(9) if c != 5])
    steps = _first_progress(g)
    assert [(s.technique, s.placed) for s in steps] == [("hidden_single", ((32, 7),))]


def test_pointing():
    # 5 in box 1 only on row 1 (removed from rows 2-3 of the box): it leaves the rest of row 1
    g = _empty(d5=[9, 10, 11, 18, 19, 20])
    steps = _first_progress(g)
    assert {s.technique for s in steps} == {"pointing"} and _removed(steps) == {(c, 5) for c in range(3, 9)}


def test_claiming():
    # 5 in row 1 only in box 1 (removed from r1c4-r1c9): it leaves the rest of box 1
    g = _empty(d5=list(range(3, 9)))
    steps = _first_progress(g)
    assert {s.technique for s in steps} == {"claiming"}
    assert _removed(steps) == {(c, 5) for c in (9, 10, 11, 18, 19, 20)}


def test_naked_pair():
    # r1c1 and r1c2 hold only {1, 2}: 1 and 2 leave the rest of row 1 and of box 1 (no digit is locked to a
    # line or box, no cell is a single)
    g = _empty(**{f"d{d}": [0, 1] for d in range(3, 10)})
    steps = _first_progress(g)
    assert {s.technique for s in steps} == {"naked_pair"}
    assert _removed(steps) == {(c, d) for c in (2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 18, 19, 20) for d in (1, 2)}


def test_hidden_pair():
    # in row 1, 1 and 2 fit only r1c1 and r1c5 (two boxes, so nothing is locked): those cells lose 3-9
    g = _empty(d1=[1, 2, 3, 5, 6, 7, 8], d2=[1, 2, 3, 5, 6, 7, 8])
    steps = _first_progress(g)
    assert {s.technique for s in steps} == {"hidden_pair"}
    assert _removed(steps) == {(c, d) for c in (0, 4) for d in range(3, 10)}


def test_naked_and_hidden_triples():
    # r1c1, r1c5, r1c9 hold {1,2}, {2,3}, {1,3}: no pair, but together three digits in three cells
    cells = {0: (1, 2), 4: (2, 3), 8: (1, 3)}
    g = _empty(**{f"d{d}": [c for c, keep in cells.items() if d not in keep] for d in range(1, 10)})
    steps = _first_progress(g)
    assert {s.technique for s in steps} == {"naked_triple"}
    assert _removed(steps) == {(c, d) for c in (1, 2, 3, 5, 6, 7) for d in (1, 2, 3)}
    # 1, 2 and 3 fit only r1c1, r1c5, r1c9 (each of them two of those cells): those cells lose 4-9
    others = [1, 2, 3, 5, 6, 7]
    g = _empty(d1=others + [8], d2=others + [0], d3=others + [4])
    steps = _first_progress(g)
    assert {s.technique for s in steps} == {"hidden_triple"}
    assert _removed(steps) == {(c, d) for c in (0, 4, 8) for d in range(4, 10)}


def test_x_wing():
    # 5 fits rows 1 and 5 only in columns 1 and 5 (four boxes, so nothing is locked): whichever way the two
    # rows take them, columns 1 and 5 have their 5 in rows 1 and 5, so it leaves the rest of both columns
    g = _empty(d5=[c for r in (0, 4) for c in range(9 * r, 9 * r + 9) if c % 9 not in (0, 4)])
    steps = _first_progress(g)
    assert [s.technique for s in steps] == ["x_wing"]
    assert _removed(steps) == {(9 * r + c, 5) for r in (1, 2, 3, 5, 6, 7, 8) for c in (0, 4)}


def test_famous_hard_puzzles_need_search():
    for text in (INKALA, EASTER_MONSTER):
        p = sb.parse(text)
        assert sb.count_solutions(p) == 1
        r = R.rate(p)
        assert r.level == "search" and not r.solved and r.steps == () and r.board == p


def test_contradictions_and_bad_boards(monkeypatch):
    row = list(range(1, 9)) + [0] + [0] * 72
    row[17] = 9  # r2c9 = 9: r1c9 can hold nothing
    with pytest.raises(R.Contradiction):
        R.rate(tuple(row))
    with pytest.raises(sb.BoardError):
        R.rate((1, 1) + (0,) * 79)
    with pytest.raises(ValueError, match="unknown rating"):
        next(R.generate_rated("extreme", 1, 0))
    monkeypatch.setattr(R, "PROBE", 4)
    with pytest.raises(sb.BoardError, match="none of 4 minimal symmetric puzzles had 40-50 clues"):
        next(R.generate_rated("easy", 1, 0, clues=(40, 50)))


def test_no_technique_removes_the_solution_digit():
    """Every placement and elimination of every technique agrees with the solution, over many puzzles: minimal
    symmetric ones (all levels) and random thinnings with more clues."""
    levels, used = set(), set()
    for k in range(36):
        rng = random.Random(f"rating-property:{k}")
        solution = sb.random_grid(rng)
        puzzle = R.minimal_symmetric(solution, rng) if k % 3 else sb.generate(26 + k % 8, rng)[0]
        solution = sb.solve(puzzle)
        r = R.rate(puzzle)
        levels.add(r.level)
        used |= set(r.techniques)
        for s in r.steps:
            assert all(solution[c] == d for c, d in s.placed), s
            assert all(solution[c] != d for c, d in s.removed), s
        assert all(v in (0, solution[i]) for i, v in enumerate(r.board))
        assert r.solved == (r.level != "search")
    assert levels >= {"easy", "medium", "search"}
    assert used >= {"naked_single", "hidden_single", "pointing", "claiming", "naked_pair", "hidden_pair"}


def _reference_move(g: R.Grid) -> str | None:
    """The first technique that applies to ``g``, found with sets and plain loops (a slow reference)."""
    cand = {i: {d for d in range(1, 10) if g.cands[i] >> d & 1} for i in range(81) if not g.values[i]}
    if any(len(c) == 1 for c in cand.values()):
        return "naked_single"
    units = [(u, [c for c in u if c in cand], {g.values[c] for c in u}) for u in R.UNITS]
    if any(sum(d in cand.get(c, ()) for c in u) == 1 for u, _, placed in units for d in set(range(1, 10)) - placed):
        return "hidden_single"
    for box in R.BOXES:
        for line in R.ROWS + R.COLS:
            seg = set(box) & set(line)
            for d in range(1, 10) if seg else ():
                in_box = {c for c in box if d in cand.get(c, ())}
                in_line = {c for c in line if d in cand.get(c, ())}
                if in_box and in_box <= seg and in_line - seg or in_line and in_line <= seg and in_box - seg:
                    return "locked candidates"
    for k in (2, 3):
        for u, blank, placed in units:
            for cells in combinations(blank, k):
                digits = set().union(*(cand[c] for c in cells))
                if len(digits) == k and any(cand[c] & digits for c in blank if c not in cells):
                    return f"naked subset of {k}"
            for digits in map(set, combinations(set(range(1, 10)) - placed, k)):
                cells = [c for c in blank if cand[c] & digits]
                if len(cells) == k and any(cand[c] - digits for c in cells):
                    return f"hidden subset of {k}"
    for d in range(1, 10):
        for lines, cross in ((R.ROWS, R.COLS), (R.COLS, R.ROWS)):
            spots = [{j for j, c in enumerate(line) if d in cand.get(c, ())} for line in lines]
            for a, b in combinations(range(9), 2):
                if len(spots[a]) == 2 and spots[a] == spots[b] and any(
                        d in cand.get(cross[j][o], ()) for j in spots[a] for o in range(9) if o not in (a, b)):
                    return "x_wing"
    return None


def test_where_the_rater_stalls_no_technique_applies():
    """Against the slow reference: the grid a "search" rating stops on admits none of the techniques."""
    stalled = 0
    for k in range(24):
        rng = random.Random(f"rating-stall:{k}")
        g = R.Grid(R.minimal_symmetric(sb.random_grid(rng), rng))
        if R.rate(g).level == "search":
            stalled += 1
            assert _reference_move(g) is None
    assert stalled >= 3
    assert _reference_move(R.Grid(sb.parse(INKALA))) is None
    g = _empty(d5=[c for r in (0, 4) for c in range(9 * r, 9 * r + 9) if c % 9 not in (0, 4)])
    assert _reference_move(g) == "x_wing"


def _check_rated(puzzle, solution, level, lo=22, hi=32):
    assert sb.count_solutions(puzzle) == 1 and sb.is_solution(solution, puzzle)
    assert all((puzzle[i] == 0) == (puzzle[80 - i] == 0) for i in range(81))  # 180-degree symmetry
    for i in range(41):  # minimal: no symmetric pair of clues can go
        if puzzle[i]:
            fewer = list(puzzle)
            fewer[i] = fewer[80 - i] = 0
            assert sb.count_solutions(tuple(fewer)) == 2, i
    assert lo <= sb.clues(puzzle) <= hi and R.rate(puzzle).level == level


def test_unavoidable_sets_and_the_thinning_shortcuts():
    for k in range(3):
        solution = sb.random_grid(random.Random(k))
        sets = R.unavoidable_sets(solution)
        assert sum(bin(m).count("1") for m in sets) == 36 * 18  # each digit pair's 18 cells, split into sets
        for m in sets:
            cells = [i for i in range(81) if m >> i & 1]
            a, b = sorted({solution[i] for i in cells})
            swapped = tuple(a + b - v if m >> i & 1 else v for i, v in enumerate(solution))
            assert len(cells) >= 4 and sb.is_solution(swapped) and swapped != solution
        # the thinning's shortcuts (unavoidable sets, singles first) give what count_solutions alone gives
        rng, puzzle, order = random.Random(k), list(solution), list(range(41))
        random.Random(k).shuffle(order)
        for i in order:
            puzzle[i] = puzzle[80 - i] = 0
            if sb.count_solutions(tuple(puzzle)) != 1:
                puzzle[i], puzzle[80 - i] = solution[i], solution[80 - i]
        assert R.minimal_symmetric(solution, rng) == tuple(puzzle)


def test_generated_puzzles_are_unique_symmetric_minimal_and_rated():
    for level, seed in QUICK.items():
        pairs = list(R.generate_rated(level, 1, seed))
        assert pairs == list(R.generate_rated(level, 1, seed))  # deterministic for a seed
        for puzzle, solution in pairs:
            _check_rated(puzzle, solution, level)
    easy = list(R.generate_rated("easy", 3, 5, clues=(24, 30)))
    assert easy != list(R.generate_rated("easy", 3, 6, clues=(24, 30)))
    for puzzle, solution in easy:
        _check_rated(puzzle, solution, "easy", 24, 30)
    assert list(R.generate_rated("medium", 4, 2, workers=2)) == list(R.generate_rated("medium", 4, 2))


def test_rated_eval_buckets_have_their_own_seeds():
    from dgemma.sudoku import cli
    from dgemma.sudoku.parsers import EVAL_SEED

    offsets = list(buckets.RATING_SEED_OFFSETS.values())
    assert len(set(offsets)) == len(offsets) and not set(offsets) & set(task.BUCKET_SEED_OFFSETS.values())
    assert list(buckets.rated_bucket(2, "rated-easy", EVAL_SEED)) == \
        list(R.generate_rated("easy", 2, EVAL_SEED + buckets.RATING_SEED_OFFSETS["easy"]))
    assert cli.bucket_pairs("rated-easy", 2, seed=7) == list(buckets.rated_bucket(2, "rated-easy", 7))
    assert buckets.parse_ratings("easy, hard,easy") == ["easy", "hard"]
    with pytest.raises(ValueError, match="unknown rating 'harder'"):
        buckets.parse_ratings("easy,harder")


def test_generate_rating_command_end_to_end():
    proc = subprocess.run([sys.executable, "-m", "dgemma", "sudoku", "generate", "--rating", "easy", "-n", "3",
                           "--jsonl", "--seed", "4"], cwd=ROOT, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 3 and {r["rating"] for r in rows} == {"easy"}
    for r in rows:
        p, s = sb.parse(r["puzzle"]), sb.parse(r["solution"])
        assert r["clues"] == sb.clues(p) and sb.is_solution(s, p) and R.rate(p).level == "easy"
    assert [r["puzzle"] for r in rows] == [sb.format_board(p) for p, _ in R.generate_rated("easy", 3, 4)]


@pytest.mark.parametrize("args", [["generate", "--rating", "extreme"], ["eval", "--rating", "easy,extreme"]])
def test_bad_rating_is_one_line(args, capsys):
    from dgemma.cli import main

    with pytest.raises(SystemExit) as e:
        main(["sudoku", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "unknown rating 'extreme'" in err


def test_training_puzzles_mix_minimal_symmetric_ones_by_share():
    """``sudoku train --minimal S``: that share of the puzzles is minimal and symmetric, the rest is drawn by
    clue count exactly as without it; the set is the same for any worker count."""
    pairs = list(task.training_puzzles(70, (40, 46), seed=3, minimal=0.1))
    assert pairs[:63] == list(task.puzzles(63, (40, 46), 3))
    assert pairs == list(task.training_puzzles(70, (40, 46), seed=3, minimal=0.1, workers=2))
    assert list(task.minimal_puzzles(64, 3, workers=2)) == list(task.minimal_puzzles(64, 3))  # the pool's path
    assert list(task.training_puzzles(5, (40, 46), 3)) == list(task.puzzles(5, (40, 46), 3))
    minimal = pairs[63:]
    assert len(minimal) == 7 and len(set(minimal)) == 7
    for puzzle, solution in minimal:
        assert sb.is_solution(solution, puzzle) and sb.count_solutions(puzzle) == 1
        assert all(bool(puzzle[i]) == bool(puzzle[80 - i]) for i in range(81))  # 180-degree symmetry
        assert sb.clues(puzzle) < 40  # not from the clue range: thinned until no mirrored pair can go
    # eval's rated buckets draw from their own stream: no shared grid with the same seed
    evals = {s for level in ("easy", "search") for _, s in R.generate_rated(level, 3, 3)}
    assert not evals & {s for _, s in minimal}
    assert list(task.training_puzzles(2, (40, 46), 3, minimal=1.0)) == list(task.minimal_puzzles(2, 3))
    with pytest.raises(ValueError, match="0..1"):
        list(task.training_puzzles(2, (40, 46), 3, minimal=1.5))


@pytest.mark.parametrize("args, says", [(["--minimal", "2"], "--minimal takes a share from 0 to 1"),
                                        (["--hold-clues", "--objective", "ar"], "--objective ar has none")])
def test_bad_train_options_are_one_line(tmp_path, capsys, args, says):
    from dgemma.cli import main

    with pytest.raises(SystemExit) as e:
        main(["sudoku", "train", "--out", str(tmp_path / "r"), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and says in err
    assert not (tmp_path / "r").exists()  # checked before anything is written
