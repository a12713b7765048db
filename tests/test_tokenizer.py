"""Tests for dgemma.tokenizer: byte tokenizer, file round trips, chat template, split_thinking."""
import json

import pytest

from dgemma.tokenizer import (GEMMA_LIKE_TEMPLATE, GEMMA_SPECIAL_TOKENS, ChatTemplateError,
                              Tokenizer, build_byte_tokenizer, split_thinking,
                              write_test_tokenizer)

VOCAB = 320
STRINGS = ["", "hello world", "line1\nline2\n\n", "  leading and trailing  ", "tab\there",
           "héllo wörld", "日本語テキスト", "emoji 😀👍🏽 family 👨‍👩‍👧", "\x00\x01\x7f\xff",
           "<not a special> <|almost>"]

CONVO = [{"role": "user", "content": "Hi there"},
         {"role": "assistant", "content": "Hello! How can I help?"},
         {"role": "user", "content": "What is 2+2?"}]


@pytest.fixture
def tok_dir(tmp_path):
    write_test_tokenizer(tmp_path, VOCAB)
    return tmp_path


@pytest.fixture
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


# ---- byte tokenizer --------------------------------------------------------------
@pytest.mark.parametrize("text", STRINGS)
def test_byte_round_trip(text):
    t = build_byte_tokenizer(VOCAB)
    ids = t.encode(text, add_special_tokens=False).ids
    assert len(ids) == len(text.encode("utf-8"))
    assert t.decode(ids, skip_special_tokens=False) == text
    assert t.decode(ids) == text


def test_special_ids_and_layout():
    t = build_byte_tokenizer(VOCAB)
    assert t.get_vocab_size() == VOCAB
    for name, i in GEMMA_SPECIAL_TOKENS.items():
        assert t.token_to_id(name) == i and t.id_to_token(i) == name
    # bytes fill the free ids in ascending order: byte 0 -> id 4, byte 0x7f after skipping 50,51,98
    free = [i for i in range(VOCAB) if i not in GEMMA_SPECIAL_TOKENS.values()]
    assert [t.encode(bytes([b]).decode("latin-1"), add_special_tokens=False).ids
            for b in (0, 65)] == [[free[0]], [free[65]]]
    assert t.id_to_token(VOCAB - 1) == f"<unused_{VOCAB - 1}>"
    assert t.id_to_token(free[256]) == f"<unused_{free[256]}>"
    added = t.get_added_tokens_decoder()
    assert all(added[i].special for i in GEMMA_SPECIAL_TOKENS.values())


def test_specials_encoded_decoded_and_skipped():
    t = build_byte_tokenizer(VOCAB)
    text = "<bos><|turn>user\nhi<turn|><|channel>thought\nx<channel|>ok<eos>"
    ids = t.encode(text, add_special_tokens=False).ids
    assert ids[:2] == [2, 105] and ids[-1] == 1
    assert {106, 100, 101} <= set(ids)
    assert t.decode(ids, skip_special_tokens=False) == text
    assert t.decode(ids, skip_special_tokens=True) == "user\nhithought\nxok"


def test_exact_minimum_vocab_and_custom_specials():
    n = len(GEMMA_SPECIAL_TOKENS) + 256
    t = build_byte_tokenizer(n)
    assert t.get_vocab_size() == n and t.decode(t.encode("abc😀").ids) == "abc😀"
    t2 = build_byte_tokenizer(300, {"<pad>": 0, "<mask>": 299})
    assert t2.token_to_id("<mask>") == 299 and t2.token_to_id("<eos>") is None
    assert t2.encode("a", add_special_tokens=False).ids == [ord("a") + 1]


@pytest.mark.parametrize("vocab,specials", [
    (len(GEMMA_SPECIAL_TOKENS) + 255, None),   # too small
    (100, {"<pad>": 0}),                        # too small for bytes
    (400, {"<a>": 5, "<b>": 5}),                # ids collide
    (300, {"<pad>": 0, "<x>": 300}),            # id out of range
    (300, {"a": 0}),                            # name clashes with a byte symbol
])
def test_bad_vocab_raises(vocab, specials):
    with pytest.raises(ValueError):
        build_byte_tokenizer(vocab, specials)


