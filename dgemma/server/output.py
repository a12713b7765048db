"""One choice's text as its canvases arrive: reasoning split, stop strings, tool calls, stream deltas.

The final answer is defined on the whole output: for chat, ``split_thinking`` of the text decoded with
special tokens kept (``engine.chat``'s split: ``<|channel>...<channel|>`` blocks are the reasoning), for
completions the text with special tokens skipped (``Completion.text``); the content is cut at the first
stop string, then, when the request has tools, Gemma tool calls are parsed out of it
(``dgemma.server.tools``). While streaming, the same function is applied to the text so far and only the
part that cannot change any more is sent: trailing whitespace, a label that may still become
``thought``, an unfinished UTF-8 character and a tail that may start a stop string are held back, so the
deltas add up to the final answer.
"""

from __future__ import annotations

from typing import Any, Callable

from dgemma.tokenizer import CHANNEL_OPEN, split_thinking

Decode = Callable[[list[int], bool], str]  # (ids, skip_special_tokens) -> text


def _partial_split(text: str) -> tuple[str, str]:
    """``split_thinking`` of text still being written: (reasoning, content) that later text only extends."""
    start = text.rfind(CHANNEL_OPEN)
    if start >= 0 and "<channel|>" not in text[start:]:
        body = text[start + len(CHANNEL_OPEN):].lstrip()
        if "thought".startswith(body):  # the label may still be forming: hold the open block's body
            text = text[: start + len(CHANNEL_OPEN)]
    thinking, answer = split_thinking(text)
    return thinking or "", answer


def _stop_cut(text: str, stops: list[str]) -> int | None:
    """Index of the first stop string in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _held(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that may still be a stop string or a broken character."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), keep, -1):
            if s.startswith(text[-n:]):
                keep = n
                break
    tail = len(text) - len(text.rstrip("\ufffd"))
    return max(keep, tail)


def _extend(sent: str, target: str) -> str:
    """What to send so that ``sent`` becomes ``target`` (nothing if ``target`` does not extend it)."""
    return target[len(sent):] if target.startswith(sent) else ""


class ChoiceText:
    """The output of one choice. ``feed(tokens)`` -> the delta to stream; ``finish()`` -> the rest;
    ``result()`` -> (reasoning or None, content, tool calls) of everything fed."""

    def __init__(self, decode: Decode, chat: bool, stops: list[str] | None = None, tools: bool = False):
        self.decode, self.chat, self.stops, self.tools = decode, chat, list(stops or []), tools
        self.tokens: list[int] = []
        self.stopped = False  # a stop string ended the content
        self._sent_reasoning = ""
        self._sent_content = ""  # content before tool-call parsing
        self._tool_stream = None
        if tools:
            from dgemma.server.tools import ToolCallStream

            self._tool_stream = ToolCallStream()
        self._calls_sent = 0

    # ------------------------------------------------------------------ whole text
    def _split(self, partial: bool) -> tuple[str | None, str]:
        if not self.chat:
            return None, self.decode(self.tokens, True)
        text = self.decode(self.tokens, False)
        if partial:
            return _partial_split(text)
        return split_thinking(text)

    def _content(self, content: str) -> str:
        cut = _stop_cut(content, self.stops)
        if cut is not None:
            self.stopped = True
            return content[:cut]
        return content

    def result(self) -> tuple[str | None, str, list[dict[str, Any]]]:
        reasoning, content = self._split(partial=False)
        content = self._content(content)
        calls: list[dict[str, Any]] = []
        if self.tools:
            from dgemma.server.tools import parse_tool_calls

            content, calls = parse_tool_calls(content)
        return reasoning, content, calls

    # ------------------------------------------------------------------ streaming
    def feed(self, tokens: list[int]) -> dict[str, Any]:
        """Add a canvas's tokens; the delta that is safe to send now (keys only for non-empty parts)."""
        self.tokens += tokens
        if self.stopped:
            return {}
        reasoning, content = self._split(partial=True)
        content = self._content(content)
        if not self.stopped:
            content = content[: len(content) - _held(content, self.stops)]
        return self._delta(reasoning or "", content, final=False)

    def finish(self) -> dict[str, Any]:
        """The rest of the answer once no more tokens come (held text released, tool calls completed)."""
        reasoning, content = self._split(partial=False)
        return self._delta(reasoning or "", self._content(content), final=True)

    def _delta(self, reasoning: str, content: str, final: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        more = _extend(self._sent_reasoning, reasoning)
        if more:
            self._sent_reasoning += more
            out["reasoning_content"] = more
        more = _extend(self._sent_content, content)
        self._sent_content += more
        if self._tool_stream is not None:
            more = self._tool_stream.feed(more) if more else ""
            if final:
                more += self._tool_stream.finish()
            calls = self._tool_stream.pop_calls()
            if calls:
                from dgemma.server.tools import openai_tool_calls

                out["tool_calls"] = openai_tool_calls(calls, self._calls_sent)
                self._calls_sent += len(calls)
        if more:
            out["content"] = more
        return out

    @property
    def called_tools(self) -> bool:
        return self._calls_sent > 0
