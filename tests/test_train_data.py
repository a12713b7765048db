"""Training data (dgemma/train/data.py): JSONL reading, example building, EOS fill, length policy,
the deterministic data stream and collation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dgemma.tokenizer import Tokenizer, write_test_tokenizer
from dgemma.train.data import (DataError, DataStats, DataStream, Example, ExampleBuilder, collate,
                               read_jsonl)

EOS = 106  # "<turn|>" in the byte test tokenizer
NL = 14  # "\n"
BLOCK = 8


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok")
    write_test_tokenizer(path, 300)
    t = Tokenizer.from_dir(path)
    assert t.eos_id == EOS and t.chat_template is not None
    return t


def write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines),
                    encoding="utf-8")
    return path


def chat(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def gen_prompt(tok: Tokenizer, context: list[dict]) -> list[int]:
    return tok.encode(tok.apply_chat_template(context, add_generation_prompt=True))


def contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i: i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def one(builder: ExampleBuilder, record: dict, stats: DataStats | None = None) -> Example | None:
    return builder.build(record, "mem:1", stats if stats is not None else DataStats())


# ------------------------------------------------------------------ reading files and bad records
def test_malformed_json_names_file_and_line(tok, tmp_path):
    path = write(tmp_path / "train.jsonl", [chat("a", "b"), "", "{not json"])
    with pytest.raises(DataError, match="not valid JSON") as info:
        ExampleBuilder(tok, BLOCK, 256).load(path)
    assert f"{path}:3:" in str(info.value) and "train.jsonl:3:" in str(info.value)


def test_non_object_line_names_file_and_line(tmp_path):
    path = write(tmp_path / "train.jsonl", [chat("a", "b"), [1, 2]])
    with pytest.raises(DataError, match="expected a JSON object") as info:
        list(read_jsonl(path))
    assert f"{path}:2:" in str(info.value)


def test_missing_file(tok, tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="not found") as info:
        ExampleBuilder(tok, BLOCK, 256).load(path)
    assert str(path) in str(info.value)


def test_blank_lines_are_skipped(tok, tmp_path):
    path = write(tmp_path / "train.jsonl", ["", chat("a", "b"), "   ", "\t", chat("c", "d"), ""])
    assert [n for n, _ in read_jsonl(path)] == [2, 5]
    stats = DataStats()
    assert len(ExampleBuilder(tok, BLOCK, 256).load(path, stats)) == 2
    assert stats.records == stats.kept == 2


def test_record_without_messages_or_prompt(tok, tmp_path):
    path = write(tmp_path / "train.jsonl", [chat("a", "b"), {"text": "x"}])
    with pytest.raises(DataError, match="'messages' list or 'prompt' and 'completion'") as info:
        ExampleBuilder(tok, BLOCK, 256).load(path)
    assert f"{path}:2:" in str(info.value)
    with pytest.raises(DataError, match="mem:1"):  # prompt without completion
        one(ExampleBuilder(tok, BLOCK, 256), {"prompt": "x"})


def test_last_message_must_be_assistant(tok, tmp_path):
    rec = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"}]}
    path = write(tmp_path / "train.jsonl", [rec])
    with pytest.raises(DataError, match="assistant") as info:
        ExampleBuilder(tok, BLOCK, 256).load(path)
    assert f"{path}:1:" in str(info.value) and "'user'" in str(info.value)
    for bad in ([], 5, [{"role": "user"}]):
        with pytest.raises(DataError, match="mem:1"):
            one(ExampleBuilder(tok, BLOCK, 256), {"messages": bad})


def test_invalid_options(tok, tmp_path):
    with pytest.raises(DataError, match="overlong"):
        ExampleBuilder(tok, BLOCK, 256, overlong="cut")
    with pytest.raises(DataError, match="template"):
        ExampleBuilder(tok, BLOCK, 256, template="jinja")
    write_test_tokenizer(tmp_path, 300, chat_template=None)
    plain = Tokenizer.from_dir(tmp_path)
    with pytest.raises(DataError, match="no chat template"):
        ExampleBuilder(plain, BLOCK, 256, template="chat")
    with pytest.raises(DataError, match="chat template"):  # auto -> raw; messages need a template
        one(ExampleBuilder(plain, BLOCK, 256), chat("hi", "yo"))


# ------------------------------------------------------------------ chat mode
def test_chat_example_layout(tok):
    ex = one(ExampleBuilder(tok, BLOCK, 256), chat("hi", "yo"))
    prompt = gen_prompt(tok, [{"role": "user", "content": "hi"}])
    assert ex.prefix_len == len(prompt) and list(ex.ids[: ex.prefix_len]) == prompt
    assert ex.block == BLOCK
    resp = list(ex.ids[ex.prefix_len:])
    yo = tok.encode("yo")
    assert resp[: len(yo)] == yo
    assert resp[len(yo)] == EOS  # the answer's closing <turn|>
    assert all(t == EOS for t in resp[len(yo):])  # then EOS fill
    assert NL not in resp  # the "\n" after the closing <turn|> is not supervised
    assert len(resp) % BLOCK == 0 and len(resp) == BLOCK and ex.n_blocks == 1


def test_prompt_completion_strings_use_chat_template(tok):
    b = ExampleBuilder(tok, BLOCK, 256)
    assert one(b, {"prompt": "hi", "completion": "yo"}) == one(b, chat("hi", "yo"))
    conv = {"prompt": [{"role": "user", "content": "hi"}],
            "completion": [{"role": "assistant", "content": "yo"}]}
    assert one(b, conv) == one(b, chat("hi", "yo"))


def test_raw_template(tok):
    ex = one(ExampleBuilder(tok, BLOCK, 256, template="raw"), {"prompt": "hi", "completion": "yo"})
    head = [tok.bos_id] + tok.encode("hi")
    assert ex.prefix_len == len(head)
    body = tok.encode("yo") + [EOS]
    assert list(ex.ids) == head + body + [EOS] * (BLOCK - len(body))
    assert (len(ex.ids) - ex.prefix_len) % BLOCK == 0


def test_multi_turn_context_is_prefix(tok):
    msgs = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
            {"role": "user", "content": "three"}, {"role": "assistant", "content": "four"}]
    ex = one(ExampleBuilder(tok, BLOCK, 256), {"messages": msgs})
    prompt = gen_prompt(tok, msgs[:-1])
    assert list(ex.ids[: ex.prefix_len]) == prompt
    assert contains(prompt, tok.encode("one")) and contains(prompt, tok.encode("two"))  # earlier turns
    assert contains(prompt, tok.encode("three")) and not contains(prompt, tok.encode("four"))
    assert not contains(list(ex.ids[ex.prefix_len:]), tok.encode("two"))  # ... are not supervised
    four = tok.encode("four")
    assert list(ex.ids[ex.prefix_len: ex.prefix_len + len(four) + 1]) == four + [EOS]
    assert (len(ex.ids) - ex.prefix_len) % BLOCK == 0


# ------------------------------------------------------------------ EOS fill
@pytest.mark.parametrize("template", ["auto", "raw"])
def test_fill_exact_block_and_one_more(tok, template):
    b = ExampleBuilder(tok, BLOCK, 256, template=template)
    exact = "abcdefg"  # 7 tokens + closing EOS = one block exactly
    assert len(tok.encode(exact)) == BLOCK - 1
    ex = one(b, {"prompt": "hi", "completion": exact})
    assert len(ex.ids) - ex.prefix_len == BLOCK and ex.n_blocks == 1
    assert list(ex.ids[ex.prefix_len:]) == tok.encode(exact) + [EOS]
    ex2 = one(b, {"prompt": "hi", "completion": exact + "h"})  # one token over -> two blocks
    resp = list(ex2.ids[ex2.prefix_len:])
    assert len(resp) == 2 * BLOCK and ex2.n_blocks == 2
    assert resp == tok.encode(exact + "h") + [EOS] * BLOCK


# ------------------------------------------------------------------ overlong examples
def test_overlong_skip_and_truncate(tok, tmp_path):
    prefix = len(gen_prompt(tok, [{"role": "user", "content": "hi"}]))
    long_rec, short_rec = chat("hi", "x" * 20), chat("hi", "ok")  # 3 blocks vs 1 block
    path = write(tmp_path / "train.jsonl", [long_rec, short_rec])
    max_length = prefix + 2 * BLOCK + 3

    stats = DataStats()
    kept = ExampleBuilder(tok, BLOCK, max_length, overlong="skip").load(path, stats)
    assert len(kept) == 1 and kept[0] == one(ExampleBuilder(tok, BLOCK, 256), short_rec)
    assert (stats.records, stats.kept, stats.skipped_overlong, stats.truncated) == (2, 1, 1, 0)
    assert stats.tokens == len(kept[0].ids) and "1 skipped" in stats.summary()

    stats = DataStats()
    kept = ExampleBuilder(tok, BLOCK, max_length, overlong="truncate").load(path, stats)
    assert len(kept) == 2 and (stats.skipped_overlong, stats.truncated, stats.kept) == (0, 1, 2)
    cut = kept[0]
    assert (len(cut.ids) - cut.prefix_len) % BLOCK == 0 and len(cut.ids) <= max_length
    assert cut.n_blocks == 2 and cut.prefix_len == prefix
    assert list(cut.ids[prefix:]) == tok.encode("x" * 2 * BLOCK)  # whole blocks of the answer only


@pytest.mark.parametrize("overlong", ["skip", "truncate"])
def test_prompt_leaving_no_room_is_skipped(tok, tmp_path, overlong):
    prefix = len(gen_prompt(tok, [{"role": "user", "content": "hi"}]))
    b = ExampleBuilder(tok, BLOCK, prefix + BLOCK - 1, overlong=overlong)
    stats = DataStats()
    assert one(b, chat("hi", "y"), stats) is None
    assert stats.skipped_overlong == 1 and stats.kept == 0 and stats.truncated == 0
    path = write(tmp_path / "train.jsonl", [chat("hi", "y"), chat("hi", "z")])
    with pytest.raises(DataError, match="no usable examples") as info:
        b.load(path)
    assert str(path) in str(info.value) and "2 skipped" in str(info.value)
    assert one(ExampleBuilder(tok, BLOCK, prefix + BLOCK, overlong=overlong), chat("hi", "y")) is not None


# ------------------------------------------------------------------ DataStream
def test_stream_deterministic_and_resumable():
    a, b = DataStream(7, seed=3), DataStream(7, seed=3)
    walk = [a.indices(s, 3) for s in range(10)]
    assert walk == [b.indices(s, 3) for s in range(10)]
    # random access (as after a resume) matches the uninterrupted walk, in any order
    for s in (9, 0, 5, 2):
        assert DataStream(7, seed=3).indices(s, 3) == walk[s]
        assert a.indices(s, 3) == walk[s]
    flat = [i for batch in walk for i in batch]
    assert flat[:21] == DataStream(7, 3).indices(0, 21)


def test_stream_epochs_are_permutations():
    n = 11
    s = DataStream(n, seed=0)
    epochs = [[s.indices(step, 1)[0] for step in range(e * n, (e + 1) * n)] for e in range(3)]
    for ep in epochs:
        assert sorted(ep) == list(range(n))
    assert epochs[0] != epochs[1]  # a fresh permutation each epoch
    batch = DataStream(n, seed=0).indices(0, n)  # one batch of size n is exactly epoch 0
    assert batch == epochs[0]


def test_stream_seeds_differ():
    n = 20
    first = {seed: DataStream(n, seed).indices(0, n) for seed in range(4)}
    assert len({tuple(v) for v in first.values()}) == 4
    for v in first.values():
        assert sorted(v) == list(range(n))


# ------------------------------------------------------------------ collate
def test_collate_right_pads():
    exs = [Example(ids=(5, 6, 7, 8, 9), prefix_len=2, block=3), Example(ids=(1, 2, 3), prefix_len=0, block=3)]
    batch = collate(exs, pad_id=0)
    assert batch.ids.dtype == torch.long and batch.ids.shape == (2, 5)
    assert batch.ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 0, 0]]
    assert batch.lengths.tolist() == [5, 3] and batch.prefix.tolist() == [2, 0]
    moved = batch.to("cpu")
    assert torch.equal(moved.ids, batch.ids)
    assert collate(exs[1:], pad_id=-1).ids.tolist() == [[1, 2, 3]]
    assert collate(exs[::-1], pad_id=7).ids[0].tolist() == [1, 2, 3, 7, 7]


def test_template_whose_answer_turn_does_not_extend_the_prompt(tmp_path):
    """A template that renders the generation prompt differently from a finished model turn (here: an
    empty thought channel only in the generation prompt): the answer content + EOS is supervised."""
    from dgemma.tokenizer import GEMMA_LIKE_TEMPLATE, Tokenizer, write_test_tokenizer

    write_test_tokenizer(tmp_path, 300)
    tok = Tokenizer.from_dir(tmp_path)
    tok.chat_template = GEMMA_LIKE_TEMPLATE.replace("'<|turn>model\\n'", "'<|turn>model\\n<|channel><channel|>'")
    builder = ExampleBuilder(tok, block=8, max_length=256)
    ex = builder.build({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                       "x:1", DataStats())
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text.endswith("<|channel><channel|>")  # the template really differs
    assert list(ex.ids[: ex.prefix_len]) == tok.encode(text)
    assert list(ex.ids[ex.prefix_len:]) == tok.encode("yo") + [106] * 6


def test_non_utf8_line_and_template_errors_name_file_and_line(tmp_path):
    from dgemma.tokenizer import Tokenizer, write_test_tokenizer

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "b"}\n')
    write_test_tokenizer(tmp_path / "tok", 300)
    tok = Tokenizer.from_dir(tmp_path / "tok")
    with pytest.raises(DataError, match=r"bad.jsonl:2: not UTF-8"):
        ExampleBuilder(tok, block=8, max_length=256).load(bad)
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(DataError, match=r"good.jsonl:1: .*roles must alternate"):
        ExampleBuilder(tok, block=8, max_length=256).load(good)


def test_unknown_tokens_are_counted_and_a_mostly_unknown_record_is_a_problem():
    from dgemma.sudoku.task import build_tokenizer

    builder = ExampleBuilder(build_tokenizer(), BLOCK, 64, template="raw")  # digits only
    stats = DataStats()
    for k in range(30):
        builder.build({"prompt": "123", "completion": "321"}, f"mem:{k + 1}", stats)
    assert (stats.text_tokens, stats.unknown) == (30 * 8, 0) and stats.unknown_problem() is None
    builder.build({"prompt": "abc", "completion": "cba"}, "mem:31", stats)
    # 31 records of <bos> + 3 + 3 + <eos>; the last one's 6 letters are unknown: 2.4% of the tokens, under
    # the 5% share, but that record is mostly unknown, so the data is still a problem.
    assert (stats.text_tokens, stats.unknown, stats.mostly_unknown, stats.first_unknown) == (248, 6, 1, "mem:31")
    problem = stats.unknown_problem()
    assert "2.4%" in problem and "1 of 31 records" in problem and "mem:31" in problem
    assert "6 unknown tokens (2.4%)" in stats.summary()
    one_unknown = DataStats()  # 1 unknown token of 24: 4.2%, under 5%, and no record mostly unknown: fine
    for k in range(3):
        builder.build({"prompt": "123", "completion": "32a" if k == 0 else "321"}, f"mem:{k + 1}", one_unknown)
    assert one_unknown.unknown == 1 and one_unknown.unknown_problem() is None
