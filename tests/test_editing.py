"""Infill and in-line editing (``dgemma.editing``, ``Engine.infill`` / ``edit``, ``dgemma edit`` / ``infill``) on
the tiny random model (fp32, canvas 16, byte tokenizer with a Gemma-like chat template): the suffix held on
the gap's canvases in every step, gaps of exactly ``length`` tokens without specials over 1-3 canvases (one
that would leave its last canvas too little suffix starts after prefix tokens moved onto the first canvas), the
length chosen among candidates by the encoder's score, text outside the span byte-identical, the command line.
"""

from __future__ import annotations

import pytest
import torch

import dgemma
from dgemma import editing
from dgemma.cache import KVCache
from dgemma.engine import CanvasUpdate, StepUpdate

from conftest import run_main

KW = {"max_denoising_steps": 4, "confidence_threshold": 0.0}
TEXT = "Grüße, 世界! A naïve café ☕ at the end.\n"


@pytest.fixture(scope="module")
def path(ckpt_factory):
    return ckpt_factory("tiny")


@pytest.fixture(scope="module")
def engine(path):
    return dgemma.load(path, dtype=torch.float32)


def _collect():
    events: dict[int, list] = {}
    return events, lambda n, e: events.setdefault(n, []).append(e)


def _banned(engine) -> set[int]:
    tok, cfg = engine.tokenizer, engine.config
    return tok.special_ids | set(engine.params().eos_token_id) | {cfg.pad_token_id, cfg.bos_token_id}


def _assert_clean_gap(engine, ids, n):
    assert len(ids) == n
    assert not set(ids) & _banned(engine) and all(t < engine.tokenizer.vocab_size for t in ids)


def test_suffix_is_fixed_in_every_step_and_the_gap_is_exactly_length_tokens(engine):
    suffix = "! How are you today? Fine."
    ids = engine.tokenizer.encode(suffix)
    events, on_event = _collect()
    r = editing.infill(engine, "Hello, wor", suffix, 5, on_event=on_event, seed=3, **KW)
    c = engine.config.canvas_length
    _assert_clean_gap(engine, r.token_ids, 5)
    assert r.length == 5 and r.scores == {} and r.completion.token_ids[:5] == r.token_ids
    assert r.text == engine.decode(r.token_ids) and len(r.completion.token_ids) == c  # one canvas, no EOS stop
    assert r.completion.token_ids[5:] == ids[:c - 5]  # the suffix fills the rest of the gap's canvas
    steps = [e for e in events[5] if isinstance(e, StepUpdate)]
    assert [e.step for e in steps] == [1, 2, 3, 4] and {e.canvas for e in steps} == {0}
    for e in steps:  # held at every step, and the drafts' gap positions keep to the allowed set
        assert e.draft_tokens[5:] == ids[:c - 5]
        assert not set(e.draft_tokens[:5]) & _banned(engine)
    assert [type(e) for e in events[5]][-1] is CanvasUpdate and events[5][-1].completion is r.completion


@pytest.mark.parametrize("n, prefix, suffix, moved", [
    (40, "Once upon a time", "end.", 0), (20, "Once upon a time", "a suffix longer than the rest of its canvas", 0),
    (16, "Once upon a time", "boundary", 12), (32, "Once upon a time", "boundary", 12),
    (30, "Once upon a time", "ab", 15), (30, "Once", "ab", 4)])
