"""Structured output, property-tested: generated schemas within the supported subset (nested objects and
arrays, strings with lengths and patterns, integers and numbers with bounds, enums, consts, booleans, nulls,
unions with null) give JSON that parses and validates with the ``jsonschema`` library.

Two levels: a model-free check draws every value position uniformly from its allowed set (any combination the
sets allow can be the last step's draw, so this is the guarantee itself), and the random-weight tiny model
(canvas 16: most layouts span several canvases) generates through the engine, several seeds per schema."""

from __future__ import annotations

import functools
import json

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dgemma
from dgemma.structured import Limits, SchemaError, check_schema, compile_schema
from dgemma.tokenizer import byte_tokenizer

SMALL = Limits(string_tokens=4, array_items=2, object_entries=2, int_digits=3, pattern_repeat=2)
NAMES = ["a", "id", "name", "x y", "n2", "ü", "tags", "v"]
ATOMS = ["[a-z]", "[0-9A-F]", "\\d", "\\w", "[A-Z_]", "x", "-", "\\.", "[^a-z\"]", "."]
QUANTS = ["", "{2}", "{1,3}", "?", "+", "*", "{0,2}"]


def _pattern(draw) -> str:
    atoms = draw(st.lists(st.tuples(st.sampled_from(ATOMS), st.sampled_from(QUANTS)), min_size=1, max_size=3))
    body = "".join(a + q for a, q in atoms)
    return ("^" if draw(st.booleans()) else "") + body + ("$" if draw(st.booleans()) else "")


@st.composite
def strings(draw) -> dict:
    s: dict = {"type": "string"}
    kind = draw(st.sampled_from(["plain", "bounded", "pattern", "enum", "const"]))
    if kind == "bounded":
        lo = draw(st.integers(0, 3))
        s["minLength"] = lo
        if draw(st.booleans()):
            s["maxLength"] = lo + draw(st.integers(0, 6))
    elif kind == "pattern":
        s["pattern"] = _pattern(draw)
    elif kind == "enum":
        s["enum"] = draw(st.lists(st.text("abcé \"\\", min_size=0, max_size=4), min_size=1, max_size=4, unique=True))
    elif kind == "const":
        s["const"] = draw(st.text("xyz", max_size=3))
    return s


@st.composite
def numbers(draw) -> dict:
    kind = draw(st.sampled_from(["integer", "number"]))
    s: dict = {"type": kind}
    lo = draw(st.one_of(st.none(), st.integers(-2000, 2000)))
    hi = None if draw(st.booleans()) else (lo if lo is not None else 0) + draw(st.integers(0, 3000))
    if lo is not None:
        s["exclusiveMinimum" if draw(st.booleans()) else "minimum"] = lo - (1 if "exclusiveMinimum" in s else 0)
        if "exclusiveMinimum" in s:
            s["exclusiveMinimum"] = lo - 1
    if hi is not None:
        if draw(st.booleans()):
            s["exclusiveMaximum"] = hi + (0.5 if kind == "number" else 1)
        else:
            s["maximum"] = hi
    return s


def leaves() -> st.SearchStrategy:
    values = st.one_of(st.none(), st.booleans(), st.integers(-50, 50), st.text("ab", max_size=2))
    return st.one_of(strings(), numbers(), st.just({"type": "boolean"}), st.just({"type": "null"}),
                     st.lists(values, min_size=1, max_size=4, unique_by=json.dumps).map(lambda v: {"enum": v}),
                     values.map(lambda v: {"const": v}), st.just({}))


def _nullable(s: dict, how: int) -> dict:
    if how == 1 and isinstance(s.get("type"), str) and s["type"] != "null":
        return {**s, "type": [s["type"], "null"]}
    if how == 2:
        return {"anyOf": [s, {"type": "null"}]}
    return s


