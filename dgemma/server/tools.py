"""Gemma 4 tool-call syntax <-> OpenAI ``tool_calls``.

Responsible for: turning the tool calls a Gemma 4 chat model writes into OpenAI-style calls, one shot
(``parse_tool_calls``) or while text streams in (``ToolCallStream``), and the reverse direction for
tests and templates without tool support (``format_call``, ``format_value``, ``format_declaration``).
It knows nothing about the model, the tokenizer or HTTP.

The syntax (spec section 7; the markers are special tokens, so the text must be decoded with special
tokens kept)::

    <|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|>

Keys are bare words (or quoted); values are strings between ``<|"|>`` delimiters (no escapes inside:
a string ends at the next delimiter), numbers, ``true`` / ``false`` / ``null``, ``{...}`` objects and
``[...]`` lists of the same. A JSON ``"..."`` string is accepted too. A block is everything from
``<|tool_call>`` to the first ``<tool_call|>`` after it; one that does not parse stays in the content as
text, and so does an opener that is never closed. Nothing here raises on model output.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

__all__ = ["TOOL_CALL_OPEN", "TOOL_CALL_CLOSE", "STRING_DELIM", "parse_tool_calls", "parse_call",
           "ToolCallStream", "openai_tool_calls", "format_value", "format_call", "format_declaration"]

TOOL_CALL_OPEN = "<|tool_call>"
TOOL_CALL_CLOSE = "<tool_call|>"
STRING_DELIM = '<|"|>'
TOOL_OPEN, TOOL_CLOSE = "<|tool>", "<tool|>"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_BARE_KEY = re.compile(r"[A-Za-z_$][A-Za-z0-9_.\-$]*")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_LITERALS = {"true": True, "false": False, "null": None}
_WS = " \t\r\n"


class _Malformed(Exception):
    """Raised inside the parser only; callers see ``None``."""


class _Parser:
    """Recursive descent over one block body: ``call:NAME{...}``."""

    def __init__(self, text: str):
        self.s, self.i = text, 0

    def ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in _WS:
            self.i += 1

    def expect(self, token: str) -> None:
        if not self.s.startswith(token, self.i):
            raise _Malformed(f"expected {token!r} at {self.i}")
        self.i += len(token)

    def match(self, pattern: re.Pattern) -> re.Match:
        m = pattern.match(self.s, self.i)
        if m is None:
            raise _Malformed(f"unexpected text at {self.i}")
        self.i = m.end()
        return m

    def string(self) -> str:
        if self.s.startswith(STRING_DELIM, self.i):
            start = self.i + len(STRING_DELIM)
            end = self.s.find(STRING_DELIM, start)
            if end < 0:
                raise _Malformed("unterminated string")
            self.i = end + len(STRING_DELIM)
            return self.s[start:end]
        # a JSON string: scan to the closing quote, skipping escaped characters, then let json decode it
        start, j = self.i, self.i + 1
        while j < len(self.s) and self.s[j] != '"':
            j += 2 if self.s[j] == "\\" else 1
        if j >= len(self.s):
            raise _Malformed("unterminated string")
        self.i = j + 1
        try:
            return json.loads(self.s[start:self.i])
        except ValueError as e:
            raise _Malformed(str(e)) from None

    def key(self) -> str:
        if self.s.startswith((STRING_DELIM, '"'), self.i):
            return self.string()
        return self.match(_BARE_KEY).group()

    def value(self, depth: int = 0) -> Any:
        if depth > 64:
            raise _Malformed("nested too deeply")
        self.ws()
        if self.s.startswith((STRING_DELIM, '"'), self.i):
            return self.string()
        c = self.s[self.i:self.i + 1]
        if c == "{":
            return self.obj(depth + 1)
        if c == "[":
            return self.items(depth + 1)
        for word, val in _LITERALS.items():
            if self.s.startswith(word, self.i) and not self.s[self.i + len(word):self.i + len(word) + 1].isalnum():
                self.i += len(word)
                return val
        m = self.match(_NUMBER)
        return float(m.group()) if (m.group(1) or m.group(2)) else int(m.group())

    def _sequence(self, close: str, item) -> None:
        """Comma-separated items up to ``close`` (a trailing comma is tolerated)."""
        self.ws()
        while not self.s.startswith(close, self.i):
            item()
            self.ws()
            if self.s.startswith(",", self.i):
                self.i += 1
                self.ws()
            elif not self.s.startswith(close, self.i):
                raise _Malformed(f"expected ',' or {close!r} at {self.i}")
        self.i += 1

    def obj(self, depth: int) -> dict:
        self.expect("{")
        out: dict[str, Any] = {}

        def pair() -> None:
            k = self.key()
            self.ws()
            self.expect(":")
            out[k] = self.value(depth)

        self._sequence("}", pair)
        return out

    def items(self, depth: int) -> list:
        self.expect("[")
        out: list = []
        self._sequence("]", lambda: out.append(self.value(depth)))
        return out

    def call(self) -> dict:
        self.ws()
        self.expect("call:")
        name = self.match(_NAME).group()
        self.ws()
        args = self.obj(1)
        self.ws()
        if self.i != len(self.s):
            raise _Malformed("text after the arguments")
        return {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}


def parse_call(body: str) -> dict | None:
    """``call:NAME{...}`` (the text between the markers) -> ``{"name", "arguments": JSON}``, or None."""
    try:
        return _Parser(body).call()
    except (_Malformed, RecursionError, ValueError):
        return None


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """Split model output into (content without the tool-call blocks, stripped; calls in order).

    Each call is ``{"name": str, "arguments": str}`` with the arguments as a JSON object string.
    """
    parts: list[str] = []
    calls: list[dict] = []
    pos = 0
    while True:
        i = text.find(TOOL_CALL_OPEN, pos)
        if i < 0:
            parts.append(text[pos:])
            break
        parts.append(text[pos:i])
        j = text.find(TOOL_CALL_CLOSE, i + len(TOOL_CALL_OPEN))
        if j < 0:
            parts.append(text[i:])
            break
        call = parse_call(text[i + len(TOOL_CALL_OPEN):j])
        if call is None:
            parts.append(text[i:j + len(TOOL_CALL_CLOSE)])
        else:
            calls.append(call)
        pos = j + len(TOOL_CALL_CLOSE)
    return "".join(parts).strip(), calls


def _held_prefix(buf: str, marker: str) -> int:
    """Length of the longest suffix of ``buf`` that is a proper prefix of ``marker``."""
    for n in range(min(len(buf), len(marker) - 1), 0, -1):
        if marker.startswith(buf[-n:]):
            return n
    return 0


class ToolCallStream:
    """Incremental ``parse_tool_calls`` for streamed text.

    ``feed(delta)`` returns the content that is safe to emit now: text that cannot be part of a tool
    call, with anything that may be the start of ``<|tool_call>`` held back, an open block held until it
    closes, and trailing whitespace held until more content follows (the one-shot content is stripped).
    Completed calls collect in ``calls``; ``pop_calls()`` returns those not yet popped. ``finish()``
    returns the rest. Concatenating every returned string gives exactly ``parse_tool_calls(text)[0]``,
    however the text was split.
    """

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self._popped = 0
        self._buf = ""
        self._in_call = False
        self._started = False  # some content was emitted (leading whitespace is dropped before that)
        self._pending_ws = ""
        self._done = False

    def feed(self, delta: str) -> str:
        if self._done:
            raise RuntimeError("feed() after finish()")
        self._buf += delta
        return self._drain(final=False)

    def finish(self) -> str:
        """Flush: an unclosed block or a held partial marker becomes content; trailing space is dropped."""
        if self._done:
            return ""
        out = self._drain(final=True)
        self._done = True
        return out

    def pop_calls(self) -> list[dict]:
        new = self.calls[self._popped:]
        self._popped = len(self.calls)
        return new

    @property
    def in_call(self) -> bool:
        """Whether a ``<|tool_call>`` block is open (its text is being held)."""
        return self._in_call

    def _drain(self, final: bool) -> str:
        pieces: list[str] = []
        buf = self._buf
        while True:
            if not self._in_call:
                i = buf.find(TOOL_CALL_OPEN)
                if i >= 0:
                    pieces.append(buf[:i])
                    buf, self._in_call = buf[i:], True
                    continue
                keep = 0 if final else _held_prefix(buf, TOOL_CALL_OPEN)
                pieces.append(buf[:len(buf) - keep])
                buf = buf[len(buf) - keep:]
                break
            j = buf.find(TOOL_CALL_CLOSE, len(TOOL_CALL_OPEN))
            if j < 0:
                if final:
                    pieces.append(buf)
                    buf = ""
                break
            end = j + len(TOOL_CALL_CLOSE)
            call = parse_call(buf[len(TOOL_CALL_OPEN):j])
            if call is None:
                pieces.append(buf[:end])
            else:
                self.calls.append(call)
            buf, self._in_call = buf[end:], False
        self._buf = buf
        return self._emit("".join(pieces), final)

    def _emit(self, text: str, final: bool) -> str:
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        text = self._pending_ws + text
        body = text.rstrip()
        self._pending_ws = "" if final else text[len(body):]
        return body


def openai_tool_calls(calls: list[dict], start_index: int = 0) -> list[dict]:
    """Parsed calls -> OpenAI ``tool_calls`` entries (fresh ``call_...`` ids; ``index`` for stream deltas)."""
    return [{"index": start_index + k, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": c["arguments"]}} for k, c in enumerate(calls)]


def _format_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else STRING_DELIM + key + STRING_DELIM


def format_value(value: Any) -> str:
    """A JSON-like value in Gemma 4 tool syntax (what ``parse_call`` reads back)."""
    if isinstance(value, str):
        if STRING_DELIM in value:
            raise ValueError(f"a string cannot contain {STRING_DELIM!r}")
        return STRING_DELIM + value + STRING_DELIM
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{value} has no tool-syntax form")
        return json.dumps(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{_format_key(str(k))}:{format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    raise TypeError(f"cannot format {type(value).__name__} in tool syntax")


def format_call(name: str, arguments: dict | str) -> str:
    """``<|tool_call>call:NAME{...}<tool_call|>`` for arguments given as a dict or a JSON string."""
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    if not isinstance(args, dict):
        raise ValueError("tool-call arguments must be a JSON object")
    return f"{TOOL_CALL_OPEN}call:{name}{format_value(args)}{TOOL_CALL_CLOSE}"


def _schema(node: Any) -> Any:
    """A JSON schema as Gemma 4's template writes it: keys sorted, ``type`` values upper-cased."""
    if isinstance(node, dict):
        out = {}
        for k in sorted(node):
            v = node[k]
            if k == "type" and isinstance(v, str):
                out[k] = v.upper()
            elif k == "type" and isinstance(v, list):
                out[k] = [t.upper() if isinstance(t, str) else t for t in v]
            else:
                out[k] = _schema(v)
        return out
    if isinstance(node, list):
        return [_schema(v) for v in node]
    return node


def format_declaration(tool: dict) -> str:
    """An OpenAI tool (``{"type": "function", "function": {...}}`` or the function dict itself) as a
    ``<|tool>declaration:NAME{description:...,parameters:{...}}<tool|>`` block.

    This follows the shape of Gemma 4's template (sorted keys, upper-case types) for chat templates that
    render no tools; a checkpoint's own template, when it has one, is the reference.
    """
    fn = tool.get("function", tool) if tool.get("type", "function") == "function" else tool
    if not isinstance(fn.get("name"), str) or not _NAME.fullmatch(fn["name"]):
        raise ValueError(f"a tool needs a name made of letters, digits, '_', '.', '-': {fn.get('name')!r}")
    body: dict[str, Any] = {}
    if fn.get("description"):
        body["description"] = fn["description"]
    if fn.get("parameters"):
        body["parameters"] = _schema(fn["parameters"])
    return f"{TOOL_OPEN}declaration:{fn['name']}{format_value(body)}{TOOL_CLOSE}"
