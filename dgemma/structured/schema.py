"""The supported JSON Schema subset: :func:`check_schema` reads a schema into a small tree of nodes
(:class:`Obj`, :class:`Arr`, :class:`Str`, :class:`Int`, :class:`Choice`, :class:`Nullable`) or raises
:class:`SchemaError` naming the keyword it cannot honour. No tokenizer is needed (the server answers 400
from it before queuing). :func:`accepts` is a validator for the same subset (enum values are filtered by
the rest of their schema with it).

Supported: ``type`` (one type, or a type with ``"null"``), ``enum``, ``const``, ``anyOf: [X, {"type":
"null"}]``; objects: ``properties``, ``required``, ``additionalProperties`` (bool or a schema); arrays:
``items``, ``minItems``, ``maxItems``; strings: ``minLength``, ``maxLength``, ``pattern`` (see
``pattern.py``); integers and numbers: ``minimum``, ``maximum``, ``exclusiveMinimum``, ``exclusiveMaximum``
(numbers are written as integers, so a number's range must hold an integer). Annotations (``title``,
``description``, ``default``, ``examples``, ``$schema``, ``$comment``, ``$id``, ...) are ignored.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from dgemma.structured import pattern as patterns

ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$comment", "$id",
                         "deprecated", "readOnly", "writeOnly"})
GENERIC = frozenset({"type", "enum", "const", "anyOf"})
BY_TYPE = {
    "object": frozenset({"properties", "required", "additionalProperties"}),
    "array": frozenset({"items", "minItems", "maxItems"}),
    "string": frozenset({"minLength", "maxLength", "pattern"}),
    "integer": frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}),
}
BY_TYPE["number"] = BY_TYPE["integer"]
TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")
KNOWN = ANNOTATIONS | GENERIC | frozenset().union(*BY_TYPE.values())


class SchemaError(ValueError):
    """A schema outside the supported subset; ``keyword`` names the keyword (or value) at fault."""

    def __init__(self, message: str, keyword: str | None = None):
        super().__init__(message)
        self.keyword = keyword


# ------------------------------------------------------------------ the tree
@dataclass
class Obj:
    props: list[tuple[str, Any]]  # (name, node) in schema order: every one is written
    extra: Any = None  # node of free entries (an object with no listed properties); None: none


@dataclass
class Arr:
    item: Any
    min: int
    max: int | None


@dataclass
class Str:
    min: int = 0
    max: int | None = None
    atoms: list | None = None  # pattern atoms (pattern.Atom); None: any characters


@dataclass
class Int:
    lo: int | None = None
    hi: int | None = None


@dataclass
class Choice:
    values: list = field(default_factory=list)  # JSON values (enum, const, boolean, null)


@dataclass
class Nullable:
    node: Any


def _err(path: str, text: str, keyword: str) -> SchemaError:
    return SchemaError(f"{text} at {path or '/'}", keyword)


def _int(schema: dict, key: str, path: str) -> int | None:
    if key not in schema:
        return None
    v = schema[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or v != int(v):
        raise _err(path, f"`{key}` must be a non-negative integer, got {v!r}", key)
    return int(v)


def _number(schema: dict, key: str, path: str) -> float | int | None:
    if key not in schema:
        return None
    v = schema[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _err(path, f"`{key}` must be a finite number, got {v!r}", key)
    return v


def from_response_format(fmt: Any) -> tuple[bool, dict | None]:
    """``(JSON wanted, its schema or None for any object)`` of an OpenAI ``response_format``: ``{"type":
    "text"}``, ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {"schema": {...}}}``.
    A bad one is a SchemaError whose ``keyword`` is the field at fault (``type``, ``json_schema.schema``)."""
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return False, None
    if kind == "json_object":
        return True, None
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise SchemaError('response_format json_schema needs {"json_schema": {"schema": {...}}}',
                              "json_schema.schema")
        return True, spec["schema"]
    raise SchemaError(f"response_format type {kind!r} is not supported: use text, json_object or json_schema",
                      "type")


def check_schema(schema: Any) -> Any:
    """Raise SchemaError unless ``schema`` is within the supported subset; returns its node tree."""
    return _node(schema, "")


def _node(schema: Any, path: str) -> Any:
    if schema is True:
        return Str()
    if not isinstance(schema, dict):
        raise _err(path, f"a schema must be an object, got {type(schema).__name__}", "type")
    for key in schema:
        if key not in KNOWN:
            raise _err(path, f"unsupported JSON Schema keyword `{key}`", key)
    _check_values(schema, path)
    if "anyOf" in schema:
        return _any_of(schema, path)
    types = schema.get("type")
    if isinstance(types, list):
        if not types or any(t not in TYPES for t in types) or len(set(types)) != len(types):
            raise _err(path, f"`type` must name JSON types, got {types!r}", "type")
        rest = [t for t in types if t != "null"]
        if len(rest) > 1:
            raise _err(path, f"a union of types {rest!r} is not supported (only one type, or a type with null)",
                       "type")
        if rest and len(rest) < len(types):
            inner = _node({**schema, "type": rest[0]}, path)
            return inner if isinstance(inner, Choice) else Nullable(inner)
        types = rest[0] if rest else "null"
    if types is not None and types not in TYPES:
        raise _err(path, f"unknown `type` {types!r}", "type")
    kind = types or _inferred(schema)
    node = _typed(schema, kind, path)
    if "enum" in schema or "const" in schema:
        return _choice(schema, path)
    return node


def _check_values(schema: dict, path: str) -> None:
    """The keywords' values have their JSON Schema types, whatever the schema's type (an enum value is
    checked against every keyword beside it)."""
    for key in ("minItems", "maxItems", "minLength", "maxLength"):
        _int(schema, key, path)
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        _number(schema, key, path)
    if "pattern" in schema and not isinstance(schema["pattern"], str):
        raise _err(path, "`pattern` must be a string", "pattern")
    if "enum" in schema and (not isinstance(schema["enum"], list) or not schema["enum"]):
        raise _err(path, "`enum` must be a non-empty list", "enum")
    if not isinstance(schema.get("properties", {}), dict):
        raise _err(path, "`properties` must be an object", "properties")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise _err(path, "`required` must be a list of property names", "required")


def _inferred(schema: dict) -> str:
    for kind in ("object", "array", "string", "integer"):
        if any(k in schema for k in BY_TYPE[kind]):
            return kind
    return "string"  # an empty schema: any value is valid; a string is written


def _any_of(schema: dict, path: str) -> Any:
    alts = schema["anyOf"]
    if not isinstance(alts, list) or len(alts) != 2 or not all(isinstance(a, dict) for a in alts):
        raise _err(path, "`anyOf` is supported only as [schema, {\"type\": \"null\"}]", "anyOf")
    nulls = [i for i, a in enumerate(alts) if {k: v for k, v in a.items() if k not in ANNOTATIONS} == {"type": "null"}]
    if not nulls:
        raise _err(path, "`anyOf` is supported only as [schema, {\"type\": \"null\"}]", "anyOf")
    if any(k not in ANNOTATIONS for k in schema if k != "anyOf"):
        extra = next(k for k in schema if k not in ANNOTATIONS and k != "anyOf")
        raise _err(path, f"`anyOf` beside `{extra}` is not supported", extra)
    other = 1 - nulls[-1]
    inner = _node(alts[other], f"{path}/anyOf/{other}")
    if isinstance(inner, Choice):
        return Choice(inner.values + ([None] if None not in inner.values else []))
    return inner if isinstance(inner, Nullable) else Nullable(inner)


def _typed(schema: dict, kind: str, path: str) -> Any:
    if kind == "object":
        return _object(schema, path)
    if kind == "array":
        lo, hi = _int(schema, "minItems", path) or 0, _int(schema, "maxItems", path)
        if hi is not None and hi < lo:
            raise _err(path, f"`maxItems` {hi} is below `minItems` {lo}", "maxItems")
        item = schema.get("items", True)
        if isinstance(item, list):
            raise _err(path, "`items` as a list (tuple validation) is not supported", "items")
        return Arr(_node(item, f"{path}/items"), lo, hi)
    if kind == "string":
        return _string(schema, path)
    if kind in ("integer", "number"):
        return _integer(schema, path)
    if kind == "boolean":
        return Choice([True, False])
    return Choice([None])


def _object(schema: dict, path: str) -> Obj:
    props = schema.get("properties", {})
    if not isinstance(props, dict):
        raise _err(path, "`properties` must be an object", "properties")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise _err(path, "`required` must be a list of property names", "required")
    extra = schema.get("additionalProperties", True)
    if not isinstance(extra, (bool, dict)):
        raise _err(path, "`additionalProperties` must be a boolean or a schema", "additionalProperties")
    nodes = [(name, _node(sub, f"{path}/properties/{name}")) for name, sub in props.items()]
    for name in required:
        if name not in props:
            if extra is False:
                raise _err(path, f"required property {name!r} is not allowed by `additionalProperties: false`",
                           "required")
            nodes.append((name, _node(extra if isinstance(extra, dict) else True, f"{path}/required")))
    free = None
    if not nodes and extra is not False:
        free = _node(extra if isinstance(extra, dict) else {"type": "string"}, f"{path}/additionalProperties")
    return Obj(nodes, free)


def _string(schema: dict, path: str) -> Str:
    lo, hi = _int(schema, "minLength", path) or 0, _int(schema, "maxLength", path)
    if hi is not None and hi < lo:
        raise _err(path, f"`maxLength` {hi} is below `minLength` {lo}", "maxLength")
    atoms = None
    if "pattern" in schema:
        p = schema["pattern"]
        if not isinstance(p, str):
            raise _err(path, "`pattern` must be a string", "pattern")
        try:
            atoms = patterns.parse(p)
        except patterns.PatternError as e:
            raise _err(path, f"unsupported `pattern` {p!r}: {e}", "pattern") from None
    return Str(lo, hi, atoms)


def _integer(schema: dict, path: str) -> Int:
    lo = hi = None
    for key, up in (("minimum", False), ("exclusiveMinimum", False), ("maximum", True), ("exclusiveMaximum", True)):
        v = _number(schema, key, path)
        if v is None:
            continue
        exclusive = key.startswith("exclusive")
        if up:
            b = math.ceil(v) - 1 if exclusive else math.floor(v)
            hi = b if hi is None else min(hi, b)
        else:
            b = math.floor(v) + 1 if exclusive else math.ceil(v)
            lo = b if lo is None else max(lo, b)
    if lo is not None and hi is not None and lo > hi:
        raise _err(path, "the bounds leave no integer (numbers are written as integers)", "maximum")
    return Int(lo, hi)


def _choice(schema: dict, path: str) -> Choice:
    if "const" in schema:
        values = [schema["const"]]
        key = "const"
    else:
        values, key = schema["enum"], "enum"
        if not isinstance(values, list) or not values:
            raise _err(path, "`enum` must be a non-empty list", "enum")
    rest = {k: v for k, v in schema.items() if k not in ("enum", "const")}
    kept = []
    for v in values:
        if v not in kept and accepts(rest, v):
            kept.append(v)
    if "const" in schema and "enum" in schema:
        kept = [v for v in kept if v in schema["enum"]]
    if not kept:
        raise _err(path, f"no value of `{key}` satisfies the rest of the schema", key)
    return Choice(kept)


def _is_type(value: Any, kind: str) -> bool:
    if kind == "null":
        return value is None
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == int(value)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, {"string": str, "array": list, "object": dict}[kind])


def accepts(schema: Any, value: Any) -> bool:
    """Whether ``value`` validates against ``schema`` (the supported subset; unknown keywords are ignored)."""
    if schema is True or schema == {}:
        return True
    if not isinstance(schema, dict):
        return False
    if "anyOf" in schema and not any(accepts(a, value) for a in schema["anyOf"]):
        return False
    types = schema.get("type")
    if types is not None and not any(_is_type(value, t) for t in (types if isinstance(types, list) else [types])):
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if "const" in schema and value != schema["const"]:
        return False
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", math.inf):
            return False
        if "pattern" in schema and re.search(schema["pattern"], value) is None:
            return False
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if not (schema.get("minimum", -math.inf) <= value <= schema.get("maximum", math.inf)):
            return False
        if not (schema.get("exclusiveMinimum", -math.inf) < value < schema.get("exclusiveMaximum", math.inf)):
            return False
    elif isinstance(value, list):
        if not (schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", math.inf)):
            return False
        return all(accepts(schema.get("items", True), v) for v in value)
    elif isinstance(value, dict):
        props, extra = schema.get("properties", {}), schema.get("additionalProperties", True)
        if any(r not in value for r in schema.get("required", [])):
            return False
        return all(accepts(props[k] if k in props else extra, v) for k, v in value.items())
    return True
