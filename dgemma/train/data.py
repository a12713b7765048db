"""Training data: JSONL records -> token-id examples -> padded micro-batches (spec section 4.2).

A record is either ``{"messages": [...]}`` (chat; the last message is the assistant answer that is
supervised, earlier turns are context) or ``{"prompt": ..., "completion": ...}`` (strings, or message
lists in the conversational form). With a chat template the conversation is rendered by it; without
one (or ``template = "raw"``) prompt and completion are plain text, BOS first, EOS after the answer.

The supervised response is the answer's tokens up to and including its closing EOS, then EOS fill to a
multiple of the canvas length (the fill is supervised too). A text pair may also carry ``"fixed"``: character
spans ``[start, end)`` of the completion that are given (a puzzle's clues): the tokens wholly inside them are
never corrupted on the canvas (:attr:`Example.fixed`). Examples longer than ``max_length`` are
skipped or cut to whole blocks, as the caller chooses, and counted; so are the tokens that the tokenizer
maps to its unknown token (:meth:`DataStats.unknown_problem` says when the data does not suit it). The
order of examples in training is a pure function of (seed, step): see :class:`DataStream`; nothing about
it needs saving to resume.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from jinja2 import TemplateError

from dgemma.errors import DgemmaError
from dgemma.tokenizer import Tokenizer

OVERLONG = ("skip", "truncate")
TEMPLATES = ("auto", "chat", "raw")
# Data whose tokens are more than this share unknown (or with any record more than MOSTLY_UNKNOWN unknown)
# does not suit the tokenizer: e.g. letters through a digits-only tokenizer all become one <unk> id.
UNKNOWN_SHARE = 0.05
MOSTLY_UNKNOWN = 0.5


class DataError(DgemmaError, ValueError):
    """A training file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    """One tokenised example: ``ids`` = prompt + response + EOS fill (whole canvas blocks)."""

    ids: tuple[int, ...]
    prefix_len: int  # index of the first supervised token
    block: int = 256  # canvas length
    # Response positions (0 = the first token after the prompt) that the canvas holds at their clean token:
    # never corrupted, still in the loss (the record's "fixed" spans; inference pins them likewise).
    fixed: tuple[int, ...] = ()

    @property
    def n_blocks(self) -> int:
        return (len(self.ids) - self.prefix_len) // self.block


@dataclass
class DataStats:
    records: int = 0
    kept: int = 0
    skipped_overlong: int = 0
    truncated: int = 0
    tokens: int = 0
    text_tokens: int = 0  # tokens of the records' text (prompt + response, before the EOS fill)
    unknown: int = 0  # of those, the tokenizer's unknown token
    mostly_unknown: int = 0  # records whose tokens are more than half unknown
    first_unknown: str = ""  # "file:line" of the first record with an unknown token
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        unk = f"; {self.unknown} unknown tokens ({self.unknown_share:.1%})" if self.unknown else ""
        return (f"{self.kept} examples from {self.records} records ({self.tokens} tokens); "
                f"{self.skipped_overlong} skipped as too long, {self.truncated} cut to fit{unk}")

    @property
    def unknown_share(self) -> float:
        return self.unknown / self.text_tokens if self.text_tokens else 0.0

    def count_unknown(self, ids: list[int], unk_id: int | None, where: str) -> None:
        self.text_tokens += len(ids)
        n = sum(1 for i in ids if i == unk_id) if unk_id is not None else 0
        self.unknown += n
        self.mostly_unknown += n > len(ids) * MOSTLY_UNKNOWN
        if n and not self.first_unknown:
            self.first_unknown = where

    def unknown_problem(self) -> str | None:
        """One line saying that the tokenizer does not cover the data, or None when it does: more than
        ``UNKNOWN_SHARE`` of the tokens unknown, or any record mostly unknown."""
        if self.unknown_share <= UNKNOWN_SHARE and not self.mostly_unknown:
            return None
        return (f"{self.unknown_share:.1%} of the data's tokens ({self.unknown} of {self.text_tokens}) are the "
                f"tokenizer's unknown token, {self.mostly_unknown} of {self.records} records mostly so (first at "
                f"{self.first_unknown}): the model cannot learn text it cannot see")


