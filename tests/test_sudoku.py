"""Sudoku: boards, solver, generator, task format, scoring and the ``dgemma sudoku`` commands."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from dgemma.sudoku import board as sb
from dgemma.sudoku import task

from conftest import run_main

ROOT = Path(__file__).resolve().parents[1]
# A well-known puzzle (Project Euler 96, grid 01) and its unique solution.
PUZZLE = "003020600900305001001806400008102900700000008006708200002609500800203009005010300"
SOLUTION = "483921657967345821251876493548132976729564138136798245372689514814253769695417382"


def test_parse_format_and_solve_a_known_puzzle():
    p = sb.parse(PUZZLE.replace("0", "."))
    assert sb.format_board(p) == PUZZLE and sb.clues(p) == 32
    assert sb.format_board(sb.solve(p)) == SOLUTION
    assert sb.count_solutions(p) == 1
    assert sb.is_solution(sb.parse(SOLUTION), p)
    assert not sb.is_solution(sb.parse(SOLUTION), sb.parse("1" + PUZZLE[1:]))  # a clue changed
    wrong = list(sb.parse(SOLUTION))
    wrong[0], wrong[1] = wrong[1], wrong[0]
    assert not sb.is_solution(tuple(wrong))


def test_parse_rejects_bad_lines():
    for bad in ("123", PUZZLE + "1", PUZZLE[:-1] + "x"):
        with pytest.raises(sb.BoardError):
            sb.parse(bad)


def test_counting_finds_several_solutions_and_none():
    empty_ish = sb.parse(PUZZLE[:40] + "0" * 41)
    assert sb.count_solutions(empty_ish, limit=2) == 2
    clash = sb.parse("11" + "0" * 79)
    assert sb.count_solutions(clash) == 0 and sb.solve(clash) is None


@pytest.mark.parametrize("n_clues", [46, 36, 30, 25])
def test_generated_puzzles_are_unique_and_reproducible(n_clues):
    rng = random.Random(n_clues)
    for _ in range(5):
        puzzle, solution = sb.generate(n_clues, rng)
        assert sb.clues(puzzle) == n_clues
        assert sb.count_solutions(puzzle, limit=3) == 1  # unique, checked independently of the generator
        assert sb.is_solution(solution, puzzle)
    a = list(task.puzzles(3, (30, 39), seed=7))
    assert a == list(task.puzzles(3, (30, 39), seed=7)) and a != list(task.puzzles(3, (30, 39), seed=8))
    assert all(30 <= sb.clues(p) <= 39 for p, _ in a)


def test_parallel_generation_gives_the_same_puzzles():
    one = list(task.puzzles(70, (36, 46), seed=3))
    assert list(task.puzzles(70, (36, 46), seed=3, workers=2)) == one  # 70 >= 64: really uses the pool
    assert len(set(one)) == 70


def test_symmetric_views_are_valid_unique_and_varied():
    pairs = list(task.puzzles(4, (30, 40), seed=1))
    views = list(task.augmented(pairs, 6, seed=0))
    assert len(views) == 24 and views[0] == pairs[0] and views[6] == pairs[1]  # each original comes first
    for k, (puzzle, solution) in enumerate(views):
        base_p, base_s = pairs[k // 6]
        assert sb.clues(puzzle) == sb.clues(base_p)
        assert sb.is_solution(solution, puzzle) and sb.count_solutions(puzzle, limit=2) == 1
        # digits are only renamed: the clue counts per digit are the original's, in some order
        assert sorted(puzzle.count(d) for d in range(1, 10)) == sorted(base_p.count(d) for d in range(1, 10))
    assert len({p for p, _ in views}) == 24  # no two views coincide
    assert views == list(task.augmented(pairs, 6, seed=0)) != list(task.augmented(pairs, 6, seed=1))


def test_tokenizer_and_record_format():
    tok = task.build_tokenizer()
    ids = tok.encode(PUZZLE)
    assert len(ids) == 81 and tok.decode(ids) == PUZZLE and max(ids) < task.VOCAB
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
    rec = task.record(sb.parse(PUZZLE), sb.parse(SOLUTION))
    assert rec == {"prompt": PUZZLE, "completion": SOLUTION}


def test_answer_parsing_and_scores_on_known_boards():
    p, s = sb.parse(PUZZLE), sb.parse(SOLUTION)
    assert task.answer_board("12") == (1, 2) + (0,) * 79
    score = task.Score()
    score.add(p, s, s, steps=4)  # right
    wrong = list(s)
    blanks = [i for i, v in enumerate(p) if v == 0]
    for i in blanks[:10]:  # 10 blank cells wrong
        wrong[i] = wrong[i] % 9 + 1
    first_clue = next(i for i, v in enumerate(p) if v)
    wrong[first_clue] = wrong[first_clue] % 9 + 1  # and one clue overwritten
    score.add(p, s, tuple(wrong), steps=6)
    out = score.summary()
    assert out["puzzles"] == 2 and out["exact"] == 0.5 and out["mean_steps"] == 5
    assert out["cell_accuracy"] == pytest.approx((2 * 49 - 10) / (2 * 49))
    assert out["clue_preservation"] == pytest.approx((2 * 32 - 1) / (2 * 32))


def _cli(*args, stdin=None, merged=False):
    """``dgemma sudoku ARGS`` in a subprocess; ``merged``: stderr into stdout, as ``2>&1`` does."""
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT} if merged else {"capture_output": True}
    return subprocess.run([sys.executable, "-m", "dgemma", "sudoku", *args], cwd=ROOT, text=True, input=stdin,
                          timeout=600, **pipes)


def test_generate_command():
    proc = _cli("generate", "-n", "4", "--bucket", "medium", "--seed", "3")
    lines = proc.stdout.split()
    assert proc.returncode == 0 and len(lines) == 4
    for line in lines:
        p = sb.parse(line)
        assert 30 <= sb.clues(p) <= 39 and sb.count_solutions(p) == 1
    assert _cli("generate", "-n", "4", "--bucket", "medium", "--seed", "3").stdout.split() == lines
    js = [json.loads(x) for x in _cli("generate", "-n", "2", "--clues", "40", "--jsonl").stdout.splitlines()]
    assert all(x["clues"] == 40 and sb.is_solution(sb.parse(x["solution"]), sb.parse(x["puzzle"])) for x in js)
    bad = _cli("generate", "--clues", "10")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A Sudoku model after a few steps of ``dgemma sudoku train`` (enough to exercise the commands)."""
    out = tmp_path_factory.mktemp("sudoku")
    proc = _cli("train", "--out", str(out), "--puzzles", "64", "--steps", "2", "--set", "train.batch_size=8",
                "--set", "train.micro_batch=8", "--set", "train.save_every=0", "--minimal", "0.125",
                "--set", "objective.encoder_loss_weight=0", "--hold-clues")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    prompts = [r["prompt"] for r in rows]
    # --hold-clues: each row's "fixed" spans cover exactly its clue cells
    assert all({i for a, b in r["fixed"] for i in range(a, b)} == {i for i, ch in enumerate(r["prompt"]) if ch != "0"}
               for r in rows)
    assert len(prompts) == 64 * 8 and sum(p.count("0") > 81 - 33 for p in prompts[-8 * 8:]) == 64  # 8 minimal
    assert "ar_loss" not in json.loads(proc.stdout.splitlines()[-1])["last"]  # weight 0: not computed
    # fp32 on every CPU, bf16 hardware or not: the recipe's numerics do not depend on the machine
    assert json.loads((out / "run" / "train_config.json").read_text())["train"]["precision"] == "fp32"
    summary = json.loads(proc.stdout.splitlines()[-1])
    return Path(summary["model"])


