"""A real tool call through ``dgemma serve``: a tiny checkpoint whose tokenizer has Gemma 4's tool markers as
special tokens and whose chat template declares the request's tools; the canvas is pinned to a whole call
then EOS, and the official openai client reads it back as ``tool_calls`` (whole and streamed)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
pytest.importorskip("openai")

import dgemma  # noqa: E402
from conftest import TINY, write_hf_checkpoint  # noqa: E402
from dgemma.server.tools import STRING_DELIM, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, format_declaration  # noqa: E402
from dgemma.tokenizer import GEMMA_LIKE_TEMPLATE, GEMMA_SPECIAL_TOKENS, Tokenizer, build_byte_tokenizer  # noqa: E402
from test_server import KEY, ServerProcess  # noqa: E402

# Gemma 4's tool markers at their real ids (spec section 7), beside the byte tokenizer's other specials.
TOOL_TOKENS = {"<|tool>": 46, "<tool|>": 47, TOOL_CALL_OPEN: 48, TOOL_CALL_CLOSE: 49, STRING_DELIM: 52}

# GEMMA_LIKE_TEMPLATE with Gemma 4's tool declarations in the leading system turn: one
# ``<|tool>declaration:NAME{description:...,parameters:{...}}<tool|>`` per tool (keys sorted, types upper-cased,
# strings between <|"|> delimiters: the shape ``format_declaration`` writes).
_VALUE_MACRO = r"""{%- macro fmt(v, key='') -%}
{%- if v is mapping -%}
{{- '{' -}}
{%- for k, x in v | dictsort(true) -%}{{- k + ':' + fmt(x, k) -}}{%- if not loop.last -%},{%- endif -%}{%- endfor -%}
{{- '}' -}}
{%- elif v is string -%}
{{- '<|"|>' + (v | upper if key == 'type' else v) + '<|"|>' -}}
{%- elif v is sequence -%}
{{- '[' -}}
{%- for x in v -%}{{- fmt(x, key) -}}{%- if not loop.last -%},{%- endif -%}{%- endfor -%}
{{- ']' -}}
{%- else -%}
{{- v | tojson -}}
{%- endif -%}
{%- endmacro -%}
"""
_DECLARATIONS = r"""{%- for t in (tools or []) -%}
{%- set f = t['function'] if 'function' in t else t -%}
{{- '<|tool>declaration:' + f['name'] + '{' -}}
{%- if f['description'] -%}
{{- 'description:' + fmt(f['description']) -}}{%- if f['parameters'] -%},{%- endif -%}
{%- endif -%}
{%- if f['parameters'] -%}{{- 'parameters:' + fmt(f['parameters']) -}}{%- endif -%}
{{- '}<tool|>' -}}
{%- endfor -%}"""
TOOLS_TEMPLATE = _VALUE_MACRO + GEMMA_LIKE_TEMPLATE.replace(
    "{%- if enable_thinking or first -%}", "{%- if enable_thinking or first or tools -%}").replace(
    "{%- if first -%}{{- messages[0]['content'] | trim -}}{%- endif -%}",
    "{%- if first -%}{{- messages[0]['content'] | trim -}}{%- endif -%}\n" + _DECLARATIONS)

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = f'{TOOL_CALL_OPEN}call:get_weather{{city:{STRING_DELIM}Paris{STRING_DELIM}}}{TOOL_CALL_CLOSE}'
MARKER_TEXT = ("<|tool", "tool|>", "tool_call", STRING_DELIM, "<|", "|>")


def write_tool_checkpoint(path: Path, canvas_length: int = 64, seed: int = 0) -> Path:
    """The tiny random checkpoint with a 64-token canvas and a byte tokenizer that has Gemma 4's tool markers
    as special tokens and a chat template that renders ``tools``."""
    raw = copy.deepcopy(TINY)
    raw["canvas_length"] = canvas_length
    write_hf_checkpoint(path, raw, seed=seed, vocab_tokenizer=False)
    vocab = raw["text_config"]["vocab_size"]
    config = {"bos_token": "<bos>", "eos_token": "<turn|>", "pad_token": "<pad>", "unk_token": "<unk>"}
    Tokenizer(build_byte_tokenizer(vocab, {**GEMMA_SPECIAL_TOKENS, **TOOL_TOKENS}), config,
              TOOLS_TEMPLATE).save(path, write_jinja=False)
    return path


@pytest.fixture(scope="module")
def tool_ckpt(tmp_path_factory):
    return write_tool_checkpoint(tmp_path_factory.mktemp("ckpt_tools"))


@pytest.fixture(scope="module")
def engine(tool_ckpt):
    return dgemma.load(tool_ckpt)


@pytest.fixture(scope="module")
def server(tool_ckpt, tmp_path_factory):
    s = ServerProcess(tool_ckpt, tmp_path_factory.mktemp("serve_tools") / "log.txt", "--api-key", KEY)
    yield s
    s.stop()


def _call_canvas(engine) -> list[int]:
    """The first canvas pinned to CALL (markers as their special ids, a token per byte between them), EOS,
    and free (-1) positions after it, which the EOS cuts off."""
    tok = engine.tokenizer
    ids: list[int] = []
    for part in (TOOL_CALL_OPEN, "call:get_weather{city:", STRING_DELIM, "Paris", STRING_DELIM, "}",
                 TOOL_CALL_CLOSE):
        ids += [tok.token_to_id(part)] if part in TOOL_TOKENS else tok.encode(part)
    assert tok.decode(ids, skip_special_tokens=False) == CALL
    ids.append(engine.defaults.eos_token_id[0])
    c = engine.config.canvas_length
    assert len(ids) <= c
    return ids + [-1] * (c - len(ids))


def test_checkpoint_has_tool_tokens_and_declares_tools(engine):
    tok = engine.tokenizer
    assert engine.config.canvas_length == 64
    for text, tid in TOOL_TOKENS.items():
        assert tok.token_to_id(text) == tid and tid in tok.special_ids
        assert tok.encode(text) == [tid]  # the marker text encodes as its one special token
    prompt = tok.apply_chat_template(USER, tools=TOOLS)
    declaration = format_declaration(TOOLS[0])
    assert declaration == ('<|tool>declaration:get_weather{description:<|"|>Current weather in a city<|"|>,'
                           'parameters:{properties:{city:{type:<|"|>STRING<|"|>}},required:[<|"|>city<|"|>],'
                           'type:<|"|>OBJECT<|"|>}}<tool|>')
    user = USER[0]["content"]
    assert prompt == f"<bos><|turn>system\n{declaration}<turn|>\n<|turn>user\n{user}<turn|>\n<|turn>model\n"
    ids = tok.encode_chat(USER, tools=TOOLS)
    assert ids.count(TOOL_TOKENS["<|tool>"]) == 1 and ids.count(TOOL_TOKENS["<tool|>"]) == 1
    assert "<|tool>" not in tok.apply_chat_template(USER)  # no tools: no declaration, no system turn
    assert engine.chat_ids(USER) == tok.encode_chat(USER)


def test_tool_call_through_the_openai_client(server, engine, tool_ckpt):
    client = server.client()
    kw = dict(model=tool_ckpt.name, messages=USER, tools=TOOLS, max_tokens=64, seed=3,
              extra_body={"pinned_canvas": _call_canvas(engine)})
    choice = client.chat.completions.create(**kw).choices[0]
    assert choice.finish_reason == "tool_calls"
    (tc,) = choice.message.tool_calls
    assert tc.type == "function" and tc.id.startswith("call_")
    assert tc.function.name == "get_weather" and json.loads(tc.function.arguments) == {"city": "Paris"}
    assert choice.message.content is None  # the call was the whole answer: no marker text is left over

    chunks = list(client.chat.completions.create(stream=True, **kw))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [t for d in deltas for t in (d.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].id.startswith("call_")
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments) == {"city": "Paris"}
    streamed = "".join(d.content or "" for d in deltas)
    assert not any(m in streamed for m in MARKER_TEXT), streamed
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == ["tool_calls"]

    # without tools, the same canvas is plain content (the markers kept as text, no tool_calls)
    plain = client.chat.completions.create(model=tool_ckpt.name, messages=USER, max_tokens=64, seed=3,
                                           extra_body={"pinned_canvas": _call_canvas(engine)}).choices[0]
    assert plain.finish_reason == "stop" and not plain.message.tool_calls and plain.message.content == CALL
