"""Outputs a request forces: ``response_format`` JSON and forced tool calls, as canvas constraints.

``forced_output`` reads a request's ``response_format`` (``{"type": "json_object"}`` or ``{"type":
"json_schema", "json_schema": {"schema": ...}}``) and, for chat, ``tools`` with ``tool_choice`` ``"required"``
or ``{"type": "function", "function": {"name": ...}}``, and compiles them with ``dgemma.structured``: every
answer then parses and validates. A forced call is written in Gemma 4's tool-call syntax around a JSON
object of arguments (``<|tool_call>call:NAME{...}<tool_call|>``), which ``dgemma.server.tools`` parses into
``tool_calls``. With ``"required"`` and several tools, each choice runs one candidate per tool and keeps the
one the model is most sure of (lowest mean entropy over the positions it chose, ``RowResult.entropy``).

Everything a request gets wrong is an ``ApiError`` (400) before anything is queued: a schema keyword that
cannot be compiled is named, never a 500 and never an unvalidated answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dgemma.server.protocol import ApiError
from dgemma.server.tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from dgemma.structured import SchemaError, check_schema, compile_schema, from_response_format


@dataclass
class Forced:
    """The alternatives of a forced answer: one compiled plan per candidate (one, or one per tool)."""

    plans: list[Any]
    need: int  # answer tokens the longest layout needs

    def constraints(self) -> list[Any]:
        """Fresh constraints (they keep per-request state), one per candidate."""
        return [plan.constraint() for plan in self.plans]

    @staticmethod
    def best(entropies: list[list[float]]) -> int:
        """The candidate whose canvases the model was most sure of (mean of their mean entropies)."""
        means = [sum(e) / len(e) if e else float("inf") for e in entropies]
        return min(range(len(means)), key=means.__getitem__)


def _json_format(body) -> tuple[bool, dict[str, Any] | None]:
    """``(JSON asked for, its schema or None for any object)`` of the request's ``response_format``."""
    if body.response_format is None:
        return False, None
    try:
        return from_response_format(body.response_format)
    except SchemaError as e:
        raise ApiError(400, str(e), param=f"response_format.{e.keyword}") from None


def _forced_tools(body) -> list[Any] | None:
    """The tools a chat request forces a call of (None: the model may answer in text)."""
    choice = getattr(body, "tool_choice", None)
    tools = getattr(body, "tools", None) or []
    if choice in (None, "auto", "none"):
        return None
    if not tools:
        raise ApiError(400, "tool_choice forces a tool call but the request has no tools", param="tool_choice")
    if choice == "required":
        return list(tools)
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        found = [t for t in tools if t.function.name == name]
        if not found:
            raise ApiError(400, f"tool_choice names the function {name!r}, which is not among the tools",
                           param="tool_choice")
        return found[:1]
    raise ApiError(400, 'tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                        '{"name": ...}}', param="tool_choice")


def _check(schema: dict[str, Any] | None, param: str) -> None:
    if schema is None:
        return
    try:
        check_schema(schema)
    except SchemaError as e:
        raise ApiError(400, f"{param}: {e}", param=param, code="unsupported_schema") from None


def forced_output(server, body, chat: bool, budget: int | None) -> Forced | None:
    """The compiled alternatives of what ``body`` forces, or None. ``budget``: the request's max_tokens
    (None: not given). Raises ApiError(400) for anything that cannot be honoured."""
    wants_json, json_schema = _json_format(body)
    tools = _forced_tools(body) if chat else None
    if not wants_json and tools is None:
        return None
    if wants_json and tools is not None:
        raise ApiError(400, "response_format cannot be combined with a forced tool call (tool_choice)",
                       param="response_format")
    param = "response_format" if tools is None else "tool_choice"
    if body.stops():
        raise ApiError(400, f"stop cannot be combined with {param}: a stop string could cut the structured output",
                       param="stop")
    if body.ignore_eos:
        raise ApiError(400, f"ignore_eos cannot be combined with {param}: the structured output ends the answer",
                       param="ignore_eos")
    engine = server.engine
    if engine.tokenizer is None:
        raise ApiError(400, f"model {server.model_id} has no tokenizer, so it cannot write {param} output",
                       param=param)
    if tools is None:
        alternatives = [(json_schema, "", "", "response_format.json_schema.schema")]
    else:
        alternatives = []
        for tool in tools:
            schema = tool.function.parameters or {"type": "object", "properties": {}}
            index = body.tools.index(tool)
            alternatives.append((schema, f"{TOOL_CALL_OPEN}call:{tool.function.name}", TOOL_CALL_CLOSE,
                                 f"tools[{index}].function.parameters"))
    cfg = engine.config
    eos = engine.defaults.eos_token_id
    plans = []
    for schema, prefix, suffix, where in alternatives:
        _check(schema, where)
        try:
            plans.append(compile_schema(schema, engine.tokenizer, cfg.canvas_length,
                                        eos_token_id=eos[0] if eos else None, prefix=prefix, suffix=suffix))
        except ValueError as e:  # SchemaError included: what the tokenizer or the layout cannot do
            raise ApiError(400, f"{where}: {e}", param=where, code="unsupported_schema") from None
    need = max(plan.max_new_tokens for plan in plans)
    most = server.limits.max_tokens
    if need > most:
        raise ApiError(400, f"the {param} output needs {need} tokens, above this server's limit of {most}",
                       param=param)
    if budget is not None and budget < need:
        name = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
        raise ApiError(400, f"{name} is {budget}, but the {param} output needs {need} tokens", param=name)
    return Forced(plans, need)