def test_solve_prints_one_answer_per_puzzle_in_order(trained, tmp_path, capsys, monkeypatch):
    puzzles = [PUZZLE, PUZZLE.replace("0", "."), sb.format_board(sb.generate(40, random.Random(1))[0])]
    (tmp_path / "in.txt").write_text("\n".join(puzzles) + "\n")
    once = ("--restarts", "1", "--max-steps", "4")  # the untrained model never settles: keep an I/O test short
    proc = _cli("solve", str(tmp_path / "in.txt"), "--model", str(trained), *once)
    answers = proc.stdout.splitlines()
    assert len(answers) == 3
    # the untrained model's answers are no solutions: each is named (with its input line), then a summary
    invalid = [line for line in proc.stderr.splitlines() if "is not a solution" in line]
    assert proc.returncode == 1 and len(invalid) == 3 and f"answer 3 ({tmp_path / 'in.txt'}:3)" in invalid[2]
    assert proc.stderr.splitlines()[-1] == "dgemma: 0 solved, 3 invalid"
    assert all(len(a) == 81 and a.isdigit() for a in answers)
    assert answers[0] == answers[1]  # '.' and '0' are the same blank
    stdin = _cli("solve", "-", "--model", str(trained), *once, stdin="\n".join(puzzles[:2]))
    assert stdin.stdout.splitlines() == answers[:2]
    monkeypatch.setattr("sys.stdin", io.StringIO(PUZZLE + "\n123\n"))
    rc, _, err = run_main(capsys, "sudoku", "solve", "-", "--model", str(trained))
    assert rc == 2 and "<stdin>:2:" in err and "Traceback" not in err


