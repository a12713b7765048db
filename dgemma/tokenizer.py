"""Tokenizer and chat-format layer for dgemma.

Responsible for: loading/saving a checkpoint's tokenizer files (``tokenizer.json``,
``tokenizer_config.json``, ``chat_template.jinja``), text <-> id conversion,
rendering Gemma 4 chat prompts through the checkpoint's jinja chat template,
splitting decoded model output into (thinking, answer), and building tiny
byte-level tokenizers for test / Sudoku models.  It knows nothing about the
model, the sampler or tensors.
"""
from __future__ import annotations

import json
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from dgemma.fileio import atomic_write_text

__all__ = ["ChatTemplateError", "Tokenizer", "split_thinking", "build_byte_tokenizer", "byte_tokenizer",
           "write_test_tokenizer", "BYTE_TOKENIZER", "GEMMA_SPECIAL_TOKENS", "GEMMA_MARKERS",
           "GEMMA_LIKE_TEMPLATE"]

# Gemma 4 special tokens at their real ids (also used by the byte test tokenizer).
GEMMA_SPECIAL_TOKENS: dict[str, int] = {
    "<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3,
    "<|tool_response>": 50, "<tool_response|>": 51, "<|think|>": 98,
    "<|channel>": 100, "<channel|>": 101, "<|turn>": 105, "<turn|>": 106,
}
# Marker strings removed from answers by split_thinking().
GEMMA_MARKERS: tuple[str, ...] = tuple(GEMMA_SPECIAL_TOKENS)
CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"

# A compact Gemma-4-style template: <bos>, optional leading system turn (with
# "<|think|>\n" first when enable_thinking), roles assistant->model, earlier
# thinking blocks stripped from model turns, contents trimmed, generation prompt.
GEMMA_LIKE_TEMPLATE = r"""{{- bos_token -}}
{%- set first = 1 if (messages and messages[0]['role'] == 'system') else 0 -%}
{%- if enable_thinking or first -%}
{{- '<|turn>system\n' -}}
{%- if enable_thinking -%}{{- '<|think|>\n' -}}{%- endif -%}
{%- if first -%}{{- messages[0]['content'] | trim -}}{%- endif -%}
{{- '<turn|>\n' -}}
{%- endif -%}
{%- for m in messages[first:] -%}
{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}
{%- set text = m['content'] -%}
{%- if role == 'model' and '<channel|>' in text -%}{%- set text = text.split('<channel|>')[-1] -%}{%- endif -%}
{{- '<|turn>' + role + '\n' + (text | trim) + '<turn|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|turn>model\n' -}}{%- endif -%}
"""


class ChatTemplateError(ValueError):
    """The chat template is missing or rejected the conversation."""


def _token_str(value: Any) -> str | None:
    """tokenizer_config token entries are strings or AddedToken-style dicts."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _pick_template(value: Any) -> str | None:
    """A config ``chat_template`` is a string or a list of {name, template} dicts."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        for entry in value:
            if isinstance(entry, Mapping) and entry.get("name") == "default":
                return entry.get("template")
        return None
    raise ChatTemplateError(f"Unsupported chat_template type {type(value).__name__}.")


def _tojson(value: Any, indent: int | None = None, separators=None, sort_keys=False,
            ensure_ascii=False) -> str:
    # Unlike jinja2's builtin, this does not HTML-escape '<', '>', '&', "'".
    return json.dumps(value, indent=indent, separators=separators,
                      sort_keys=sort_keys, ensure_ascii=ensure_ascii)


def _raise_exception(message: str):
    raise ChatTemplateError(message)