@st.composite
def containers(draw, children) -> dict:
    if draw(st.booleans()):
        names = draw(st.lists(st.sampled_from(NAMES), min_size=0, max_size=3, unique=True))
        props = {n: draw(children) for n in names}
        s = {"type": "object", "properties": props, "required": [n for n in names if draw(st.booleans())]}
        if draw(st.booleans()):
            s["additionalProperties"] = False
        return s
    s = {"type": "array", "items": draw(children)}
    lo = draw(st.integers(0, 2))
    if draw(st.booleans()):
        s["minItems"] = lo
    if draw(st.booleans()):
        s["maxItems"] = lo + draw(st.integers(0, 2))
    return s


@st.composite
def schemas(draw) -> dict:
    tree = st.recursive(leaves(), lambda children: containers(children), max_leaves=5)
    s = draw(tree)
    return _nullable(s, draw(st.integers(0, 4)))


def _simulate(plan, seed: int, vocab: int) -> list[int]:
    """One answer with every value position drawn uniformly from its allowed set (uniform noise elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    con = plan.constraint()
    con.validate(plan.canvas_length, vocab)
    out: list[int] = []
    for k in range(-(-plan.max_new_tokens // plan.canvas_length)):
        rule = con.start(k, 0)
        rule.check(plan.canvas_length, vocab)
        x = torch.randint(0, vocab, (plan.canvas_length,), generator=g)  # [C]
        if rule.set_index is not None:
            for i, s in enumerate(rule.set_index.tolist()):
                if s >= 0:
                    ids = rule.table[s].nonzero().flatten()
                    x[i] = ids[torch.randint(0, len(ids), (1,), generator=g)]
        fixed = rule.fixed if rule.fixed is not None else torch.full_like(x, -1)
        x = torch.where(fixed >= 0, fixed, x)
        y = con.finish(k, x)
        assert bool(((fixed < 0) | (y == fixed)).all()), "finish changed a fixed token"
        out += y.tolist()
    return out[:plan.max_new_tokens]


def _valid(text: str, schema: dict) -> None:
    jsonschema.Draft202012Validator(schema).validate(json.loads(text))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=schemas())
def test_every_combination_the_sets_allow_validates(schema):
    tok = byte_tokenizer(512)
    plan = compile_schema(schema, tok, 16, eos_token_id=1, limits=SMALL)
    for seed in range(8):
        ids = _simulate(plan, seed, 512)
        assert ids[-1] == 1 and 1 not in ids[:-1]
        _valid(tok.decode(ids[:-1]), schema)


@pytest.fixture(scope="module")
def engine(ckpt_factory):
    return dgemma.load(ckpt_factory("tiny"), dtype=torch.float32)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(schema=schemas(), seed=st.integers(0, 2**31))
def test_the_tiny_model_writes_valid_json_for_every_seed(engine, schema, seed):
    plan = compile_schema(schema, engine.tokenizer, engine.config.canvas_length, eos_token_id=1, limits=SMALL)
    prompts = ["a", "bc", "xyz"]  # three rows, each its own fresh constraint
    outs = engine.generate(prompts, constraint=[plan.constraint() for _ in prompts], seed=seed,
                           max_new_tokens=plan.max_new_tokens, max_denoising_steps=3, confidence_threshold=0.0,
                           eos_token_id=1)
    for out in outs:
        assert out.finish_reason == "stop"
        _valid(out.text, schema)


_KEYS = ["type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "minLength",
         "maxLength", "enum", "const", "pattern", "minimum", "maximum", "exclusiveMinimum", "anyOf", "title"]
_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(), st.text(max_size=5),
                  st.sampled_from(["object", "array", "string", "integer", "number", "boolean", "null", "x"]))
_ANY_JSON = st.recursive(_LEAF, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.sampled_from(_KEYS), st.text(max_size=3)), inner,
                                                 max_size=4)), max_leaves=12)


@functools.lru_cache(maxsize=1)
def _tokenizer():
    return byte_tokenizer(512)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(_KEYS), _ANY_JSON, max_size=5))
def test_malformed_schemas_are_a_schema_error_never_a_crash(schema):
    """What a client may send as a schema (the server turns SchemaError into a 400; anything else would be a 500)."""
    try:
        check_schema(schema)
    except SchemaError:
        return
    try:
        compile_schema(schema, _tokenizer(), 16, eos_token_id=1)
    except ValueError:
        pass