def test_eval_reports_both_decoders(trained):
    from dgemma.sudoku.solve import SOLVE_DEFAULTS

    proc = _cli("eval", "--model", str(trained), "-n", "3", "--buckets", "medium", "--json", "--constrain",
                "--restarts", "0", "--max-steps", "4")  # a short cap: the untrained model would run 128 x 16 steps
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout)["medium"]
    assert row["diffusion-constrained"]["clue_preservation"] == 1.0  # even the untrained model keeps them
    for mode in ("diffusion", "spec-sampler", "diffusion-constrained", "autoregressive"):
        r = row[mode]
        assert r["puzzles"] == 3 and 0 <= r["exact"] <= 1 and 0 <= r["cell_accuracy"] <= 1
        assert 0 <= r["clue_preservation"] <= 1 and r["seconds_per_puzzle"] > 0
    assert row["spec-sampler"]["mean_steps"] >= 1
    # The solve defaults restart unsure boards, and every attempt's steps count.
    assert row["diffusion"]["mean_steps"] >= row["spec-sampler"]["mean_steps"]
    # the untrained model never settles: every attempt runs to the cap (1 attempt, or 1 + the defaults' restarts,
    # the defaults' parallel_attempts at a time: the steps are decoder passes)
    attempts, lanes = 1 + SOLVE_DEFAULTS["restarts"], SOLVE_DEFAULTS["parallel_attempts"]
    assert attempts % lanes == 0 and lanes > 1
    assert row["spec-sampler"]["mean_steps"] == 4 and row["diffusion"]["mean_steps"] == attempts // lanes * 4
    assert "medium: generating 3 puzzles" in proc.stderr  # said before the slow part starts
    one = _cli("eval", "--model", str(trained), "-n", "2", "--skip", "1", "--buckets", "medium", "--json", "--no-ar",
               "--restarts", "1", "--restart-entropy", "1e-30", "--batch", "1", "--max-steps", "3",
               "--restart-after", "2", "--parallel-attempts", "1")
    row = json.loads(one.stdout)["medium"]
    assert row["diffusion-restarts1-below1e-30"]["puzzles"] == 2  # puzzles 2 and 3
    for r in row.values():  # one puzzle per batch: each puzzle's own wall time, their median and 90th percentile
        assert 0 < r["median_seconds"] <= r["p90_seconds"] <= 2 * r["seconds_per_puzzle"]
    assert "median_seconds" not in json.loads(proc.stdout)["medium"]["diffusion"]  # batch 32: no per-puzzle times
    # never settles: each attempt but the last (of the defaults' or 1 + 1) is given up after 2 steps
    assert row["diffusion"]["mean_steps"] == (attempts - 1) * 2 + 3
    assert row["diffusion-restarts1-below1e-30"]["mean_steps"] == 2 + 3


