"""Public API: load / generate / stream / chat, as a user calls them."""

import pytest
import torch

import dgemma
from dgemma.engine import CanvasUpdate, Completion, StepUpdate


@pytest.fixture(scope="module")
def engine(ckpt_factory):
    return dgemma.load(ckpt_factory("tiny"))


def test_generate_single_and_batch(engine):
    one = engine.generate("Hello there", max_new_tokens=20, seed=0)
    assert isinstance(one, Completion)
    assert one.text == engine.tokenizer.decode(one.token_ids)
    assert one.prompt_tokens == len(engine.tokenizer.encode("Hello there")) + 1  # + <bos>
    assert one.finish_reason in ("stop", "length") and len(one.token_ids) <= 20
    many = engine.generate(["Hello there", [2, 5, 6]], max_new_tokens=20, seed=0)
    assert isinstance(many, list) and len(many) == 2
    assert many[0].token_ids == one.token_ids
    assert engine.generate(torch.tensor([2, 5, 6]), max_new_tokens=20, seed=0).token_ids == many[1].token_ids


def test_params_object_and_overrides(engine):
    p = dgemma.SamplingParams(max_new_tokens=16, max_denoising_steps=3, confidence_threshold=0.0, seed=1)
    out = engine.generate("x", p)
    assert out.steps == [3]
    assert engine.generate("x", p, max_denoising_steps=2).steps == [2]
    # EOS ids left unset in a params object fall back to the checkpoint's
    assert engine.params(p).eos_token_id == engine.defaults.eos_token_id


def test_stream_events_add_up_to_generate(engine):
    events = list(engine.stream("Stream me", max_new_tokens=40, seed=5, eos_token_id=()))
    steps = [e for e in events if isinstance(e, StepUpdate)]
    canvases = [e for e in events if isinstance(e, CanvasUpdate)]
    final = engine.generate("Stream me", max_new_tokens=40, seed=5, eos_token_id=())
    assert [e.canvas for e in canvases] == [0, 1, 2]
    assert len(steps) == sum(final.steps)
    assert [sum(1 for s in steps if s.canvas == c) for c in range(3)] == final.steps
    assert all(len(s.draft_tokens) == engine.config.canvas_length for s in steps)
    assert sum((e.tokens for e in canvases), []) == final.token_ids
    assert "".join(e.text_delta for e in canvases) == final.text
    assert canvases[-1].finished and canvases[-1].completion.token_ids == final.token_ids
    # the last step's draft of each canvas is what that canvas committed
    for c in canvases:
        last = [s for s in steps if s.canvas == c.canvas][-1]
        assert last.draft_tokens[: len(c.tokens)] == c.tokens


def test_chat_uses_the_template_and_splits_thinking(engine, monkeypatch):
    messages = [{"role": "user", "content": "Hi"}]
    ids = engine.tokenizer.encode_chat(messages, enable_thinking=True)
    assert engine.tokenizer.token_to_id("<|think|>") in ids
    seen = {}
    fake = engine.tokenizer.encode("<|channel>thought\nLet me think.<channel|>The answer.")

    def fake_generate(prompt, params=None, **kw):
        seen["prompt"] = list(prompt)
        return Completion(text="", token_ids=fake, finish_reason="stop", steps=[3])

    monkeypatch.setattr(engine, "generate", fake_generate)
    reply = engine.chat(messages, enable_thinking=True)
    assert seen["prompt"] == ids
    assert reply.thinking == "Let me think." and reply.answer == "The answer."
    assert reply.completion.text == "The answer."


def test_chat_runs_end_to_end(engine):
    reply = engine.chat([{"role": "user", "content": "Hi"}], max_new_tokens=16, seed=0)
    assert isinstance(reply.answer, str) and reply.completion.steps


@pytest.mark.parametrize("bad, match", [
    ([[]], "empty"),
    ([], "no prompts"),
    ([[2, 99999]], "token ids"),
    ([2] * 5000, "context"),
])
def test_bad_prompts_raise_clear_errors(engine, bad, match):
    with pytest.raises(ValueError, match=match):
        engine.generate(bad, max_new_tokens=16)


def test_bad_sampling_option_names_the_field(engine):
    with pytest.raises(ValueError, match="max_denoising_steps"):
        engine.generate("x", max_denoising_steps=0)
    with pytest.raises(TypeError):
        engine.generate("x", temperature=0.5)  # not a DiffusionGemma knob: refused, not silently ignored


def test_text_prompt_without_tokenizer_is_refused(engine):
    bare = dgemma.Engine(engine.model)
    with pytest.raises(ValueError, match="tokenizer"):
        bare.generate("hello")
    assert bare.generate([2, 3, 4], max_new_tokens=16, seed=0).text == ""
