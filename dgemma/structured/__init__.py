"""Structured output: JSON Schema -> canvas constraints, so that every answer parses and validates.

``check_schema(schema)`` checks that a schema is within the supported subset (no tokenizer needed);
``compile_schema(schema, tokenizer, canvas_length, eos_token_id=, prefix=, suffix=)`` lays it out as a
:class:`Plan`: ``plan.constraint()`` is a fresh constraint for one request, ``plan.max_new_tokens`` the
answer tokens it needs. Files: ``schema.py`` (the subset, SchemaError), ``pattern.py`` (simple regular
expressions), ``numbers.py`` (integers as digit sets), ``vocab.py`` (token texts and classes),
``layout.py`` (positions, slots, regions), ``plan.py`` (the plan and the constraint: start and finish).
"""

from dgemma.structured.layout import Limits
from dgemma.structured.plan import Plan, SchemaConstraint, compile_schema, request_plan
from dgemma.structured.schema import SchemaError, check_schema, from_response_format
from dgemma.structured.vocab import Vocabulary

__all__ = ["SchemaError", "check_schema", "from_response_format", "compile_schema", "request_plan", "Plan",
           "SchemaConstraint", "Limits", "Vocabulary"]