def test_bad_eval_options_are_one_line(trained, capsys):
    for bad, word in ((["--restart-entropy", "0"], "restart"), (["--restarts", "-1"], "restart"),
                      (["--max-steps", "0"], "--max-steps must be a positive integer"),
                      (["--restart-after", "0"], "restart_after"), (["--parallel-attempts", "0"], "parallel_attempts")):
        # checked before the model loads or a puzzle is drawn
        rc, _, err = run_main(capsys, "sudoku", "eval", "--model", str(trained), "-n", "1", *bad)
        assert rc == 2 and word in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_solve_show_draws_boards_and_gives_the_same_answers(trained, tmp_path):
    (tmp_path / "in.txt").write_text(PUZZLE + "\n")
    once = ("--restarts", "1", "--max-steps", "5")
    plain = _cli("solve", str(tmp_path / "in.txt"), "--model", str(trained), *once)
    shown = _cli("solve", str(tmp_path / "in.txt"), "--model", str(trained), "--show", *once)
    assert shown.returncode == plain.returncode == 1  # the untrained model's answer is no solution
    assert shown.stdout == plain.stdout and len(plain.stdout.split()) == 1  # stdout: one answer per line
    assert "------+-------+------" in shown.stderr
    # the untrained model never settles: 2 attempts of 5 steps, side by side (the defaults' 2 parallel attempts)
    # or one after the other; the status line ends with a newline even when stderr is not a terminal, so
    # `2>&1` keeps the answer on a line of its own
    merged = _cli("solve", str(tmp_path / "in.txt"), "--model", str(trained), "--show", *once, merged=True)
    lines = merged.stdout.splitlines()
    assert "done: 5 steps" in lines and plain.stdout.strip() in lines
    one = _cli("solve", str(tmp_path / "in.txt"), "--model", str(trained), "--show", *once, "--parallel-attempts",
               "1", merged=True)
    assert "done: 10 steps" in one.stdout.splitlines()
    # --pin, the old name of --constrain: the untrained model's answer keeps every clue and fills every blank
    pinned = _cli("solve", str(tmp_path / "in.txt"), "--model", str(trained), "--show", "--pin", *once)
    answer = sb.parse(pinned.stdout.strip())
    assert pinned.returncode == 1 and "------+-------+------" in pinned.stderr  # still no solution
    assert all(a == p for a, p in zip(answer, sb.parse(PUZZLE)) if p) and 0 not in answer


def test_render_marks_clues_and_changes():
    from dgemma.sudoku.view import render

    p = sb.parse(PUZZLE)
    text = render(p, sb.parse(SOLUTION), p, "step 3")
    assert text.plain.splitlines()[0] == "4 8 3 | 9 2 1 | 6 5 7 "
    style_at = {s.start: str(s.style) for s in text.spans if s.end - s.start == 1}
    assert style_at[4] == "bold"  # cell 2 holds the clue 3
    assert "yellow" in style_at[0]  # cell 0 was blank at the previous step and is 4 now
    assert "yellow" in style_at[2]  # so was cell 1
    again = render(p, sb.parse(SOLUTION), sb.parse(SOLUTION))
    assert {s.start: str(s.style) for s in again.spans}[0] == "cyan"  # unchanged since the previous step


def test_problems_name_the_broken_rules():
    p, s = sb.parse(PUZZLE), sb.parse(SOLUTION)
    assert sb.problems(s, p) == [] and sb.problems(s) == []
    swapped = list(s)
    swapped[0], swapped[1] = swapped[1], swapped[0]  # 4 and 8 trade places in row 1: two columns break
    assert sb.problems(tuple(swapped), p) == ["8 twice in column 1", "4 twice in column 2"]
    bad = list(s)
    bad[2] = 4  # the clue 3 at r1c3 overwritten with the 4 of r1c1
    bad[80] = 0
    assert sb.problems(tuple(bad), p) == ["1 cell not filled", "4 twice in row 1", "4 twice in column 3",
                                          "4 twice in box 1", "clue 3 at r1c3 changed to 4"]
    assert sb.problems((5,) * 81)[0] == "5 9 times in row 1"


def test_eval_buckets_share_no_puzzle_and_no_solution_grid():
    from dgemma.sudoku.parsers import EVAL_SEED

    names = ("unsloth", "medium", "hard")
    drawn = {b: list(task.bucket_puzzles(12, b, EVAL_SEED)) for b in names}
    for i, a in enumerate(names):
        assert all(sb.BUCKETS[a][0] <= sb.clues(p) <= sb.BUCKETS[a][1] for p, _ in drawn[a])
        for b in names[i + 1:]:
            assert not {p for p, _ in drawn[a]} & {p for p, _ in drawn[b]}
            assert not {s for _, s in drawn[a]} & {s for _, s in drawn[b]}, (a, b)
    # why each bucket needs its own seed: from one seed, puzzle k of every bucket starts from one grid
    shared = [s for _, s in task.puzzles(12, sb.BUCKETS["medium"], EVAL_SEED)]
    assert len(set(shared) & {s for _, s in drawn["unsloth"]}) >= 6
    assert drawn["unsloth"] == list(task.puzzles(12, sb.BUCKETS["unsloth"], EVAL_SEED))  # offset 0


