"""The Sudoku clue constraint (``dgemma.sudoku.solve``: clues held, blanks limited to the digits 1-9,
``<eos>`` after the 81 cells) on every step of every restart, and its one-line error for a model that does
not write one token per cell."""

from __future__ import annotations

import pytest

from dgemma.sudoku import board as sb
from dgemma.sudoku import task
from test_sudoku import PUZZLE


@pytest.fixture(scope="module")
def scrambled():
    """The embedded model with random weights (seeded): it writes any of its 16 tokens anywhere."""
    import torch

    import dgemma
    from dgemma.embedded import default_model

    engine = dgemma.load(default_model(), dtype="float32")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in engine.model.parameters():
            w.copy_(torch.randn(w.shape, generator=g) * 0.5)
    return engine


def test_clue_constraint_holds_on_every_step_of_every_restart(scrambled):
    """Under ``clue_constraint`` every draft of a stream (each step of each of 3 attempts) has the clues'
    tokens at the clue cells, a digit 1-9 in every blank and <eos> after the 81 cells; free, the same random
    model writes other tokens there."""
    from dgemma.engine import CanvasUpdate, StepUpdate
    from dgemma.sudoku.solve import SOLVE_DEFAULTS, CellTokens, clue_constraint

    engine, board = scrambled, sb.parse(PUZZLE)
    cells = CellTokens(engine)
    assert cells.digits == [task.SPECIALS.__len__() + d for d in range(10)] and cells.eos == 1
    # no canvas settles (confidence threshold 0): each attempt runs to its 3-step cap, then restarts
    params = {**SOLVE_DEFAULTS, "max_denoising_steps": 3, "confidence_threshold": 0, "restarts": 2,
              "parallel_attempts": 1}

    def drafts(constraint):
        events = list(engine.stream(PUZZLE, constraint=constraint, **params))
        steps = [e for e in events if isinstance(e, StepUpdate)]
        done = [e for e in events if isinstance(e, CanvasUpdate) and e.completion is not None]
        assert [e.attempt for e in steps] == [0] * 3 + [1] * 3 + [2] * 3 and len(done) == 1
        return [e.draft_tokens for e in steps], done[0].completion

    held, completion = drafts(clue_constraint(engine, board))
    digits = set(cells.digits[1:])
    for draft in held:
        assert all(draft[i] == cells.digits[v] for i, v in enumerate(board) if v)
        assert all(draft[i] in digits for i, v in enumerate(board) if not v)
        assert draft[81] == cells.eos
    answer = task.answer_board(completion.text)
    assert all(a == p for a, p in zip(answer, board) if p) and 0 not in answer
    assert len(completion.token_ids) == 81 and set(completion.token_ids) <= digits
    free, _ = drafts(None)
    assert any(draft[i] not in digits for draft in free for i, v in enumerate(board) if not v)
    assert any(draft[i] != cells.digits[v] for draft in free for i, v in enumerate(board) if v)


def test_clue_constraint_needs_one_token_per_cell(scrambled, monkeypatch):
    from types import SimpleNamespace

    from dgemma.errors import DgemmaError
    from dgemma.sudoku.solve import CellTokens, clue_constraint

    rule = clue_constraint(scrambled, sb.parse(PUZZLE)).start(0, 5)  # any attempt of canvas 0 gets it
    assert rule is not None and int((rule.fixed >= 0).sum()) == sb.clues(sb.parse(PUZZLE)) + 1  # clues, <eos>
    assert int((rule.set_index == 0).sum()) == 81 - sb.clues(sb.parse(PUZZLE)) and rule.table.sum() == 9
    short = SimpleNamespace(tokenizer=scrambled.tokenizer, decode=scrambled.decode,
                            config=SimpleNamespace(canvas_length=64, vocab_size=16))
    with pytest.raises(DgemmaError, match="one token per cell"):
        CellTokens(short)
    monkeypatch.setattr(scrambled.tokenizer, "encode", lambda text: [4] * (len(text) // 2))  # 2 digits a token
    with pytest.raises(DgemmaError, match="one token per cell"):
        CellTokens(scrambled)
