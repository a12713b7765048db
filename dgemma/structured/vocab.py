"""What each token of a tokenizer writes, for building allowed-token sets: :class:`Vocabulary`.

Each id is decoded on its own after an anchor token (so a leading space that a decoder would strip at the
start of a text is kept): its text. Special tokens, and tokens that decode to U+FFFD (a partial UTF-8
sequence, a byte-fallback piece) or to nothing, are never used in a value slot. The texts are checked to
concatenate to the decode of a sequence of them, class by class (a token that breaks this is dropped).
Building one costs a decode of every id; :meth:`Vocabulary.of` keeps it on the tokenizer object, so one
tokenizer builds it once.
"""

from __future__ import annotations

import torch

REPLACEMENT = "\ufffd"
CACHE_ATTR = "_dgemma_structured_vocabulary"  # where Vocabulary.of keeps its result on a tokenizer object
JSON_WHITESPACE = (" ", "\n", "\t")


class Vocabulary:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend", None)
        n = tokenizer.vocab_size
        self.size = n
        special = set(getattr(tokenizer, "special_ids", set()))
        self.anchor = self._single("{")
        base = tokenizer.decode([self.anchor], skip_special_tokens=False)
        seqs = [[self.anchor, t] for t in range(n)]
        if backend is not None and hasattr(backend, "decode_batch"):
            decoded = backend.decode_batch(seqs, skip_special_tokens=False)
        else:
            decoded = [tokenizer.decode(s, skip_special_tokens=False) for s in seqs]
        texts: list[str | None] = []
        for t, d in enumerate(decoded):
            ok = t not in special and d.startswith(base) and len(d) > len(base) and REPLACEMENT not in d
            texts.append(d[len(base):] if ok else None)
        self.texts = texts
        self.ws = self._whitespace()
        self.quote = self._single('"')
        self.digits = [self._single(str(d)) for d in range(10)]
        self.minus = self._single("-")
        # string-safe tokens: no quote, backslash or control character (JSON would need an escape)
        self.string_ids = [t for t, s in enumerate(texts) if s is not None and _string_safe(s)]
        self.string_ids = self.concatenating(self.string_ids)
        self.char_of = {texts[t]: t for t in self.string_ids if len(texts[t]) == 1}  # one-character tokens

    @classmethod
    def of(cls, tokenizer) -> "Vocabulary":
        """The tokenizer's vocabulary, built once and kept on the tokenizer object (``tokenizer`` may also
        be a Vocabulary)."""
        if isinstance(tokenizer, Vocabulary):
            return tokenizer
        vocab = getattr(tokenizer, CACHE_ATTR, None)
        if vocab is None or vocab.size != tokenizer.vocab_size:
            vocab = cls(tokenizer)
            setattr(tokenizer, CACHE_ATTR, vocab)
        return vocab

    def _single(self, text: str) -> int:
        """The token that writes exactly ``text`` (ValueError if the tokenizer has none)."""
        ids = self.tokenizer.encode(text)
        if len(ids) != 1 or self.tokenizer.decode(ids, skip_special_tokens=False) != text:
            raise ValueError(f"the tokenizer has no single token for {text!r}, which JSON output needs")
        return ids[0]

    def _whitespace(self) -> int:
        for text in JSON_WHITESPACE:
            ids = self.tokenizer.encode(text)
            if len(ids) == 1 and self.texts[ids[0]] == text:
                return ids[0]
        raise ValueError("the tokenizer has no single-token JSON whitespace (space, newline or tab)")

    def concatenating(self, ids: list[int]) -> list[int]:
        """``ids`` without the tokens whose texts do not concatenate to the decode of a sequence of them."""
        if not ids:
            return ids
        base = self.tokenizer.decode([self.anchor], skip_special_tokens=False)
        whole = self.tokenizer.decode([self.anchor, *ids, self.anchor], skip_special_tokens=False)
        if whole == base + "".join(self.texts[t] for t in ids) + base:
            return ids
        good = []
        for t in ids:  # rare: find the tokens that change in context (one at a time)
            text = self.tokenizer.decode([self.anchor, t, t, self.anchor], skip_special_tokens=False)
            if text == base + self.texts[t] * 2 + base:
                good.append(t)
        return good

    def encode_exact(self, text: str) -> list[int]:
        """Tokens that write exactly ``text`` (special tokens included), checked by decoding after the anchor."""
        ids = self.tokenizer.encode(text)
        base = self.tokenizer.decode([self.anchor], skip_special_tokens=False)
        if self.tokenizer.decode([self.anchor, *ids], skip_special_tokens=False) != base + text:
            raise ValueError(f"the tokenizer does not write {text!r} back exactly from its tokens")
        return ids

    def mask(self, ids, width: int) -> torch.Tensor:
        """``[width]`` bool, True at ``ids``."""
        row = torch.zeros(width, dtype=torch.bool)
        if len(ids):
            row[torch.as_tensor(list(ids), dtype=torch.long)] = True
        return row


def _string_safe(text: str) -> bool:
    return all(c != '"' and c != "\\" and ord(c) >= 0x20 and c != "\x7f" for c in text)