# ---- Tokenizer wrapper and files -------------------------------------------------------
def test_wrapper_basics(tok):
    assert tok.vocab_size == VOCAB
    assert tok.bos_token == "<bos>" and tok.eos_token == "<turn|>" and tok.pad_token == "<pad>"
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 106, 0)
    assert tok.stop_ids == {1, 106}
    assert set(GEMMA_SPECIAL_TOKENS.values()) <= tok.special_ids
    assert tok.token_to_id("<|think|>") == 98 and tok.token_to_id("nope!") is None
    assert tok.encode("hi")[0] != 2  # no automatic <bos>
    ids = tok.encode("<|turn>x😀")
    assert tok.decode(ids) == "x😀" and tok.decode(ids, skip_special_tokens=False) == "<|turn>x😀"


def test_bos_eos_fallback_without_config(tmp_path):
    (tmp_path / "tokenizer.json").write_text(build_byte_tokenizer(VOCAB).to_str())
    t = Tokenizer.from_dir(tmp_path)
    assert (t.bos_token, t.eos_token, t.chat_template) == ("<bos>", "<eos>", None)
    t2 = Tokenizer(build_byte_tokenizer(300, {"<pad>": 0}))
    assert t2.bos_token is None and t2.eos_token is None


def test_bos_token_as_dict(tmp_path):
    write_test_tokenizer(tmp_path, VOCAB)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["bos_token"] = {"content": "<bos>", "lstrip": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer.from_dir(tmp_path).bos_token == "<bos>"


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_template_sources(tmp_path, tok_dir):
    assert Tokenizer.from_dir(tok_dir).chat_template == GEMMA_LIKE_TEMPLATE
    assert not (tok_dir / "chat_template.jinja").exists()
    # chat_template.jinja wins over tokenizer_config
    (tok_dir / "chat_template.jinja").write_text("JINJA{{ messages|length }}")
    assert Tokenizer.from_dir(tok_dir).apply_chat_template(CONVO) == "JINJA3"
    # list-form template in tokenizer_config
    d = tmp_path / "listform"
    write_test_tokenizer(d, VOCAB, chat_template=None)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert "chat_template" not in cfg
    cfg["chat_template"] = [{"name": "tool_use", "template": "TOOLS"},
                            {"name": "default", "template": "DEFAULT"}]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer.from_dir(d).chat_template == "DEFAULT"


def test_save_round_trip(tok, tmp_path):
    out = tmp_path / "saved" / "nested"
    tok.save(out)
    assert sorted(p.name for p in out.iterdir()) == [
        "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    assert (out / "chat_template.jinja").read_text() == GEMMA_LIKE_TEMPLATE
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == GEMMA_LIKE_TEMPLATE
    t2 = Tokenizer.from_dir(out)
    for s in STRINGS:
        assert t2.encode(s) == tok.encode(s)
    assert t2.apply_chat_template(CONVO) == tok.apply_chat_template(CONVO)
    assert (t2.bos_token, t2.eos_token, t2.vocab_size) == (tok.bos_token, tok.eos_token, VOCAB)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_transformers_loads_same_ids(tok_dir, tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    for s in STRINGS + ["<|turn>user\nhé 😀<turn|>"]:
        assert hf(s, add_special_tokens=False)["input_ids"] == tok.encode(s)
        assert hf.decode(tok.encode(s)) == tok.decode(tok.encode(s), skip_special_tokens=False)


# ---- chat template ----------------------------------------------------------------------
def test_chat_two_turns_exact(tok):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "model", "content": "Hello!"}]
    assert tok.apply_chat_template(msgs) == (
        "<bos><|turn>user\nHi<turn|>\n<|turn>model\nHello!<turn|>\n<|turn>model\n")
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == (
        "<bos><|turn>user\nHi<turn|>\n<|turn>model\nHello!<turn|>\n")
    assert tok.apply_chat_template(msgs, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi<turn|>\n"
        "<|turn>model\nHello!<turn|>\n<|turn>model\n")


def test_chat_system_and_thinking(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs) == (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n")
    assert tok.apply_chat_template(msgs, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n")


def test_assistant_mapped_and_thinking_stripped(tok):
    msgs = [{"role": "user", "content": "Q"},
            {"role": "assistant", "content": "<|channel>thought\nhmm<channel|>A"},
            {"role": "user", "content": [{"type": "text", "text": "Q"}, {"type": "text", "text": "2"}]}]
    out = tok.apply_chat_template(msgs)
    assert out == ("<bos><|turn>user\nQ<turn|>\n<|turn>model\nA<turn|>\n"
                   "<|turn>user\nQ2<turn|>\n<|turn>model\n")
    assert "assistant" not in out
    ids = tok.encode_chat(msgs)
    assert ids == tok.encode(out) and ids[:2] == [2, 105]
    think_ids = tok.encode_chat(msgs, enable_thinking=True)
    assert think_ids == tok.encode(tok.apply_chat_template(msgs, enable_thinking=True))
    assert 98 in think_ids and 98 not in ids


@pytest.mark.parametrize("msgs,index", [
    ([{"role": "user", "content": "ok"}, "not a dict"], 1),
    ([{"role": "user"}], 0),
    ([{"role": "user", "content": "ok"}, {"role": 3, "content": "x"}], 1),
    ([{"content": "x"}], 0),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
      {"role": "user", "content": [{"type": "image", "url": "x"}]}], 2),
])
def test_bad_messages(tok, msgs, index):
    with pytest.raises(ValueError, match=f"message {index}"):
        tok.apply_chat_template(msgs)


def test_messages_not_list(tok):
    with pytest.raises(ValueError):
        tok.apply_chat_template({"role": "user", "content": "x"})


def test_missing_template(tmp_path):
    write_test_tokenizer(tmp_path, VOCAB, chat_template=None)
    t = Tokenizer.from_dir(tmp_path)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        t.apply_chat_template(CONVO)
    assert issubclass(ChatTemplateError, ValueError)


def test_template_helpers(tok):
    tok.chat_template = ("{{ {'a': '<b>&'} | tojson }}|{{ greeting }}|{{ strftime_now('%Y') | length }}"
                         "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                         "|{{ m.role }}{% endfor %}")
    assert tok.apply_chat_template(CONVO, greeting="hey") == '{"a": "<b>&"}|hey|4|user'
    tok.chat_template = "{{ raise_exception('nope') }}"
    with pytest.raises(ChatTemplateError, match="nope"):
        tok.apply_chat_template(CONVO)


# ---- split_thinking ------------------------------------------------------------------
def test_split_thinking_complete():
    text = "<|channel>thought\nLet me think.\nStep 2.<channel|>The answer is 4.<turn|><eos><pad><pad>"
    assert split_thinking(text) == ("Let me think.\nStep 2.", "The answer is 4.")
    assert split_thinking("<|channel>thought Short<channel|> A ") == ("Short", "A")
    assert split_thinking("<|channel>thought<channel|>A") == ("", "A")  # empty block: "" not None
    assert split_thinking("<|channel>thoughtful idea<channel|>A") == ("thoughtful idea", "A")


def test_split_thinking_missing():
    assert split_thinking("Just the answer.<turn|><eos>") == (None, "Just the answer.")
    assert split_thinking("<bos><|turn>model\n  hi <turn|>") == (None, "model\n  hi")
    assert split_thinking("") == (None, "")


def test_split_thinking_unterminated():
    assert split_thinking("<|channel>thought\nI was thinking and got cut") == (
        "I was thinking and got cut", "")
    assert split_thinking("<|channel>thought\nstill going<pad><pad>") == ("still going", "")


def test_split_thinking_custom_markers():
    text = "<|channel>thought\nx<channel|>ans[END]<eos>"
    assert split_thinking(text, special_tokens=["[END]"]) == ("x", "ans<eos>")


def test_decode_then_split(tok):
    ids = tok.encode("<|channel>thought\nplan 😀<channel|>result<turn|>")
    assert split_thinking(tok.decode(ids, skip_special_tokens=False)) == ("plan 😀", "result")