def test_eval_generation_shows_a_progress_bar_on_a_terminal(monkeypatch):
    import io

    from dgemma.sudoku import cli

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.delenv("TERM", raising=False)
    pairs = cli.bucket_pairs("medium", 5, seed=11)
    assert pairs == list(task.bucket_puzzles(5, "medium", 11))
    assert "medium: generating 5 puzzles" in err.getvalue() and "100%" in err.getvalue()  # rich's bar, filled


def test_eval_help_explains_every_option_and_its_default():
    text = _cli("eval", "--help").stdout
    blocks = {}
    for line in text.split("options:")[1].splitlines():
        if line.startswith("  -"):
            name = line.split()[0].rstrip(",")
            blocks[name] = line
        elif line.strip():
            blocks[name] += " " + line.strip()
    for option in ("-n", "--buckets", "--seed", "--skip", "--batch", "--no-ar", "--constrain", "--restarts",
                   "--restart-entropy", "--restart-after", "--parallel-attempts", "--json", "--model", "--device",
                   "--dtype"):
        assert "default" in blocks[option], blocks[option]
    assert "--constrain, --pin" in text and "diffusion-constrained" in blocks["--constrain"].replace("- ", "-")
    assert "(default 1000)" in blocks["-n"] and "spec-sampler" in blocks["--restarts"].replace("- ", "-")


def test_solve_takes_puzzle_arguments_files_and_stdin(trained, tmp_path, capsys):
    other = sb.format_board(sb.generate(40, random.Random(1))[0])
    (tmp_path / "in.txt").write_text(other + "\n")
    once = ("--model", str(trained), "--restarts", "1", "--max-steps", "4")
    mixed = _cli("solve", PUZZLE, str(tmp_path / "in.txt"), "-", *once, stdin=PUZZLE.replace("0", ".") + "\n")
    answers = mixed.stdout.splitlines()
    assert len(answers) == 3 and answers[0] == answers[2]  # each row is its solo run; '.' and '0' are blanks
    assert answers[1:2] == _cli("solve", str(tmp_path / "in.txt"), *once).stdout.splitlines()
    assert "answer 1 (argument 1)" in mixed.stderr and "answer 3 (<stdin>:1)" in mixed.stderr
    for bad in ("no-such-file.txt", PUZZLE[:-1], str(tmp_path)):  # read before the model loads
        rc, out, err = run_main(capsys, "sudoku", "solve", bad, *once)
        assert rc == 2 and out == "", bad
        assert err.count("\n") == 1 and "neither a file nor a puzzle" in err, err
        assert bad != PUZZLE[:-1] or "got 80 characters" in err


def test_solve_names_invalid_answers_and_exits_1():
    """A puzzle with two 1s in its first row has no solution: whatever the model answers breaks a rule or a
    clue. The embedded model solves the other one. Also checks --device / --dtype."""
    good = "300281450150030060280000003070012046043967502601058739000090000015000620000005970"
    clash = "11" + good[2:]
    proc = _cli("solve", good, clash, "--restarts", "0", "--device", "cpu", "--dtype", "float32")
    answers = [sb.parse(a) for a in proc.stdout.splitlines()]
    assert proc.returncode == 1 and len(answers) == 2
    assert sb.is_solution(answers[0], sb.parse(good)) and not sb.is_solution(answers[1], sb.parse(clash))
    err = proc.stderr.splitlines()
    named = [line for line in err if "is not a solution" in line]
    assert len(named) == 1 and named[0].startswith("dgemma: answer 2 (argument 2) is not a solution: ")
    assert "in row 1" in named[0] or "clue 1 at r1c" in named[0]
    assert err[-1] == "dgemma: 1 solved, 1 invalid"
    assert not any(line.startswith("solving") for line in err)  # the progress bar is for terminals only
    bad = _cli("solve", good, "--dtype", "int8")
    assert bad.returncode == 2 and "--dtype" in bad.stderr and "Traceback" not in bad.stderr
