"""The OpenAI wire format as pydantic models, the server's limits, and requests -> ``SamplingParams``.

Request bodies follow OpenAI's chat and completions APIs; unknown fields are ignored. dgemma's sampling
options ride along as extra body fields under their ``generation_config.json`` names
(``max_denoising_steps``, ``entropy_bound``, ``t_max``, ``t_min``, ``stability_threshold``,
``confidence_threshold``, ``restarts``, ``restart_entropy``, ``restart_after``, ``parallel_attempts``, plus
``initial_canvas`` / ``pinned_canvas``) and are validated by ``SamplingParams``. ``temperature`` and ``top_p``
are accepted and ignored: the sampler's temperature is the ``t_max`` -> ``t_min`` schedule over the denoising
steps.
``include_drafts: true`` adds a ``draft`` chunk per denoising step to a stream (dgemma's extension);
``ignore_eos: true`` generates ``max_tokens`` tokens whatever the model says (as vLLM's field of that name).
``response_format`` (``json_object`` / ``json_schema``) and forced tool calls are compiled into canvas
constraints by ``dgemma.server.structured``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict

from dgemma.params import SamplingParams

Int = Annotated[int, Strict()]  # a JSON integer: no strings, floats or booleans
Seed = Annotated[int, Strict(), Field(ge=-(2**63), le=2**63 - 1)]

# The sampling options taken from a request body, under their generation_config.json names.
SAMPLING_FIELDS = ("max_denoising_steps", "entropy_bound", "t_max", "t_min", "stability_threshold",
                   "confidence_threshold", "restarts", "restart_entropy", "restart_after", "parallel_attempts",
                   "initial_canvas", "pinned_canvas")


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
             422: "invalid_request_error", 429: "rate_limit_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or self.TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; past these a request gets a 4xx before it is queued."""

    max_tokens: int = 4096  # max_tokens / max_completion_tokens
    max_n: int = 8  # choices per request (n times the prompts of a completions batch)
    max_prompt_tokens: int | None = None  # None: the core's context decides
    max_denoising_steps: int = 1024
    max_restarts: int = 16
    max_parallel_attempts: int = 4  # rows one request adds to each decoder pass
    max_stop: int = 4  # stop strings
    max_body_bytes: int = 1 << 20
    max_queue: int | None = None  # requests waiting for a slot, past it 429 (None: 4 x max_num_seqs)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingFields(_Body):
    """The fields shared by both generation endpoints."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Int = Field(1, ge=1)
    seed: Seed | None = None
    stop: str | list[str] | None = None
    user: str | None = None
    max_tokens: Int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, description="accepted and ignored (see t_max, t_min)")
    top_p: float | None = Field(None, ge=0, le=1, description="accepted and ignored")
    include_drafts: bool = Field(False, description="stream a draft chunk per denoising step")
    ignore_eos: bool = Field(False, description="generate max_tokens tokens even past an end-of-sequence token")
    max_denoising_steps: Int | None = None
    entropy_bound: float | None = None
    t_max: float | None = None
    t_min: float | None = None
    stability_threshold: Int | None = None
    confidence_threshold: float | None = None
    restarts: Int | None = None
    restart_entropy: float | None = None
    restart_after: Int | None = None
    parallel_attempts: Int | None = None
    initial_canvas: list[Int] | None = None
    pinned_canvas: list[Int] | None = None
    response_format: dict[str, Any] | None = None

    def budget(self) -> int | None:
        return self.max_tokens

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str = "{}"


class ToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as the chat template sees it: text parts joined, ``None`` content as ""."""
        out = self.model_dump(exclude_none=True)
        content = self.content
        out["content"] = "".join(p.text for p in content) if isinstance(content, list) else (content or "")
        return out


class FunctionDef(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def enable_thinking(self) -> bool:
        value = (self.chat_template_kwargs or {}).get("enable_thinking", False)
        if not isinstance(value, bool):
            raise ApiError(400, "chat_template_kwargs.enable_thinking must be a boolean",
                           param="chat_template_kwargs.enable_thinking")
        return value

    def uses_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[Int] | list[list[Int]]


def to_sampling_params(req: SamplingFields, defaults: SamplingParams, limits: Limits,
                       canvas_length: int | None = None, vocab_size: int | None = None) -> SamplingParams:
    """The request's SamplingParams over ``defaults`` (seed of choice 0); ApiError(400) names the field."""
    budget = req.budget()
    name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
    if budget is None:
        budget = min(defaults.max_new_tokens, limits.max_tokens)
    elif budget > limits.max_tokens:
        raise ApiError(400, f"{name} is {budget}, above this server's limit of {limits.max_tokens}", param=name)
    if req.n > limits.max_n:
        raise ApiError(400, f"n is {req.n}, above this server's limit of {limits.max_n}", param="n")
    stops = req.stops()
    if len(stops) > limits.max_stop or any(not s for s in stops):
        raise ApiError(400, f"stop takes at most {limits.max_stop} non-empty strings", param="stop")
    for field, most in (("max_denoising_steps", limits.max_denoising_steps), ("restarts", limits.max_restarts),
                        ("parallel_attempts", limits.max_parallel_attempts)):
        value = getattr(req, field)
        if value is not None and value > most:
            raise ApiError(400, f"{field} is {value}, above this server's limit of {most}", param=field)
    for field in ("initial_canvas", "pinned_canvas"):
        _check_canvas(field, getattr(req, field), canvas_length, vocab_size)
    overrides: dict[str, Any] = {k: getattr(req, k) for k in SAMPLING_FIELDS if getattr(req, k) is not None}
    overrides["max_new_tokens"] = budget
    overrides["seed"] = req.seed
    if req.ignore_eos:
        overrides["eos_token_id"] = ()
    try:
        return defaults.replace(**overrides)
    except (ValueError, TypeError) as e:
        found = re.search(r"`(\w+)`", str(e))
        raise ApiError(400, str(e), param=found.group(1) if found else None) from None


def _check_canvas(field: str, value: list[int] | None, length: int | None, vocab: int | None) -> None:
    if value is None:
        return
    if length is not None and len(value) != length:
        raise ApiError(400, f"{field} needs {length} token ids (the canvas length), got {len(value)}", param=field)
    low = -1 if field == "pinned_canvas" else 0
    if vocab is not None and any(t < low or t >= vocab for t in value):
        extra = " or -1 (free)" if low < 0 else ""
        raise ApiError(400, f"{field} token ids must be in [0, {vocab}){extra}", param=field)


def choice_seed(seed: int | None, i: int) -> int | None:
    """Choice ``i`` of a seeded request samples with ``seed + i`` (a torch generator takes up to 2**64-1)."""
    return None if seed is None else seed + i