def read_jsonl(path: str | Path) -> Iterable[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, record)``; a bad line raises DataError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"training data file not found: {path}")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def _messages(value: Any, where: str, what: str) -> list[dict[str, str]]:
    if isinstance(value, str) and what != "messages":
        return [{"role": "user" if what == "prompt" else "assistant", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: '{what}' must be a string or a non-empty list of messages")
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: every message needs string 'role' and 'content' fields")
    return list(value)


def record_to_conversation(record: dict[str, Any], where: str) -> tuple[list[dict], dict] | tuple[str, str]:
    """``(context messages, answer message)`` for chat records, ``(prompt, completion)`` for text pairs."""
    if "messages" in record:
        msgs = _messages(record["messages"], where, "messages")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer "
                            f"(got role {msgs[-1]['role']!r})")
        return msgs[:-1], msgs[-1]
    if "prompt" in record and "completion" in record:
        p, c = record["prompt"], record["completion"]
        if isinstance(p, str) and isinstance(c, str):
            return p, c
        comp = _messages(c, where, "completion")
        return _messages(p, where, "prompt") + comp[:-1], comp[-1]
    raise DataError(f"{where}: expected a 'messages' list or 'prompt' and 'completion' fields "
                    f"(found {sorted(record)[:5]})")


class ExampleBuilder:
    """Turns records into :class:`Example`s with one tokenizer, canvas length and length policy."""

    def __init__(self, tokenizer: Tokenizer, block: int, max_length: int, overlong: str = "skip",
                 template: str = "auto", eos_id: int | None = None, bos_id: int | None = None):
        if overlong not in OVERLONG:
            raise DataError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
        if template not in TEMPLATES:
            raise DataError(f"template must be one of {TEMPLATES}, got {template!r}")
        if template == "chat" and tokenizer.chat_template is None:
            raise DataError("template = 'chat' but the tokenizer has no chat template")
        self.tok, self.block, self.max_length, self.overlong = tokenizer, block, max_length, overlong
        self.chat = template == "chat" or (template == "auto" and tokenizer.chat_template is not None)
        self.eos = eos_id if eos_id is not None else tokenizer.eos_id
        if self.eos is None:
            raise DataError("the tokenizer names no eos_token, and no eos id was given: the response "
                            "fill needs one")
        self.bos = bos_id if bos_id is not None else tokenizer.bos_id
        self.unk = tokenizer.unk_id
        self.turn_end = {self.eos} | {i for i in (tokenizer.token_to_id("<turn|>"),) if i is not None}

    def prompt_and_response(self, record: dict[str, Any], where: str) -> tuple[list[int], list[int]]:
        context, answer = record_to_conversation(record, where)
        if self.chat:
            if isinstance(context, str):
                context = [{"role": "user", "content": context}]
                answer = {"role": "assistant", "content": answer}
            try:
                prompt_text = self.tok.apply_chat_template(context, add_generation_prompt=True)
                full_text = self.tok.apply_chat_template(context + [answer], add_generation_prompt=False)
            except (ValueError, TemplateError) as e:  # e.g. the template's own raise_exception
                raise DataError(f"{where}: the chat template rejects this conversation: {e}") from None
            prompt = self.tok.encode(prompt_text)
            if full_text.startswith(prompt_text):  # the answer turn as the template writes it
                response = self.tok.encode(full_text[len(prompt_text):])
            else:  # a template that renders a finished turn differently from a generation prompt
                response = self.tok.encode(answer["content"])
            # Supervise up to the turn's closing token (<turn|>, or the EOS), not the newline after it.
            ends = [i for i, t in enumerate(response) if t in self.turn_end]
            response = response[: ends[-1] + 1] if ends else response + [self.eos]
        else:
            if not isinstance(context, str):
                raise DataError(f"{where}: chat records need a tokenizer with a chat template")
            prompt = ([self.bos] if self.bos is not None else []) + self.tok.encode(context)
            response = self.tok.encode(answer) + [self.eos]
        return prompt, response

    def fixed_positions(self, record: dict[str, Any], where: str) -> tuple[int, ...]:
        """The response positions inside the record's ``"fixed"`` character spans (none without the field)."""
        spans = record.get("fixed")
        if spans is None:
            return ()
        answer = record.get("completion")
        if self.chat or not isinstance(answer, str) or not isinstance(record.get("prompt"), str):
            raise DataError(f"{where}: 'fixed' spans need a prompt/completion pair of strings and data.template "
                            f"= 'raw' (the spans index the completion's characters)")
        if not isinstance(spans, list) or not all(
                isinstance(sp, list) and len(sp) == 2 and all(type(x) is int for x in sp)
                and 0 <= sp[0] < sp[1] <= len(answer) for sp in spans):
            raise DataError(f"{where}: 'fixed' must be a list of [start, end] character spans with "
                            f"0 <= start < end <= {len(answer)} (the completion's length)")
        offsets = self.tok.backend.encode(answer, add_special_tokens=False).offsets
        return tuple(i for i, (a, b) in enumerate(offsets)
                     if b > a and any(s <= a and b <= e for s, e in spans))

    def build(self, record: dict[str, Any], where: str, stats: DataStats) -> Example | None:
        stats.records += 1
        prompt, response = self.prompt_and_response(record, where)
        given = self.fixed_positions(record, where)
        stats.count_unknown(prompt + response, self.unk, where)
        n_blocks = max(1, math.ceil(len(response) / self.block))
        fits = (self.max_length - len(prompt)) // self.block
        if fits < 1 or (n_blocks > fits and self.overlong == "skip"):
            stats.skipped_overlong += 1
            return None
        if n_blocks > fits:
            stats.truncated += 1
            n_blocks = fits
        response = (response + [self.eos] * (n_blocks * self.block))[: n_blocks * self.block]
        fixed = tuple(i for i in given if i < len(response))
        ids = tuple(prompt + response)
        stats.kept += 1
        stats.tokens += len(ids)
        return Example(ids=ids, prefix_len=len(prompt), block=self.block, fixed=fixed)

    def load(self, path: str | Path, stats: DataStats | None = None, progress=None) -> list[Example]:
        """Every example of a JSONL file; ``progress(n)`` is called per record if given."""
        stats = stats if stats is not None else DataStats()
        out = []
        for lineno, record in read_jsonl(path):
            ex = self.build(record, f"{path}:{lineno}", stats)
            if ex is not None:
                out.append(ex)
            if progress is not None:
                progress(1)
        if not out:
            raise DataError(f"{path}: no usable examples ({stats.summary()})")
        return out


class DataStream:
    """An endless sequence of example indices: a fresh seeded permutation per epoch.

    ``indices(step, n)`` is the global batch of optimiser step ``step``; it depends only on (seed, step),
    so a resumed run sees the same data in the same order with nothing saved but the step number.
    """

    def __init__(self, n_examples: int, seed: int):
        self.n, self.seed = n_examples, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch]

    def indices(self, step: int, n: int) -> list[int]:
        out = []
        for k in range(step * n, (step + 1) * n):
            out.append(self._perm(k // self.n)[k % self.n])
        return out


@dataclass
class Batch:
    """Right-padded micro-batch: ``ids [B, S]``, ``lengths [B]``, ``prefix [B]`` (first supervised index)."""

    ids: torch.Tensor
    lengths: torch.Tensor
    prefix: torch.Tensor

    def to(self, device) -> "Batch":
        return Batch(self.ids.to(device), self.lengths.to(device), self.prefix.to(device))


def collate(examples: list[Example], pad_id: int) -> Batch:
    s = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), s), pad_id, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
    return Batch(ids, torch.tensor([len(e.ids) for e in examples]), torch.tensor([e.prefix_len for e in examples]))
