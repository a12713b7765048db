"""Chat sessions reuse the conversation's KV cache (the engine core's prefix cache): later turns encode only
their new tokens and answer exactly as a fresh run on the whole history does."""

from __future__ import annotations

import pytest
import torch

import dgemma
from dgemma.cache import KVCache
from dgemma.config import ModelConfig
from conftest import TINY

KW = {"max_new_tokens": 40, "max_denoising_steps": 4, "confidence_threshold": 0.0}


@pytest.fixture(scope="module")
def engine(ckpt_factory):
    return dgemma.load(ckpt_factory("tiny"))


def _spy_encode(engine, monkeypatch) -> list[int]:
    """Record the number of tokens of every encoder call (prefill and commits)."""
    calls: list[int] = []
    real = engine.model.encode

    def encode(ids, cache, n_valid=None):
        calls.append(ids.shape[1])
        return real(ids, cache, n_valid)

    monkeypatch.setattr(engine.model, "encode", encode)
    return calls


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_second_turn_encodes_only_new_tokens_and_matches_a_fresh_run(engine, monkeypatch):
    calls = _spy_encode(engine, monkeypatch)
    session = engine.chat_session()
    user = "Tell me about the printing press, in a few words. " * 3
    first = session.send(user, seed=1, **KW)
    prompt1 = engine.tokenizer.encode_chat([{"role": "user", "content": user}])
    assert session.last_encoded == len(prompt1) == first.completion.prompt_tokens  # an empty cache
    held = list(session.cached)  # turn 1's prompt and its committed canvases
    assert held[: len(prompt1)] == prompt1 and len(held) > len(prompt1)
    calls.clear()
    second = session.send("And then?", seed=2, **KW)
    full = engine.tokenizer.encode_chat(session.messages[:-1])
    assert second.completion.prompt_tokens == len(full)
    # The template re-renders turn 1's answer from its text; the cache is kept up to where the ids agree,
    # which covers at least the whole first prompt, and the prefill of turn 2 (its first encoder call)
    # is only the rest.
    keep = _common(held, full)
    assert keep >= len(prompt1) and calls[0] == session.last_encoded == len(full) - keep
    fresh = engine.chat(session.messages[:-1], seed=2, **KW)
    assert second.answer == fresh.answer and second.completion.token_ids == fresh.completion.token_ids
    assert second.completion.steps == fresh.completion.steps
    # after a reset the conversation starts again; the prefix cache still holds turn 1's prompt (it is the
    # engine's, not the session's), so nothing is encoded, and turn 1 comes out as before
    session.reset()
    third = session.send(user, seed=1, **KW)
    assert third.answer == first.answer and session.last_encoded == 0


def test_streamed_turn_ends_with_the_completion(engine):
    session = engine.chat_session()
    events = list(session.stream("Hi", seed=0, **KW))
    last = events[-1]
    assert last.finished and last.completion is not None
    assert sum(1 for e in events if hasattr(e, "draft_tokens")) == sum(last.completion.steps)
    assert session.messages[-1] == {"role": "assistant", "content": last.completion.text}


def test_cache_grows_and_truncates():
    cfg = ModelConfig.from_hf_dict(TINY)
    cache = KVCache(cfg, 1, 8)
    k = torch.randn(1, cfg.layers[0].num_kv_heads, 6, cfg.layers[0].head_dim)
    cache.write(0, k, k, torch.tensor([0]))
    cache.lengths += 6
    cache.ensure(12)
    assert cache.capacity == 16 and torch.equal(cache.view(0, 0, 6)[0], k)  # doubled, contents kept
    cache.ensure(10)
    assert cache.capacity == 16  # never shrinks
    cache.truncate(4)
    assert cache.lengths.tolist() == [4]
