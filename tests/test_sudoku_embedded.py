"""The model shipped in the package (``dgemma/models/sudoku``): found offline, its sampling defaults,
its dtype, and what it solves."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dgemma.sudoku import board as sb
from dgemma.sudoku import task

from test_sudoku import ROOT, _cli


def test_default_model_is_the_embedded_checkpoint_or_a_clear_error(tmp_path, monkeypatch):
    import dgemma.embedded as emb
    from dgemma.errors import LoadError

    monkeypatch.setattr(emb, "SUDOKU", tmp_path / "none")
    with pytest.raises(LoadError, match="--model"):
        emb.default_model()
    (tmp_path / "ship").mkdir()
    (tmp_path / "ship" / "config.json").write_text("{}")
    monkeypatch.setattr(emb, "SUDOKU", tmp_path / "ship")
    assert emb.default_model() == tmp_path / "ship"


def test_embedded_generation_config_holds_the_solve_defaults():
    """`dgemma generate` on the embedded model samples as `dgemma sudoku solve` does (restarts included)."""
    from dgemma.embedded import default_model
    from dgemma.loading import read_generation_config
    from dgemma.params import SamplingParams
    from dgemma.sudoku.solve import SOLVE_DEFAULTS

    gen = read_generation_config(default_model())  # generation_config.json + dgemma_generation.json
    params = SamplingParams.from_generation_config(gen)  # (takes no seed from a file: a seed is per call)
    assert {k: getattr(params, k) for k in SOLVE_DEFAULTS if k != "seed"} == \
        {k: v for k, v in SOLVE_DEFAULTS.items() if k != "seed"}
    assert gen["seed"] == SOLVE_DEFAULTS["seed"]


EMBEDDED_MIN_EXACT = 20  # of 24; measured 24 with the solve defaults (20 with no restarts)


def test_embedded_model_is_stored_and_loaded_in_fp32():
    """Its figures are fp32 ones, and fp32 is its fast dtype on every CPU (a 2M-parameter model is bound by
    per-op overhead; bf16 steps were 1.5x slower on a CPU with AMX): the checkpoint says float32, so the loader
    keeps it on machines with bf16 hardware too."""
    import torch
    from safetensors import safe_open

    import dgemma
    from dgemma.embedded import default_model

    with safe_open(default_model() / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    assert json.loads((default_model() / "config.json").read_text())["dtype"] == "float32"
    engine = dgemma.load(default_model())
    assert {p.dtype for p in engine.model.parameters()} == {torch.float32}


def test_embedded_model_solves_fixed_puzzles():
    """The model that ships in the package loads offline and solves most of a fixed set of 36-46-clue
    puzzles (its 1,000-puzzle figures are in its card), never changing a clue."""
    import dgemma
    from dgemma.embedded import default_model
    from dgemma.sudoku.solve import solve_boards

    engine = dgemma.load(default_model())
    pairs = list(task.puzzles(24, sb.BUCKETS["unsloth"], seed=2024))
    answers = solve_boards(engine, [p for p, _ in pairs])
    exact = sum(a == s for (_, s), (a, _) in zip(pairs, answers))
    assert exact >= EMBEDDED_MIN_EXACT, exact
    assert all(a[i] == p[i] for (p, _), (a, _) in zip(pairs, answers) for i in range(81) if p[i])
    held = solve_boards(engine, [p for p, _ in pairs[:8]], constrain=True)  # clues held by the constraint
    assert all(a[i] == p[i] for (p, _), (a, _) in zip(pairs, held) for i in range(81) if p[i])
    assert sum(a == s for (_, s), (a, _) in zip(pairs, held)) >= 6


def test_commands_use_the_embedded_model_without_model_option():
    puzzle = sb.format_board(next(iter(task.puzzles(1, (44, 44), seed=5)))[0])
    solved = _cli("solve", "-", stdin=puzzle + "\n")
    assert solved.returncode == 0, solved.stderr
    answer = sb.parse(solved.stdout.strip())
    assert sb.is_solution(answer, sb.parse(puzzle))  # a 44-clue puzzle: the embedded model solves it
    gen = subprocess.run([sys.executable, "-m", "dgemma", "generate", puzzle], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert gen.returncode == 0 and len(gen.stdout.strip()) == 81 and gen.stdout.strip().isdigit()
