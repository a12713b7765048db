"""Multi-turn chat that keeps the conversation's KV cache, so each turn encodes only its new tokens.

Every turn renders the whole conversation with the chat template. The cache holds the K/V of
``self.cached`` (the token ids encoded so far: earlier prompts and committed canvases). The longest common
prefix of the two is kept, the rest of the cache is forgotten, and only the new tail is encoded. The
encoder is causal, so a position's K/V depend only on the tokens up to it: the answer equals a fresh
run on the full history with the same seed (up to float rounding of the split prefill).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from dgemma import sampler
from dgemma.cache import KVCache


class ChatSession:
    def __init__(self, engine, enable_thinking: bool = False, system: str | None = None):
        if engine.tokenizer is None:  # say so at once, not at the first turn
            raise ValueError("this model has no tokenizer, so it cannot chat")
        self.engine, self.enable_thinking = engine, enable_thinking
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        self.cached: list[int] = []  # token ids whose K/V are in the cache, in order
        self.cache: KVCache | None = None
        self.last_encoded = 0  # prompt tokens the last turn encoded (the rest came from the cache)
        self.last_completion = None  # the last turn's Completion (its text is the answer) and thinking
        self.last_thinking: str | None = None

    def reset(self) -> None:
        system = [m for m in self.messages if m["role"] == "system"]
        self.messages, self.cached, self.cache = system, [], None
        self.last_encoded, self.last_completion, self.last_thinking = 0, None, None

    def _prepare(self, user: str, overrides: dict[str, Any]):
        engine = self.engine
        messages = self.messages + [{"role": "user", "content": user}]
        ids = engine.chat_ids(messages, self.enable_thinking)
        params = engine.params(**overrides)
        engine._check_length([ids], params)
        keep = 0
        for a, b in zip(self.cached, ids[:-1]):  # at least one new token, so the prefill is never empty
            if a != b:
                break
            keep += 1
        if self.cache is None:
            self.cache = KVCache(engine.config, 1, len(ids) + params.max_new_tokens, device=engine.model.device,
                                 dtype=engine.model.dtype)
        self.cache.truncate(keep)
        self.cached = self.cached[:keep]
        self.last_encoded = len(ids) - keep
        return messages, ids, keep, params

    def stream(self, user: str, **overrides) -> Iterator:
        """Like ``Engine.stream`` for the next user turn; the last event's Completion is the answer
        (thinking split out into ``self.last_thinking``), and the turn joins the history."""
        engine = self.engine
        messages, ids, keep, params = self._prepare(user, overrides)
        with torch.inference_mode():
            loop = sampler.run(engine.runner, [ids[keep:]], params, pad_id=engine._pad(params), cache=self.cache)
            yield from engine.updates(loop, lambda row: self._finish(messages, ids, row))

    def _finish(self, messages, ids: list[int], row: sampler.RowResult):
        engine = self.engine
        self.cached = ids + row.committed_ids
        row.prompt_tokens = len(ids)
        completion = engine._completion(row)
        thinking, answer = engine.split_answer(row.token_ids)
        completion.text, self.last_thinking, self.last_completion = answer, thinking, completion
        self.messages = messages + [{"role": "assistant", "content": answer}]
        return completion

    def send(self, user: str, **overrides):
        """One turn without events: the ChatResponse."""
        from dgemma.engine import ChatResponse

        for _ in self.stream(user, **overrides):
            pass
        return ChatResponse(answer=self.last_completion.text, thinking=self.last_thinking,
                            completion=self.last_completion)
