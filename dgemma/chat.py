"""Multi-turn chat: each turn re-renders the conversation and encodes only what the KV cache lacks.

Every turn renders the whole conversation with the chat template and runs it as one request on the
engine's core. The core's prefix cache (``dgemma.core.pool``) still holds the previous turn's prompt and
committed canvases in that request's slot, so only the tokens after the longest common prefix are encoded.
The encoder is causal, so a position's K/V depend only on the tokens up to it: the answer equals a fresh
run on the full history with the same seed (up to float rounding of the split prefill).
"""

from __future__ import annotations

from typing import Any, Iterator


class ChatSession:
    def __init__(self, engine, enable_thinking: bool = False, system: str | None = None):
        if engine.tokenizer is None:  # say so at once, not at the first turn
            raise ValueError("this model has no tokenizer, so it cannot chat")
        self.engine, self.enable_thinking = engine, enable_thinking
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        self.cached: list[int] = []  # the last turn's prompt and committed canvases: what its slot holds
        self.last_encoded = 0  # prompt tokens the last turn encoded (the rest came from the cache)
        self.last_completion = None  # the last turn's Completion (its text is the answer) and thinking
        self.last_thinking: str | None = None

    def reset(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self.cached = []
        self.last_encoded, self.last_completion, self.last_thinking = 0, None, None

    def stream(self, user: str, **overrides) -> Iterator:
        """Like ``Engine.stream`` for the next user turn; the last event's Completion is the answer
        (thinking split out into ``self.last_thinking``), and the turn joins the history."""
        engine = self.engine
        messages = self.messages + [{"role": "user", "content": user}]
        ids = engine.chat_ids(messages, self.enable_thinking)
        params = engine.params(**overrides)
        engine.check_length([ids], params)
        req = engine.submit(ids, params, step_events=True)  # the core's step runs in inference mode itself
        yield from engine.updates(engine.events(req), req, lambda row: self._finish(messages, ids, row))

    def _finish(self, messages, ids: list[int], row):
        engine = self.engine
        self.cached = ids + row.committed_ids
        self.last_encoded = row.prompt_tokens - row.cached_tokens
        completion = engine.completion(row)
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
