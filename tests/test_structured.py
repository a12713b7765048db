"""Structured output (``dgemma.structured``) through the engine on the random-weight tiny model (fp32,
canvas 16): unsupported keywords named, integers' digit sets within bounds, a layout of several canvases,
fixed structure tokens in every step event, enums/consts/bounds, json_object, response_format, prefix and
suffix around the JSON, batches, and clear errors. Every output is parsed and validated with jsonschema."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch

import dgemma
from dgemma import constraints
from dgemma.engine import CanvasUpdate, Engine, StepUpdate
from dgemma.structured import Limits, SchemaError, check_schema, compile_schema
from dgemma.structured import numbers
from dgemma.structured.layout import FIXED
from dgemma.tokenizer import byte_tokenizer

FAST = {"max_denoising_steps": 3, "confidence_threshold": 0.0}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 2, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "email": {"type": ["string", "null"], "pattern": "^[a-z]{3,6}@[a-z]{2,5}\\.com$"},
        "role": {"enum": ["admin", "author", "reader"]},
        "scores": {"type": "array", "items": {"type": "number", "minimum": -5, "exclusiveMaximum": 10},
                   "minItems": 1, "maxItems": 4},
        "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^\\d{5}$"},
                                                      "verified": {"type": "boolean"}},
                    "required": ["zip"], "additionalProperties": False},
        "kind": {"const": "person"},
        "note": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "null"}], "description": "ignored"},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(ckpt_factory):
    return dgemma.load(ckpt_factory("tiny"), dtype=torch.float32)


def _valid(text: str, schema: dict):
    value = json.loads(text)
    jsonschema.Draft202012Validator(schema).validate(value)
    return value


@pytest.mark.parametrize("keyword, schema", [
    ("oneOf", {"type": "object", "properties": {"x": {"oneOf": [{"type": "string"}]}}}),
    ("$ref", {"$ref": "#/$defs/a", "$defs": {"a": {"type": "string"}}}),
    ("allOf", {"allOf": [{"type": "string"}]}),
    ("not", {"not": {"type": "string"}}),
    ("patternProperties", {"type": "object", "patternProperties": {"^a": {}}}),
    ("format", {"type": "string", "format": "email"}),
    ("multipleOf", {"type": "integer", "multipleOf": 3}),
    ("uniqueItems", {"type": "array", "uniqueItems": True}),
    ("if", {"if": {"type": "string"}, "then": {}}),
    ("dependentRequired", {"type": "object", "dependentRequired": {"a": ["b"]}}),
    ("type", {"type": ["string", "integer"]}),
    ("anyOf", {"anyOf": [{"type": "string"}, {"type": "integer"}]}),
    ("pattern", {"type": "string", "pattern": "^(ab|cd)$"}),
    ("maxLength", {"type": "string", "minLength": 5, "maxLength": 2}),
    ("items", {"type": "array", "items": [{"type": "string"}]}),
])
def test_unsupported_keywords_are_schema_errors_naming_them(keyword, schema):
    with pytest.raises(SchemaError) as info:
        check_schema(schema)
    assert info.value.keyword == keyword and keyword in str(info.value)
    assert isinstance(info.value, ValueError)


def test_errors_say_where():
    with pytest.raises(SchemaError, match=r"unsupported JSON Schema keyword `oneOf` at /properties/x"):
        check_schema({"type": "object", "properties": {"x": {"oneOf": []}}})
    check_schema(PERSON)  # annotations (description) are ignored


def test_integer_digit_sets_write_only_values_within_bounds():
    r = random.Random(0)
    cases = [(0, 0), (0, 9), (0, 255), (137, 142), (1000, 1000), (99, 101)]
    cases += [(lo, lo + r.randint(0, 2000)) for lo in (r.randint(0, 5000) for _ in range(150))]
    for lo, hi in cases:
        m = numbers.magnitude(lo, hi)
        got = numbers.values(m)
        assert got and min(got) >= lo and max(got) <= hi and len(got) == m.count, (lo, hi, m)
    assert numbers.magnitude(0, 999).count == 1000  # a full range is written whole


def test_token_classes_skip_specials_partial_bytes_and_ids_beyond_the_tokenizer():
    tok = byte_tokenizer(512)
    plan = compile_schema({"type": "string"}, tok, 16)
    specials = torch.tensor(sorted(tok.special_ids))
    assert not bool(plan.table[:, specials].any())
    high_bytes = [t for t in range(512) if tok.decode([t]) == "\ufffd"]
    assert high_bytes and not bool(plan.table[:, high_bytes].any())
    wide = plan.table_for(1024)
    assert wide.shape[1] == 1024 and not bool(wide[:, 512:].any())


def test_a_schema_of_several_canvases_validates_for_several_seeds(engine):
    c = engine.config.canvas_length
    for seed in range(3):
        out = engine.generate("Describe a person as JSON", json_schema=PERSON, seed=seed, **FAST)
        assert out.finish_reason == "stop" and len(out.steps) > 6  # many canvases of 16
        value = _valid(out.text, PERSON)
        assert value["kind"] == "person" and value["role"] in ("admin", "author", "reader")
        assert 0 <= value["age"] <= 130 and all(-5 <= s < 10 for s in value["scores"])
        assert len(out.token_ids) <= len(out.steps) * c


def test_fixed_structure_tokens_hold_in_every_step_event(engine):
    plan = compile_schema(PERSON, engine.tokenizer, engine.config.canvas_length, eos_token_id=1)
    fixed = {p: pos.token for p, pos in enumerate(plan.builder.positions) if pos.kind == FIXED}
    c, steps, last = engine.config.canvas_length, 0, None
    for event in engine.stream("x", json_schema=PERSON, seed=5, **FAST):
        if isinstance(event, StepUpdate):
            steps += 1
            for i, t in enumerate(event.draft_tokens):
                if event.canvas * c + i in fixed:
                    assert t == fixed[event.canvas * c + i]
        else:
            assert isinstance(event, CanvasUpdate)
            last = event
    assert steps > 6 and last.finished
    _valid(last.completion.text, PERSON)


def test_enum_const_and_bounds_hold(engine):
    schema = {"type": "object", "properties": {
        "color": {"enum": ["red", "rose", "ruby", 7, None, True, [1, 2], {"a": 1}]},
        "n": {"type": "integer", "minimum": -5, "maximum": 5}, "k": {"const": {"fixed": [1, "two"]}},
        "x": {"type": "integer", "exclusiveMinimum": 250, "exclusiveMaximum": 256},
        "flag": {"type": "boolean"}, "nothing": {"type": "null"}}, "required": ["color"]}
    seen = set()
    for seed in range(6):
        value = _valid(engine.generate("q", json_schema=schema, seed=seed, **FAST).text, schema)
        assert value["k"] == {"fixed": [1, "two"]} and -5 <= value["n"] <= 5 and 250 < value["x"] < 256
        seen.add(json.dumps(value["color"]))
    assert len(seen) > 1  # the model chooses among the alternatives


def test_json_object_and_response_format(engine):
    for fmt in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}):
        out = engine.generate("obj", response_format=fmt, seed=1, **FAST)
        value = json.loads(out.text)
        assert isinstance(value, dict) and value
        if fmt["type"] == "json_schema":
            _valid(out.text, PERSON)
    streamed = list(engine.stream("obj", response_format={"type": "json_object"}, step_events=False, seed=2, **FAST))
    assert isinstance(json.loads(streamed[-1].completion.text), dict)
    assert isinstance(json.loads("".join(e.text_delta for e in streamed)), dict)
    plain = engine.generate("obj", response_format={"type": "text"}, seed=1, max_new_tokens=16, **FAST)
    assert plain.token_ids  # no constraint


def test_prefix_and_suffix_surround_the_json(engine):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}
    plan = compile_schema(schema, engine.tokenizer, engine.config.canvas_length, eos_token_id=1,
                          prefix="<|turn>call:weather", suffix="<turn|>")
    out = engine.generate("w", constraint=plan.constraint(), max_new_tokens=plan.max_new_tokens, seed=3, **FAST)
    text = engine.decode(out.token_ids, skip_special_tokens=False)
    assert text.startswith("<|turn>call:weather{") and text.endswith("<turn|>")
    assert out.token_ids[0] == engine.tokenizer.token_to_id("<|turn>")  # the special token, not its characters
    _valid(text[len("<|turn>call:weather"):-len("<turn|>")], schema)
    plain = compile_schema(schema, engine.tokenizer, 16, prefix="CALL ", suffix=" END", limits=Limits(string_tokens=3))
    ids = [pos.token for pos in plain.builder.positions[:5]]
    assert engine.decode(ids) == "CALL "


def test_batches_rows_and_combined_constraints(engine):
    prompts = ["one", "two words", "three words here"]
    start = constraints.initial(list(range(100, 116)))  # the user's constraint, combined with the schema's
    outs = engine.generate(prompts, json_schema=PERSON, constraint=start, seed=4, **FAST)
    assert len(outs) == 3 and len({o.text for o in outs}) > 1
    for out in outs:
        _valid(out.text, PERSON)
    plan = compile_schema(PERSON, engine.tokenizer, engine.config.canvas_length, eos_token_id=1)
    one = plan.constraint()  # one constraint for a batch: each row gets a copy with its own state
    outs = engine.generate(prompts, constraint=one, max_new_tokens=plan.max_new_tokens, seed=4, **FAST)
    assert all(_valid(o.text, PERSON) for o in outs) and one.closed == [False] * len(one.closed)


def test_max_new_tokens_is_raised_and_whitespace_pads_without_eos(engine):
    schema = {"type": "array", "items": {"type": "integer"}, "maxItems": 3}
    out = engine.generate("n", json_schema=schema, max_new_tokens=2, seed=0, **FAST)
    _valid(out.text, schema)
    free = engine.generate("n", json_schema=schema, max_new_tokens=48, eos_token_id=(), seed=0, **FAST)
    assert free.finish_reason == "length" and len(free.token_ids) == 48
    _valid(free.text, schema)


def test_clear_errors(engine):
    with pytest.raises(ValueError, match="not both"):
        engine.generate("x", json_schema={}, response_format={"type": "json_object"})
    with pytest.raises(ValueError, match="response_format"):
        engine.generate("x", response_format={"type": "yaml"})
    with pytest.raises(SchemaError, match="oneOf"):
        engine.generate("x", json_schema={"oneOf": []})
    huge = {"type": "array", "items": {"type": "string", "minLength": 100}, "minItems": 50}
    with pytest.raises(ValueError, match="JSON layout needs"):
        engine.generate("x", json_schema=huge)
    bare = Engine(engine.model, None)
    with pytest.raises(ValueError, match="no tokenizer"):
        bare.generate([2, 3], json_schema={"type": "object"})
    plan = compile_schema({"type": "boolean"}, engine.tokenizer, 12)
    with pytest.raises(ValueError, match="compiled for canvases of 12"):
        engine.generate("x", constraint=plan.constraint())


def _sentencepiece_like():
    """A Gemma-like tokenizer: ``▁`` for space, multi-character pieces, byte fallback (so a lone byte of a
    UTF-8 character decodes to U+FFFD), special tokens, and a decoder that strips one leading space."""
    from tokenizers import AddedToken, Tokenizer as HF, decoders, models, normalizers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    pieces = [(s, 0.0) for s in specials] + [(f"<0x{b:02X}>", -10.0) for b in range(256)]
    chars = [chr(c) for c in range(33, 127)] + ["▁"]
    pieces += [(ch, -2.0) for ch in chars]
    pieces += [(p, -1.0) for p in ["▁the", "▁a", "ab", "name", '":', '{"', "ing", "▁▁", "null", "true", "12"]]
    tok = HF(models.Unigram(pieces, unk_id=3, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    from dgemma.tokenizer import Tokenizer

    return Tokenizer(tok, {"eos_token": "<eos>"})


def test_a_sentencepiece_like_tokenizer():
    from test_structured_property import _simulate

    tok = _sentencepiece_like()
    schema = {"type": "object", "properties": {
        "name": {"type": "string"}, "short": {"type": "string", "maxLength": 3},
        "tag": {"enum": ["the", "a b", "é"]}, "n": {"type": ["integer", "null"], "minimum": 10, "maximum": 12},
        "ok": {"type": "boolean"}}, "required": ["name"]}
    plan = compile_schema(schema, tok, 16, eos_token_id=1, limits=Limits(string_tokens=4))
    v = plan.builder.v
    assert v.texts[tok.token_to_id("▁the")] == " the"  # the leading space survives (decoded after an anchor)
    assert v.texts[tok.token_to_id("<0xC3>")] is None and v.texts[1] is None  # a partial byte, a special
    rows = {str(k[1]): plan.table[i] for i, k in enumerate(plan.keys)}
    assert bool(rows["('str', None)"][tok.token_to_id("▁the")])  # multi-character pieces in free strings
    assert not bool(rows["('str', 1)"][tok.token_to_id("▁the")])  # not where maxLength bounds characters
    texts = set()
    for seed in range(40):
        ids = _simulate(plan, seed, len(v.texts))
        text = tok.decode(ids[:-1])
        texts.add(text)
        _valid(text, schema)
    assert len(texts) == 40
