"""Fixed answer positions in training: the data's "fixed" spans, never corrupted on the canvas."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from dgemma.loading import load_weights
from dgemma.sudoku import board as sb, task
from dgemma.tokenizer import byte_tokenizer
from dgemma.train.data import DataError, DataStats, Example, ExampleBuilder, collate
from dgemma.train.objective import Objective, ObjectiveConfig, draws


def _builder(tok, block=16, template="raw"):
    return ExampleBuilder(tok, block=block, max_length=4 * block, template=template)


def test_fixed_spans_select_the_tokens_wholly_inside_them():
    tok = byte_tokenizer()
    rec = {"prompt": "x", "completion": "aé bc", "fixed": [[1, 2], [3, 5]]}
    ex = _builder(tok).build(rec, "t:1", DataStats())
    # bytes: a, é (two byte tokens, both at characters 1-2), space, b, c, then EOS and fill
    assert ex.fixed == (1, 2, 4, 5)
    assert ex.ids[ex.prefix_len + 1: ex.prefix_len + 3] == tuple(tok.encode("é"))
    wide = _builder(tok).build({**rec, "fixed": [[0, 5]]}, "t:1", DataStats())
    assert wide.fixed == tuple(range(6))  # the whole answer, not its EOS
    assert _builder(tok).build({"prompt": "x", "completion": "ab"}, "t:1", DataStats()).fixed == ()


def test_sudoku_records_hold_their_clues():
    puzzle, solution = sb.generate(30, random.Random(5))
    rec = task.record(puzzle, solution, hold_clues=True)
    ex = _builder(task.build_tokenizer(), block=task.CANVAS, template="raw").build(rec, "t:1", DataStats())
    assert ex.fixed == tuple(i for i, v in enumerate(puzzle) if v) and len(ex.fixed) == 30
    assert "fixed" not in task.record(puzzle, solution)


@pytest.mark.parametrize("fixed", [[[2, 1]], [[0, 9]], [[0]], "0-1", [[0.0, 1]], [[-1, 1]], [[True, 1]]])
def test_bad_spans_are_one_line(fixed):
    with pytest.raises(DataError, match=r"^t:3: 'fixed' must be a list of \[start, end\] character spans"):
        _builder(byte_tokenizer()).build({"prompt": "x", "completion": "abc", "fixed": fixed}, "t:3", DataStats())


def test_spans_need_raw_text_pairs():
    rec = {"prompt": "x", "completion": "abc", "fixed": [[0, 1]]}
    with pytest.raises(DataError, match="need a prompt/completion pair of strings and data.template = 'raw'"):
        _builder(byte_tokenizer(), template="chat").build(rec, "t:1", DataStats())
    msgs = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}], "fixed": [[0, 1]]}
    with pytest.raises(DataError, match="need a prompt/completion pair"):
        _builder(byte_tokenizer(), template="auto").build(msgs, "t:1", DataStats())


def _example(prompt_len, n_blocks, c, vocab, seed, fixed=()):
    g = torch.Generator().manual_seed(seed)
    return Example(tuple(torch.randint(3, vocab, (prompt_len + n_blocks * c,), generator=g).tolist()),
                   prompt_len, c, fixed)


def test_draws_never_corrupt_a_fixed_position_and_are_otherwise_unchanged():
    c, cfg = 16, ObjectiveConfig(draws_per_example=2)
    free = _example(4, 3, c, 50, 1)
    held = dataclasses.replace(free, fixed=(0, 5, 17, 18, 47))  # blocks 0, 1 and 2
    for step in range(20):
        for a, b in zip(draws(free, 7, step, 3, 50, cfg), draws(held, 7, step, 3, 50, cfg)):
            assert (a.t, a.block, a.self_condition) == (b.t, b.block, b.self_condition)
            assert torch.equal(a.tokens, b.tokens) and a.fixed is None
            want = torch.zeros(c, dtype=torch.bool)
            want[[i - a.block * c for i in held.fixed if a.block * c <= i < (a.block + 1) * c]] = True
            assert torch.equal(b.fixed, want) and torch.equal(b.replace, a.replace & ~want)


@pytest.fixture(scope="module")
def model(ckpt_factory):
    return load_weights(ckpt_factory("tiny"), dtype=torch.float32)[0]


@torch.no_grad()
def test_the_canvas_shows_fixed_positions_clean(model, monkeypatch):
    """Under near-total noise, the decoder's input holds every fixed position at its clean token (the ids the
    graded pass embeds are captured) and corrupts the rest."""
    c, v = model.cfg.canvas_length, model.cfg.vocab_size
    ex = _example(5, 2, c, v, 1, fixed=tuple(range(0, 2 * c, 3)))
    cfg = ObjectiveConfig(eps=0.999, self_conditioning_p=0.0, encoder_loss_weight=0)
    (d,) = draws(ex, 3, 0, 0, v, cfg)
    seen = []
    embed = model.embed
    monkeypatch.setattr(model, "embed", lambda ids: seen.append(ids.clone()) or embed(ids))
    Objective(model, cfg).eval()(collate([ex], 0), [d])
    noisy = seen[-1][0]  # [C]: the graded pass's canvas
    clean = torch.tensor(ex.ids[5 + d.block * c: 5 + (d.block + 1) * c])
    lo = d.block * c
    assert (d.fixed.nonzero().flatten() + lo).tolist() == [i for i in ex.fixed if lo <= i < lo + c]
    assert torch.equal(noisy[d.fixed], clean[d.fixed])
    assert float((noisy[~d.fixed] != clean[~d.fixed]).float().mean()) > 0.8