def test_a_gap_over_several_canvases_denoises_only_its_own_canvases(engine, n, prefix, suffix, moved):
    # A gap that leaves its last canvas fewer than m = min(suffix + EOS, C // 4) positions after it (none when
    # it ends on a canvas boundary: 16, 32) starts after the prefix's last k tokens, fixed on the first canvas,
    # with k + n + m whole canvases (12 + 16 + 4 = 32; "ab" + EOS: 15 + 30 + 3 = 48), or fewer when the prefix
    # has fewer ("Once": 4 tokens, 4 + 30 leaves 14 positions)
    c = engine.config.canvas_length
    ids = engine.tokenizer.encode(suffix)
    prompt = engine.encode_prompt(prefix)
    eos = engine.params().eos_token_id[0]
    events, on_event = _collect()
    r = editing.infill(engine, prefix, suffix, n, on_event=on_event, seed=1, **KW)
    _assert_clean_gap(engine, r.token_ids, n)
    k = r.moved
    assert k == moved and r.completion.prompt_tokens == len(prompt) - k
    head = prompt[len(prompt) - k:]
    assert r.completion.token_ids[:k] == head and r.completion.token_ids[k:k + n] == r.token_ids
    last = (k + n - 1) // c  # the gap's last canvas; canvases of pure suffix never run
    assert sorted({e.canvas for e in events[n]}) == list(range(last + 1)) and len(r.completion.steps) == last + 1
    offset = k + n - last * c  # positions of the head and the gap on the last canvas
    held = (ids + [eos])[:c - offset]  # as much suffix as fits, EOS after it if it ends there
    assert len(held) >= min(len(ids) + 1, c // 4)  # the suffix always reaches the gap's last canvas
    assert engine.decode(r.token_ids) == r.text
    steps = [e for e in events[n] if isinstance(e, StepUpdate)]
    assert {e.step for e in steps if e.canvas == last} == {1, 2, 3, 4}
    for e in steps:  # the head and the suffix are held at every step; the gap keeps to the allowed set
        lo = k if e.canvas == 0 else 0
        hi = offset if e.canvas == last else c
        assert not set(e.draft_tokens[lo:hi]) & _banned(engine)
        if e.canvas == 0:
            assert e.draft_tokens[:k] == head
        if e.canvas == last:
            assert e.draft_tokens[offset:offset + len(held)] == held
    assert r.completion.token_ids[k + n:k + n + len(held)] == held


def test_shift_moves_prefix_tokens_only_when_the_gaps_last_canvas_needs_suffix_room():
    shift = editing.shift  # (length, context m, canvas C, movable prefix tokens) -> k
    lengths = (0, 1, 12, 13, 14, 15, 16, 17, 28, 32, 64)
    assert [shift(n, 4, 16, 99) for n in lengths] == [0, 0, 0, 15, 14, 13, 12, 0, 0, 12, 12]
    assert shift(16, 4, 16, 5) == 5 and shift(16, 4, 16, 0) == 0  # fewer movable tokens: as many as still leave m
    assert shift(14, 4, 16, 2) == 0  # 2 + 14 fills the canvas: moving them would leave no room, so none move
    assert shift(16, 0, 16, 99) == 0 and shift(16, 1, 16, 99) == 15 and shift(8, 1, 1, 99) == 0  # C = 1: never


def test_the_length_is_chosen_among_candidates_by_the_encoders_score(engine):
    prefix, suffix = "The cat sat on the ", " and then it slept."
    events, on_event = _collect()
    r = editing.infill(engine, prefix, suffix, [3, 6, 9, 17], on_event=on_event, seed=7, **KW)
    again = editing.infill(engine, prefix, suffix, [9, 3, 17, 6], seed=7, **KW)
    print("scores", r.scores, "chosen", r.length)
    assert sorted(events) == [3, 6, 9, 17] and all(isinstance(ev[-1], CanvasUpdate) for ev in events.values())
    assert set(r.scores) == {3, 6, 9, 17} and r.length == max(r.scores, key=r.scores.get)
    assert (again.length, again.scores, again.token_ids) == (r.length, r.scores, r.token_ids)  # reproducible
    assert len(set(r.scores.values())) > 1  # the candidates' gaps differ, so do their scores
    # each candidate is its own request with the same seed: the chosen one alone gives the same gap
    assert editing.infill(engine, prefix, suffix, r.length, seed=7, **KW).token_ids == r.token_ids
    # a score is the mean log-probability of the score window after prompt + gap (here the suffix's first
    # canvas of tokens; a shorter suffix would be followed by EOS), computed alone
    window = engine.tokenizer.encode(suffix)[:engine.config.canvas_length]
    prompt = engine.encode_prompt(prefix)

    def score(gap):
        seq = torch.tensor([prompt + gap + window])
        with torch.inference_mode():
            h = engine.model.encode(seq, KVCache(engine.config, 1, seq.shape[1]))
            logp = torch.log_softmax(engine.model.logits(h[0, len(prompt) + len(gap) - 1:-1]), -1)
        return logp.gather(-1, torch.tensor(window)[:, None]).mean().item()

    for n in (3, 17):
        gap = [e for e in events[n] if isinstance(e, CanvasUpdate)][-1].completion.token_ids[:n]
        assert r.scores[n] == pytest.approx(score(gap), abs=1e-4)
    short = editing.infill(engine, prefix, "ok.", [3, 17], seed=7, **KW)  # a short suffix: EOS ends the window
    seq = torch.tensor([engine.encode_prompt(prefix) + short.token_ids + engine.tokenizer.encode("ok.")
                        + [engine.params().eos_token_id[0]]])
    with torch.inference_mode():
        h = engine.model.encode(seq, KVCache(engine.config, 1, seq.shape[1]))
        logp = torch.log_softmax(engine.model.logits(h[0, -5:-1]), -1)  # the states that predict "ok." + EOS
    assert short.scores[short.length] == pytest.approx(logp.gather(-1, seq[0, -4:, None]).mean().item(), abs=1e-4)
    default = editing.infill(engine, prefix, suffix, seed=7, **KW)
    assert set(default.scores) == set(editing.INFILL_LENGTHS) and len(default.token_ids) == default.length
    # 32 tokens end on a canvas boundary, so its run starts after 12 of the prefix's tokens (12 + 32 + 4 = 48);
    # it is scored after the whole prompt all the same, as the others
    alone = editing.infill(engine, prefix, suffix, 32, seed=7, **KW)
    assert alone.moved == 12 and default.scores[32] == pytest.approx(score(alone.token_ids), abs=1e-4)


SPANS = [(0, 5), (len(TEXT) - 5, len(TEXT)), (7, 7), (0, len(TEXT)), (8, 14), (len(TEXT), len(TEXT))]


@pytest.mark.parametrize("instruction", [None, "Make it shout."])
@pytest.mark.parametrize("start, end", SPANS)
def test_edit_keeps_the_text_outside_the_span_byte_identical(engine, start, end, instruction):
    r = editing.rewrite(engine, TEXT, start, end, instruction, seed=2, **KW)
    out = editing.edit(engine, TEXT, start, end, instruction, seed=2, **KW)
    assert out == TEXT[:start] + r.text + TEXT[end:]
    assert out.encode()[:len(TEXT[:start].encode())] == TEXT[:start].encode()
    assert out.encode().endswith(TEXT[end:].encode())
    _assert_clean_gap(engine, r.token_ids, r.length)
    n = len(engine.tokenizer.encode(TEXT[start:end]))
    expect = {max(1, round(n * s)) for s in editing.EDIT_SCALES} if n else set(editing.INFILL_LENGTHS)
    assert set(r.scores) == expect  # the default candidates sit around the span's token length
    prefix_ids = engine.tokenizer.encode(TEXT[:start])
    k = r.moved  # the prefix's last tokens that start the first canvas instead of ending the prompt
    assert 0 <= k <= len(prefix_ids) and r.completion.token_ids[:k] == prefix_ids[len(prefix_ids) - k:]
    if instruction is None:
        assert r.completion.prompt_tokens + k == 1 + len(prefix_ids)  # BOS + the prefix
    else:  # the chat prompt (the instruction, the text with the span marked), then the answer's prefix
        marked = f"{TEXT[:start]}{editing.MARK_OPEN}{TEXT[start:end]}{editing.MARK_CLOSE}{TEXT[end:]}"
        chat = engine.chat_ids([{"role": "user", "content": editing.EDIT_REQUEST.format(
            instruction=instruction, open=editing.MARK_OPEN, close=editing.MARK_CLOSE, marked=marked)}])
        assert r.completion.prompt_tokens + k == len(chat) + len(prefix_ids)
        assert engine.decode(chat, skip_special_tokens=False).endswith("<|turn>model\n")
        turn = engine.tokenizer.token_to_id("<turn|>")
        suffix = engine.tokenizer.encode(TEXT[end:])
        c, g = engine.config.canvas_length, k + r.length
        room = c - (g - (g - 1) // c * c)
        if len(suffix) < room:  # the answer's end after the suffix is the turn marker
            assert r.completion.token_ids[g + len(suffix)] == turn


@pytest.mark.parametrize("instruction", [None, "Make it shout."])
def test_gaps_of_whole_canvases_come_back_exact_with_the_text_around_them_byte_identical(engine, instruction):
    c = engine.config.canvas_length
    for start, end in [(8, 14), (len(TEXT) - 5, len(TEXT)), (len(TEXT), len(TEXT)), (0, 5)]:
        for length in (c, 2 * c, [c, 2 * c]):
            r = editing.rewrite(engine, TEXT, start, end, instruction, length=length, seed=2, **KW)
            out = editing.edit(engine, TEXT, start, end, instruction, length=length, seed=2, **KW)
            assert out == TEXT[:start] + r.text + TEXT[end:] and r.length in (c, 2 * c)
            _assert_clean_gap(engine, r.token_ids, r.length)
            assert r.text == engine.decode(r.token_ids)  # the moved prefix tokens are not part of the gap
            # the suffix (or the end token after it) always has room on the gap's last canvas, by moving as
            # many prefix tokens as there are; at the start of the text none can move (the prompt keeps BOS)
            assert r.moved == (0 if start == 0 else c - c // 4 if start < len(TEXT) - 5 else c - 1)


def test_engine_methods_and_explicit_lengths(engine):
    assert engine.edit(TEXT, 3, 9, length=4, seed=5, **KW) == editing.edit(engine, TEXT, 3, 9, length=4, seed=5, **KW)
    r = engine.infill("ab", "cd", 4, seed=5, **KW)
    assert isinstance(r, editing.Infill)
    assert r.token_ids == editing.infill(engine, "ab", "cd", 4, seed=5, **KW).token_ids
    deleted = editing.rewrite(engine, TEXT, 3, 9, length=0, **KW)  # length 0 deletes the span, nothing runs
    assert (deleted.text, deleted.completion) == ("", None)
    assert engine.edit(TEXT, 3, 9, length=0) == TEXT[:3] + TEXT[9:]


@pytest.mark.parametrize("start, end, message", [
    (-1, 3, "out of range"), (3, 1, "reversed"), (0, len(TEXT) + 1, "out of range"), (1.0, 2, "integer"),
    (True, 2, "integer"), (0, None, "integer")])
def test_bad_spans_are_value_errors(engine, start, end, message):
    with pytest.raises(ValueError, match=message):
        engine.edit(TEXT, start, end)


def test_bad_requests_are_value_errors(engine):
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.infill("a", "b", 4, max_new_tokens=8)
    with pytest.raises(ValueError, match="length"):
        engine.infill("a", "b", [4, -1])
    with pytest.raises(ValueError, match="needs a suffix"):  # nothing to score the candidates by
        engine.infill("a", "", [2, 4], eos_token_id=())
    with pytest.raises(ValueError, match="instruction is empty"):
        engine.edit(TEXT, 1, 2, "  ")

    def stop(n, event):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # interrupted while watching: no candidate stays on the core
        engine.infill("a", "b", [2, 4, 6], on_event=stop, **KW)
    assert engine.core.num_running == 0 and engine.core.num_waiting == 0
    assert engine.infill("a", "b", 3, seed=1, **KW).length == 3


ARGS = ["--max-denoising-steps", "4", "--confidence-threshold", "0", "--seed", "4", "--dtype", "float32"]


def test_cli_edit_and_infill_print_what_the_api_gives(engine, path, tmp_path, capsys):
    f = tmp_path / "note.txt"
    f.write_bytes(TEXT.replace("\n", "\r\n").encode())  # CRLF stays as it is
    text = f.read_bytes().decode()
    rc, out, err = run_main(capsys, "edit", str(f), "--span", "3:9", "--model", str(path), *ARGS)
    assert rc == 0 and out == editing.edit(engine, text, 3, 9, seed=4, **KW) and out.endswith("\r\n")
    rc, out, _ = run_main(capsys, "edit", str(f), "--span", ":4", "--length", "6", "--instruction", "Shout.",
                       "--model", str(path), *ARGS)
    assert rc == 0 and out == editing.edit(engine, text, 0, 4, "Shout.", length=6, seed=4, **KW)
    rc, out, _ = run_main(capsys, "edit", str(f), "--span", "5:", "--length", "3", "--write", "--model", str(path), *ARGS)
    assert rc == 0 and out == "" and f.read_bytes().decode() == editing.edit(engine, text, 5, len(text), length=3,
                                                                               seed=4, **KW)
    rc, out, _ = run_main(capsys, "infill", "--prefix", "ab", "--suffix", "yz", "--length", "2,5", "--model", str(path),
                       *ARGS)
    gap = editing.infill(engine, "ab", "yz", [2, 5], seed=4, **KW)
    assert rc == 0 and out == gap.text + "\n"
    rc, out, _ = run_main(capsys, "infill", "--prefix", "ab", "--suffix", "yz", "--length", "2,5", "--full",
                       "--model", str(path), *ARGS)
    assert out == "ab" + gap.text + "yz\n"


def test_cli_draws_every_candidate_on_a_terminal_stderr(path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    rc, out, err = run_main(capsys, "infill", "--prefix", "ab", "--suffix", "yz", "--length", "2,5", "--model",
                         str(path), *ARGS)
    assert rc == 0 and "\x1b" not in out
    assert "gap of 2 tokens" in err and "gap of 5 tokens" in err and "canvas 1  step 4/4" in err
    rc, _, err = run_main(capsys, "infill", "--prefix", "ab", "--suffix", "yz", "--plain", "--model", str(path), *ARGS)
    assert rc == 0 and "gap of" not in err


def test_cli_user_mistakes_are_one_line_and_exit_2(path, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    ok = tmp_path / "ok.txt"
    ok.write_text("hello")
    cases = [(["edit", str(tmp_path / "missing.txt"), "--span", "0:1"], "no such file"),
             (["edit", str(bad), "--span", "0:1"], "not UTF-8"),
             (["edit", str(tmp_path), "--span", "0:1"], "directory"),
             (["edit", str(ok), "--span", "1-3"], "--span must be START:END"),
             (["edit", str(ok), "--span", "4:2"], "reversed"),
             (["edit", str(ok), "--span", "0:9"], "out of range"),
             (["infill", "--prefix", "a", "--suffix", "b", "--max-new-tokens", "8", "--model", str(path)],
              "max_new_tokens"),
             (["edit", str(ok), "--span", "0:2", "--instruction", "x"], "no chat template")]  # the Sudoku model
    for argv, message in cases:
        rc, out, err = run_main(capsys, *argv)
        assert rc == 2 and out == "", argv
        assert len(err.strip().splitlines()) == 1 and err.startswith("dgemma: ") and message in err, err