def _normalize_messages(messages: Any) -> list[dict]:
    """Validate chat messages; flatten list-of-text-parts contents into one string."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ValueError(f"message {i} must be a dict, got {type(msg).__name__}")
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str) or not role:
            raise ValueError(f"message {i} needs a non-empty str 'role', got {role!r}")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not (isinstance(part, Mapping) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):
                    raise ValueError(f"message {i} has a content part that is not "
                                     f"{{'type': 'text', 'text': str}}: {part!r}")
                texts.append(part["text"])
            content = "".join(texts)
        elif not isinstance(content, str):
            raise ValueError(f"message {i} needs str 'content' (or a list of text "
                             f"parts), got {type(content).__name__}")
        out.append({**msg, "role": role, "content": content})
    return out


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus its config and (optional) chat template."""

    def __init__(self, tokenizer: _HFTokenizer, config: Mapping[str, Any] | None = None,
                 chat_template: str | None = None):
        self._tok = self.backend = tokenizer  # the wrapped tokenizers.Tokenizer
        self.config: dict[str, Any] = dict(config or {})
        self.chat_template = chat_template
        self._compiled = None

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"tokenizer.json not found in {path} (looked for {tok_file})")
        tok = _HFTokenizer.from_file(str(tok_file))
        config: dict[str, Any] = {}
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.is_file():
            config = json.loads(cfg_file.read_text(encoding="utf-8"))
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        else:
            template = _pick_template(config.get("chat_template"))
        return cls(tok, config, template)

    def save(self, path: str | os.PathLike, *, write_jinja: bool = True) -> None:
        """Write tokenizer.json, tokenizer_config.json (+ chat_template.jinja) atomically."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / "tokenizer.json", self._tok.to_str(pretty=True))
        config = {k: v for k, v in self.config.items() if k != "chat_template"}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        atomic_write_text(path / "tokenizer_config.json",
                           json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        if write_jinja and self.chat_template is not None:
            atomic_write_text(path / "chat_template.jinja", self.chat_template)

    # ---- basic text <-> ids -------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    @property
    def special_ids(self) -> set[int]:
        return {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def _config_token(self, key: str, default: str) -> str | None:
        value = _token_str(self.config.get(key))
        if value is not None:
            return value
        return default if self.token_to_id(default) is not None else None

    @property
    def bos_token(self) -> str | None:
        return self._config_token("bos_token", "<bos>")

    @property
    def eos_token(self) -> str | None:
        return self._config_token("eos_token", "<eos>")

    @property
    def pad_token(self) -> str | None:
        return self._config_token("pad_token", "<pad>")

    @property
    def unk_token(self) -> str | None:
        return self._config_token("unk_token", "<unk>")

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.token_to_id(token)

    bos_id = property(lambda self: self._id_of(self.bos_token), doc="id of bos_token or None")
    eos_id = property(lambda self: self._id_of(self.eos_token), doc="id of eos_token or None")
    pad_id = property(lambda self: self._id_of(self.pad_token), doc="id of pad_token or None")
    unk_id = property(lambda self: self._id_of(self.unk_token), doc="id of unk_token (unknown text) or None")

    @property
    def stop_ids(self) -> set[int]:
        """Ids that end a model turn: eos_token plus ``<eos>`` and ``<turn|>`` if present."""
        ids = {self._id_of(t) for t in (self.eos_token, "<eos>", "<turn|>")}
        return {i for i in ids if i is not None}

    # ---- chat ----------------------------------------------------------------
    def _template(self):
        if self.chat_template is None:
            raise ChatTemplateError("This tokenizer has no chat template (no "
                                    "chat_template.jinja or tokenizer_config chat_template).")
        if self._compiled is None or self._compiled[0] is not self.chat_template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[loopcontrols])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._compiled = (self.chat_template, env.from_string(self.chat_template))
        return self._compiled[1]

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = True,
                            enable_thinking: bool = False, **extra: Any) -> str:
        template = self._template()
        context = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                   **extra}
        context.update(messages=_normalize_messages(messages),
                       add_generation_prompt=add_generation_prompt,
                       enable_thinking=enable_thinking)
        return template.render(**context)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]],
                    enable_thinking: bool = False, **extra: Any) -> list[int]:
        return self.encode(self.apply_chat_template(
            messages, add_generation_prompt=True, enable_thinking=enable_thinking, **extra))


def _strip_markers(text: str, markers: Iterable[str]) -> str:
    for m in sorted(set(markers), key=len, reverse=True):
        if m:
            text = text.replace(m, "")
    return text


def split_thinking(text_with_specials: str,
                   special_tokens: Iterable[str] | None = None) -> tuple[str | None, str]:
    """Split decoded output (specials kept) into (thinking or None, answer).

    Every ``<|channel>…<channel|>`` block is thinking (a leading ``thought`` label
    removed; several blocks are joined by a blank line); an unterminated block
    runs to the end of the text. Marker strings are removed from both parts.
    """
    markers = tuple(GEMMA_MARKERS if special_tokens is None else special_tokens)
    thoughts: list[str] = []
    answer_parts: list[str] = []
    rest = text_with_specials
    while True:
        start = rest.find(CHANNEL_OPEN)
        if start < 0:
            answer_parts.append(rest)
            break
        answer_parts.append(rest[:start])
        rest = rest[start + len(CHANNEL_OPEN):]
        end = rest.find(CHANNEL_CLOSE)
        body, rest = (rest, "") if end < 0 else (rest[:end], rest[end + len(CHANNEL_CLOSE):])
        body = re.sub(r"^\s*thought(?![A-Za-z0-9_])", "", body)
        thoughts.append(_strip_markers(body, markers).strip())
        if end < 0:
            break
    answer = _strip_markers("".join(answer_parts), markers).strip()
    return ("\n\n".join(thoughts) if thoughts else None), answer


def _bytes_to_unicode() -> list[str]:
    """The printable character used by the ByteLevel pre-tokenizer for each byte 0..255."""
    keep = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    shifted = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(shifted)) for b in range(256)]


def build_byte_tokenizer(vocab_size: int,
                         special_tokens: Mapping[str, int] | None = None) -> _HFTokenizer:
    """Byte-level tokenizer: specials at fixed ids, 256 bytes in the free ids
    (ascending), ``<unused_ID>`` fillers (special) up to ``vocab_size - 1``."""
    specials = dict(GEMMA_SPECIAL_TOKENS if special_tokens is None else special_tokens)
    byte_chars = _bytes_to_unicode()
    ids = list(specials.values())
    if len(set(ids)) != len(ids):
        raise ValueError(f"special token ids collide: {specials}")
    bad = {t: i for t, i in specials.items()
           if not isinstance(i, int) or not 0 <= i < vocab_size}
    if bad:
        raise ValueError(f"special token ids outside [0, {vocab_size}): {bad}")
    clash = set(specials) & set(byte_chars)
    if clash:
        raise ValueError(f"special tokens collide with byte symbols: {sorted(clash)}")
    if vocab_size < len(specials) + 256:
        raise ValueError(f"vocab_size={vocab_size} is too small for {len(specials)} "
                         f"special tokens + 256 bytes (need >= {len(specials) + 256})")
    vocab = dict(specials)
    taken = set(ids)
    free = (i for i in range(vocab_size) if i not in taken)
    for ch in byte_chars:
        vocab[ch] = next(free)
    fillers = []
    for i in free:
        name = f"<unused_{i}>"
        if name in vocab:
            raise ValueError(f"special token {name!r} clashes with a filler token name")
        vocab[name] = i
        fillers.append(name)
    unk = "<unk>" if "<unk>" in specials else None
    tok = _HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    ordered = sorted(list(specials) + fillers, key=vocab.__getitem__)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ordered])
    return tok


# ``model.tokenizer = "bytes"`` in a training config: the byte-level tokenizer below, built in memory.
BYTE_TOKENIZER = "bytes"
BYTE_VOCAB = 272  # 11 Gemma specials (ids up to 106) + 256 bytes, rounded up to a multiple of 16


def byte_tokenizer(vocab_size: int = BYTE_VOCAB, chat_template: str | None = GEMMA_LIKE_TEMPLATE) -> Tokenizer:
    """A byte-level tokenizer with the Gemma special tokens and a compact Gemma-style chat template: any
    UTF-8 text encodes without an unknown token, and no file or download is needed."""
    config = {"bos_token": "<bos>", "eos_token": "<turn|>", "pad_token": "<pad>",
              "unk_token": "<unk>"}
    return Tokenizer(build_byte_tokenizer(vocab_size), config, chat_template)


def write_test_tokenizer(path: str | os.PathLike, vocab_size: int,
                         chat_template: str | None = GEMMA_LIKE_TEMPLATE) -> Path:
    """Write tokenizer.json + tokenizer_config.json for a byte tokenizer into ``path``."""
    byte_tokenizer(vocab_size, chat_template).save(path, write_jinja=False)
    return Path(path)
