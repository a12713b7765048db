"""The two generation endpoints: a request body -> core requests -> an OpenAI response or an SSE stream.

``start`` checks a request (model, limits, sampling options, prompt length) and queues one core request
per choice (``n`` choices per prompt; with a seed, choice i samples with seed + i) or refuses it with an
``ApiError`` before anything is queued. ``Generation.complete`` collects a whole answer while racing the
client's disconnect; ``Generation.stream`` yields ``data: {...}`` chunks, one per committed canvas (plus a
draft chunk per denoising step with ``include_drafts``) and ``data: [DONE]``. Either way a request that
ends early (client gone, stop string) aborts its core requests, so their slots free before the next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

from dgemma.server.output import ChoiceText
from dgemma.server.protocol import ApiError, ChatCompletionRequest, CompletionRequest, choice_seed, to_sampling_params
from dgemma.server.structured import Forced, forced_output
from dgemma.server.worker import Collector

log = logging.getLogger("dgemma.server")


def chat_prompt(server, body: ChatCompletionRequest) -> list[int]:
    tokenizer = server.engine.tokenizer
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise ApiError(400, f"model {server.model_id} has no chat template: use /v1/completions", param="messages")
    kwargs = {k: v for k, v in (body.chat_template_kwargs or {}).items()
              if isinstance(k, str) and k.isidentifier() and k not in ("messages", "add_generation_prompt")}
    kwargs["enable_thinking"] = body.enable_thinking()
    if body.tools:
        kwargs["tools"] = [t.model_dump(exclude_none=True) for t in body.tools]
    try:
        return tokenizer.encode_chat([m.for_template() for m in body.messages], **kwargs)
    except Exception as e:  # noqa: BLE001 - a template that rejects the conversation (raise_exception, bad kwargs)
        raise ApiError(400, f"the chat template rejected the conversation: {e}", param="messages") from None


def completion_prompts(server, body: CompletionRequest) -> list[list[int]]:
    p = body.prompt
    batch = p if isinstance(p, list) and p and isinstance(p[0], (str, list)) else [p]
    if not batch:
        raise ApiError(400, "prompt is empty", param="prompt")
    try:
        return [server.engine.encode_prompt(one) for one in batch]
    except ValueError as e:
        raise ApiError(400, str(e), param="prompt") from None


def start(server, request, body, chat: bool) -> "Generation":
    """Validate and queue ``body``; raises ApiError (4xx) without queueing anything."""
    t0 = time.monotonic()
    if body.model not in (None, "", server.model_id):
        raise ApiError(404, f"the model {body.model!r} does not exist; this server has {server.model_id!r}",
                       param="model", code="model_not_found")
    cfg = server.engine.config
    params = to_sampling_params(body, server.defaults, server.limits, cfg.canvas_length, cfg.vocab_size)
    forced = forced_output(server, body, chat, body.budget())
    if forced is not None:
        params = params.replace(max_new_tokens=forced.need)
    prompts = [chat_prompt(server, body)] if chat else completion_prompts(server, body)
    if len(prompts) * body.n > server.limits.max_n:
        raise ApiError(400, f"{len(prompts)} prompts x n={body.n} choices is above this server's limit of "
                            f"{server.limits.max_n}", param="n")
    field = "messages" if chat else "prompt"
    most = server.limits.max_prompt_tokens
    for ids in prompts:
        if most is not None and len(ids) > most:
            raise ApiError(400, f"the prompt has {len(ids)} tokens, above this server's limit of {most}",
                           param=field, code="context_length_exceeded")
        try:
            server.core.check(ids, params)
        except ValueError as e:
            raise ApiError(400, str(e), param=field, code="context_length_exceeded") from None
    jobs = [(ids, params.replace(seed=choice_seed(params.seed, i))) for ids in prompts for i in range(body.n)]
    if forced is not None:  # each choice: one request per candidate, each with its own constraint
        jobs = [(ids, p, con) for ids, p in jobs for con in forced.constraints()]
    collector = Collector()
    server.worker.start()
    drafts = bool(body.stream and body.include_drafts) and (forced is None or len(forced.plans) == 1)
    rids = server.worker.submit(jobs, collector, step_events=drafts, max_queue=server.limits.max_queue)
    if rids is None:
        raise ApiError(429, f"the server is busy ({server.worker.queue_depth()} requests waiting); retry shortly",
                       code="queue_full", headers={"Retry-After": "1"})
    if body.user:
        log.info("request %s from user %r: %d choices", rids[0], body.user, len(rids))
    return Generation(server, body, chat, prompts, rids, collector, t0, 1 if forced is None else len(forced.plans))


class Generation:
    """One HTTP request's choices in flight. With ``candidates`` k > 1 (a forced call among k tools), choice
    i runs as core requests ``i*k .. i*k+k-1``; its text is the most confident candidate's, sent whole when
    all k are done."""

    def __init__(self, server, body, chat: bool, prompts: list[list[int]], rids: list[int],
                 collector: Collector, t0: float, candidates: int = 1):
        self.server, self.body, self.chat, self.prompts = server, body, chat, prompts
        self.rids, self.collector, self.t0, self.k = rids, collector, t0, candidates
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        engine = server.engine
        tools = chat and body.uses_tools()
        n = len(rids) // candidates
        self.texts = [ChoiceText(lambda ids, skip: engine.decode(ids, skip_special_tokens=skip), chat,
                                 body.stops(), tools) for _ in range(n)]
        self.finish: list[str | None] = [None] * n
        self.results: list[Any] = [None] * n
        self.pending: dict[int, tuple[list[int], Any]] = {}  # candidate index -> (its tokens, its result)
        self.first_canvas = False

    # ------------------------------------------------------------------ shared
    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finish)

    def _candidate(self, index: int, update):
        """Collect a candidate's update (k > 1); the choice's update once all its candidates are done."""
        choice = index // self.k
        tokens, _ = self.pending.get(index, ([], None))
        self.pending[index] = (tokens + list(update.tokens or []), update.result if update.finished else None)
        done = [self.pending.get(choice * self.k + j) for j in range(self.k)]
        if any(d is None or d[1] is None for d in done):
            return None
        best = Forced.best([list(getattr(r, "entropy", []) or []) for _, r in done])
        return type(update)(tokens=done[best][0], finished=True, result=done[best][1])

    def _take(self, index: int, update) -> tuple[dict[str, Any], bool]:
        """Apply one core request's update to its choice (``index`` // k): (the choice's stream delta, whether
        it just finished). Raises ApiError on failure."""
        if update.error is not None:
            raise ApiError(update.status, update.error, type=None if update.status < 500 else "server_error")
        if self.k > 1:
            update = self._candidate(index, update)
            if update is None:
                return {}, False
            index //= self.k
        if self.finish[index] is not None:
            return {}, False
        delta: dict[str, Any] = {}
        if update.tokens:
            if not self.first_canvas:
                self.first_canvas = True
                self.server.metrics.first_canvas.observe(time.monotonic() - self.t0)
            delta = self.texts[index].feed(update.tokens)
        text = self.texts[index]
        if text.stopped:
            self.server.worker.abort(self.rids[index * self.k:(index + 1) * self.k])
            self.finish[index] = "stop"
        elif update.finished:
            self.results[index] = update.result
            self.finish[index] = getattr(update.result, "finish_reason", "stop") or "stop"
        else:
            return delta, False
        return delta, True

    def _usage(self) -> dict[str, Any]:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(t.tokens) for t in self.texts)
        cached = max([getattr(r, "cached_tokens", 0) or 0 for r in self.results if r is not None], default=0)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def _reason(self, index: int) -> str:
        if self.texts[index].called_tools:
            return "tool_calls"
        reason = self.finish[index] or "stop"
        return reason if reason in ("stop", "length") else "stop"

    def _abort_rest(self) -> bool:
        """Abort the choices still running; whether there were any."""
        left = [rid for i, rid in enumerate(self.rids) if self.finish[i // self.k] is None]
        self.server.worker.abort(left)
        return bool(left)

    def _metrics(self, status: str) -> None:
        self.server.metrics.request(status, time.monotonic() - self.t0)

    # ------------------------------------------------------------------ whole answer
    async def complete(self, request) -> dict[str, Any] | None:
        """The whole response, or None when the client went away first (its choices are then aborted)."""
        work = asyncio.ensure_future(self._collect())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the handler itself was cancelled (shutdown)
            work.cancel()
            self._abort_rest()
            self._metrics("aborted")
            raise
        finally:
            gone.cancel()
        if not work.done():
            work.cancel()
            self._abort_rest()
            self._metrics("aborted")
            return None
        try:
            work.result()
        except ApiError as e:
            self._abort_rest()
            if e.status >= 500:  # (a 4xx is counted as rejected by the app's error handler)
                self._metrics("error")
            raise
        self._metrics("ok")
        return self._response()

    async def _collect(self) -> None:
        while not self.done:
            for index, update in (await self.collector.get()).items():
                self._take(index, update)

    def _response(self) -> dict[str, Any]:
        choices = []
        for i, text in enumerate(self.texts):
            reasoning, content, calls = text.result()
            if not self.chat:
                choices.append({"index": i, "text": content, "finish_reason": self._reason(i), "logprobs": None})
                continue
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if reasoning is not None:
                message["reasoning_content"] = reasoning
            reason = self._reason(i)
            if calls:
                from dgemma.server.tools import openai_tool_calls

                message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in openai_tool_calls(calls)]
                message["content"] = content or None
                reason = "tool_calls"
            choices.append({"index": i, "message": message, "finish_reason": reason, "logprobs": None})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.server.model_id, "choices": choices,
                "usage": self._usage(), "system_fingerprint": None}

    # ------------------------------------------------------------------ stream
    def _chunk(self, index: int | None, delta: dict[str, Any], reason: str | None = None, **extra) -> str:
        if self.chat:
            choices = [] if index is None else [{"index": index, "delta": delta, "finish_reason": reason,
                                                 "logprobs": None}]
            obj = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                   "model": self.server.model_id, "choices": choices}
        else:
            choices = [] if index is None else [{"index": index, "text": delta.get("content", ""),
                                                 "finish_reason": reason, "logprobs": None}]
            obj = {"id": self.id, "object": "text_completion", "created": self.created,
                   "model": self.server.model_id, "choices": choices}
        if self._include_usage():
            obj["usage"] = None
        obj.update(extra)
        return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"

    def _include_usage(self) -> bool:
        return bool(self.body.stream_options and self.body.stream_options.include_usage)

    def _draft(self, index: int, step) -> str:
        engine, ids = self.server.engine, list(step.draft)
        draft = {"canvas": step.canvas, "step": step.step, "attempt": getattr(step, "attempt", 0),
                 "text": engine.decode(ids),
                 "settled": int(sum(bool(a) for a in step.accepted_mask)) if step.accepted_mask else step.accepted,
                 "mean_entropy": float(step.mean_entropy), "canvas_length": len(ids),
                 # per position: its text and whether it kept its sample this step (the playground marks them)
                 "tokens": [engine.decode([t]) for t in ids], "settled_mask": [bool(a) for a in step.accepted_mask]}
        return self._chunk(index, {}, draft=draft)

    async def stream(self) -> AsyncIterator[str]:
        status = "aborted"
        try:
            if self.chat:
                for i in range(len(self.rids)):
                    yield self._chunk(i, {"role": "assistant", "content": ""})
            while not self.done:
                for index, update in sorted((await self.collector.get()).items()):
                    if update.draft is not None and self.body.include_drafts and self.finish[index // self.k] is None:
                        yield self._draft(index, update.draft)  # (drafts are off for k > 1 candidates)
                    delta, finished = self._take(index, update)
                    index //= self.k
                    if finished:
                        delta = _merge(delta, self.texts[index].finish())
                        yield self._chunk(index, delta, self._reason(index))
                    elif delta:
                        yield self._chunk(index, delta)
            if self._include_usage():
                yield self._chunk(None, {}, usage=self._usage())
            yield "data: [DONE]\n\n"
            status = "ok"
        except ApiError as e:
            status = "error" if e.status >= 500 else "rejected"
            yield "data: " + json.dumps(e.body()) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self._abort_rest()
            self._metrics(status)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, [] if isinstance(v, list) else "") + v
    return out


async def _disconnected(request) -> None:
    """Return when the client has gone away (``http.disconnect``)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
