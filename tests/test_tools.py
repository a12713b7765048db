"""Gemma 4 tool-call syntax -> OpenAI tool_calls: one-shot parse, streaming split, formatting round-trips."""

from __future__ import annotations

import json
import random

import pytest

from dgemma.server.tools import (STRING_DELIM as Q, TOOL_CALL_CLOSE as CLOSE, TOOL_CALL_OPEN as OPEN,
                                 ToolCallStream, format_call, format_declaration, format_value,
                                 openai_tool_calls, parse_call, parse_tool_calls)


def _args(call: dict) -> dict:
    return json.loads(call["arguments"])


def test_the_spec_example():
    text = f"{OPEN}call:get_weather{{city:{Q}Paris{Q},days:3}}{CLOSE}"
    content, calls = parse_tool_calls(text)
    assert content == ""
    assert calls == [{"name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 3})}]


def test_content_around_calls_is_kept_and_stripped():
    text = (f"  Let me check.\n{OPEN}call:a{{x:1}}{CLOSE}\n and {OPEN}call:b.c-d{{}}{CLOSE} done. \n")
    content, calls = parse_tool_calls(text)
    assert content == "Let me check.\n\n and  done."
    assert [c["name"] for c in calls] == ["a", "b.c-d"]
    assert _args(calls[0]) == {"x": 1} and _args(calls[1]) == {}


def test_value_kinds_and_nesting():
    body = (f"call:f{{s:{Q}x{Q}, i:-12, f:2.5, e:1e+3, t:true, n:null, no:false,"
            f" o:{{inner:{{deep:[1,{Q}two{Q},[],{{}}]}}}}, l:[ {{a:1}} , [null, true] ],}}")
    call = parse_call(body)
    assert call is not None
    assert _args(call) == {"s": "x", "i": -12, "f": 2.5, "e": 1000.0, "t": True, "n": None, "no": False,
                           "o": {"inner": {"deep": [1, "two", [], {}]}}, "l": [{"a": 1}, [None, True]]}
    assert isinstance(_args(call)["i"], int) and isinstance(_args(call)["e"], float)


def test_strings_need_no_escapes_and_come_out_as_valid_json():
    tricky = 'He said "hi" {not: an, object} [x] \\ back\\slash\nnew line, colon: ünïcödé 🙂 </script>'
    call = parse_call(f"call:say{{text:{Q}{tricky}{Q}}}")
    assert _args(call) == {"text": tricky}
    # quoted keys (either delimiter) and JSON strings with escapes are read too
    call = parse_call(f'call:k{{{Q}odd key{Q}:1,"j s":"a\\"b\\u00e9",v:{Q}{Q}}}')
    assert _args(call) == {"odd key": 1, "j s": 'a"b\u00e9', "v": ""}


@pytest.mark.parametrize("block", [
    f"{OPEN}call:f{{x:{Q}unterminated}}{CLOSE}",
    f"{OPEN}call:f{{x:bare}}{CLOSE}",            # a string without delimiters
    f"{OPEN}call:f{{x:1 y:2}}{CLOSE}",           # a missing comma
    f"{OPEN}call:f{{x:1}} trailing{CLOSE}",
    f"{OPEN}call:f{CLOSE}",
    f"{OPEN}f{{x:1}}{CLOSE}",                   # no "call:"
    f"{OPEN}call:{{x:1}}{CLOSE}",               # no name
    f"{OPEN}call:f{{x:[1,2}}{CLOSE}",
    f"{OPEN}call:f{{x:01}}{CLOSE}",
    f"{OPEN}call:f{{x:truex}}{CLOSE}",
    f'{OPEN}call:f{{x:"bad \\q"}}{CLOSE}',
    f"{OPEN}call:f{{x:{'[' * 200}{']' * 200}}}{CLOSE}",
])
def test_malformed_blocks_stay_in_the_content(block):
    text = f"before {block} after"
    assert parse_tool_calls(text) == (text, [])


def test_unclosed_opener_and_stray_closer_are_text():
    assert parse_tool_calls(f"a {OPEN}call:f{{x:1}}") == (f"a {OPEN}call:f{{x:1}}", [])
    assert parse_tool_calls(f"a {CLOSE} b") == (f"a {CLOSE} b", [])
    # a block runs to the first closer: the second opener is inside a malformed first block
    text = f"{OPEN}call:a{{{OPEN}call:b{{}}{CLOSE}x"
    assert parse_tool_calls(text) == (text, [])


def test_never_raises_on_random_garbage():
    r = random.Random(0)
    alphabet = [OPEN, CLOSE, Q, "call:", "f", "{", "}", "[", "]", ":", ",", "1", "-", ".", "e", "true", " ",
                '"', "\\", "\n", "x"]
    for _ in range(2000):
        text = "".join(r.choice(alphabet) for _ in range(r.randint(0, 30)))
        content, calls = parse_tool_calls(text)
        assert isinstance(content, str)
        for c in calls:
            assert isinstance(_args(c), dict)


def _random_value(r: random.Random, depth: int = 0):
    kind = r.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return r.choice(["", "plain", 'q"uote', "a,b:c{d}[e]", "line\nbreak", "tab\t\\", "ünï 🙂", "null", "1"])
    if kind == 1:
        return r.randint(-10**12, 10**12)
    if kind == 2:
        return r.choice([0.5, -3.25, 1e-7, 6.02e23, 0.0])
    if kind == 3:
        return r.choice([True, False])
    if kind == 4:
        return None
    if kind in (5, 6):
        return {r.choice(["a", "b_c", "d.e", "with space", "ké", "x-y", "$k"]) + str(i): _random_value(r, depth + 1)
                for i in range(r.randint(0, 3))}
    return [_random_value(r, depth + 1) for _ in range(r.randint(0, 3))]


def test_format_then_parse_round_trips():
    r = random.Random(1)
    for _ in range(300):
        args = {f"k{i}": _random_value(r) for i in range(r.randint(0, 4))}
        content, calls = parse_tool_calls("pre " + format_call("tool_x", args) + " post")
        assert content == "pre  post"
        assert calls == [{"name": "tool_x", "arguments": json.dumps(args, ensure_ascii=False)}]
    assert format_call("f", '{"a": [1, "b"]}') == f"{OPEN}call:f{{a:[1,{Q}b{Q}]}}{CLOSE}"
    with pytest.raises(ValueError):
        format_value("has " + Q)


def _stream(pieces: list[str]) -> tuple[str, list[dict], list[dict]]:
    s = ToolCallStream()
    out, popped = [], []
    for p in pieces:
        out.append(s.feed(p))
        popped += s.pop_calls()
    out.append(s.finish())
    popped += s.pop_calls()
    return "".join(out), s.calls, popped


STREAM_CASES = [
    f"  Let me check.\n{OPEN}call:get_weather{{city:{Q}Paris{Q},days:3}}{CLOSE}\n and then <|tool text  ",
    f"{OPEN}call:f{{x:bare}}{CLOSE} broken, then {OPEN}call:g{{l:[{{a:{Q}<|tool_call{Q}}}]}}{CLOSE}",
    f"ends inside {OPEN}call:f{{x:1",
    "ends on a partial marker <|tool_ca",
    f"<<|<|t{OPEN}call:a{{}}{CLOSE}{OPEN}call:b{{y:null}}{CLOSE}   ",
    "no calls at all, just text\n\n",
    "   \n ",
    "",
]


@pytest.mark.parametrize("text", STREAM_CASES)
def test_stream_split_at_every_boundary_matches_one_shot(text):
    expected = parse_tool_calls(text)
    assert _stream([text])[:2] == expected
    for cut in range(len(text) + 1):
        content, calls, popped = _stream([text[:cut], text[cut:]])
        assert (content, calls) == expected, cut
        assert popped == calls
    for cut1 in range(0, len(text) + 1, 3):
        for cut2 in range(cut1, len(text) + 1, 5):
            assert _stream([text[:cut1], text[cut1:cut2], text[cut2:]])[:2] == expected
    assert _stream(list(text))[:2] == expected  # one character at a time


def test_stream_holds_back_only_what_may_be_a_marker():
    s = ToolCallStream()
    assert s.feed("Hello <|to") == "Hello"  # the space waits for more content, "<|to" may be a marker
    assert s.feed("ol") == ""  # "<|tool" may still become "<|tool_call>"
    assert s.feed("s") == " <|tools"  # it did not: released
    s2 = ToolCallStream()
    assert s2.feed("x <|tool") == "x"
    assert s2.feed(">") == " <|tool>"
    s3 = ToolCallStream()
    assert s3.feed(f"a {OPEN}call:f{{x:") == "a" and s3.in_call
    assert s3.feed(f"1}}{CLOSE} b") == "  b" and not s3.in_call  # the held space, then " b"
    assert s3.pop_calls() == [{"name": "f", "arguments": '{"x": 1}'}] and s3.pop_calls() == []
    assert s3.finish() == "" and s3.finish() == ""
    with pytest.raises(RuntimeError):
        s3.feed("more")


def test_openai_shape_and_declaration():
    calls = parse_tool_calls(f"{OPEN}call:f{{x:1}}{CLOSE}{OPEN}call:g{{}}{CLOSE}")[1]
    out = openai_tool_calls(calls, start_index=2)
    assert [c["index"] for c in out] == [2, 3]
    assert out[0]["type"] == "function" and out[0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
    assert out[0]["id"].startswith("call_") and out[0]["id"] != out[1]["id"]
    tool = {"type": "function", "function": {
        "name": "weather", "description": "Weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City"}},
                       "required": ["city"]}}}
    assert format_declaration(tool) == (
        f"<|tool>declaration:weather{{description:{Q}Weather{Q},parameters:{{properties:{{city:"
        f"{{description:{Q}City{Q},type:{Q}STRING{Q}}}}},required:[{Q}city{Q}],type:{Q}OBJECT{Q}}}}}<tool|>")
    with pytest.raises(ValueError):
        format_declaration({"name": "bad name"})
