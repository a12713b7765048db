"""Engine: the public face of dgemma. Owns model, tokenizer and sampling defaults; text in, text out.

``dgemma.load(source)`` builds one; ``generate`` takes one prompt or a list (text or token ids, any
lengths), ``stream`` yields an event per denoising step and per committed canvas, ``chat`` applies the
checkpoint's chat template and splits the thinking channel from the answer.

Every call is a client of one :class:`~dgemma.core.EngineCore` (made at first use, its KV pool growing
as calls need): requests go in, ``step()`` is called until they are done, and each call takes the events of
its own requests. Generators that are open at once (two ``stream`` calls) share the steps; a stream that is
closed early aborts its request. Not thread-safe (the server runs its own core on one thread).
"""

from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from dgemma import genconfig, loading, sampler
from dgemma.config import ModelConfig
from dgemma.constraints import CanvasConstraint, Combined
from dgemma.core import CanvasEvent, EngineCore, Request, RowResult, StepEvent
from dgemma.errors import LoadError
from dgemma.graphs import GraphedDecoder
from dgemma.model import DiffusionGemma
from dgemma.params import SamplingParams
from dgemma.quant.apply import QuantOptions
from dgemma.tokenizer import Tokenizer, split_thinking

Prompt = str | Sequence[int]


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop": an EOS ended it; "length": max_new_tokens reached
    steps: list[int]  # denoising steps of each canvas
    prompt_tokens: int = 0

    @property
    def tokens_per_step(self) -> float:
        return len(self.token_ids) / max(1, sum(self.steps))


@dataclass
class ChatResponse:
    answer: str
    thinking: str | None
    completion: Completion


@dataclass
class StepUpdate:
    """One denoising step of a streamed generation."""

    canvas: int
    step: int
    draft_tokens: list[int]
    accepted: int
    mean_entropy: float
    accepted_mask: list[bool] = field(default_factory=list)  # positions that kept their sampled token
    attempt: int = 0  # with restarts: which denoising of this canvas, from 0 (``step`` counts the canvas's
    # decoder passes across attempts; with parallel_attempts the attempts of one pass share its step)


@dataclass
class CanvasUpdate:
    """One committed canvas of a streamed generation."""

    canvas: int
    tokens: list[int]
    text_delta: str
    finished: bool
    completion: Completion | None = field(default=None, repr=False)  # set on the last event


class Engine:
    def __init__(self, model: DiffusionGemma, tokenizer: Tokenizer | None = None,
                 defaults: SamplingParams | None = None, generation_config: dict[str, Any] | None = None,
                 cuda_graphs: bool | None = None, max_num_seqs: int = 64):
        self.model = model.eval()
        self.max_num_seqs = max_num_seqs  # requests the in-process core runs at once; more wait their turn
        self._core: EngineCore | None = None
        self._outbox: dict[Any, deque] = {}  # events of the requests an open call is waiting for
        # What the sampler runs: the model, or the model with its decoder pass replayed from CUDA graphs
        # (dgemma.graphs; None = on for a model on CUDA; they give the eager tokens, measured on an H200).
        if cuda_graphs is None:
            cuda_graphs = self.model.device.type == "cuda"
        self.runner = GraphedDecoder(self.model) if cuda_graphs else self.model
        self.tokenizer = tokenizer
        # The checkpoint's sampling defaults as one flat dict (dgemma.genconfig's merged view); with ``defaults``
        # given, they are folded in, so that save_pretrained writes what this engine samples with.
        self.generation_config = dict(generation_config or {})
        if defaults is not None:
            self.generation_config = genconfig.with_params(self.generation_config, defaults)
        self.defaults = defaults or SamplingParams.from_generation_config(self.generation_config)
        if self.defaults.eos_token_id is None:
            self.defaults = self.defaults.replace(eos_token_id=model.cfg.eos_token_id)

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg

    # ------------------------------------------------------------------ inputs
    def params(self, params: SamplingParams | None = None, **overrides) -> SamplingParams:
        """``params`` (or the checkpoint's defaults) with ``overrides``; EOS falls back to the model's."""
        p = (params or self.defaults).replace(**overrides) if overrides else (params or self.defaults)
        return p if p.eos_token_id is not None else p.replace(eos_token_id=self.defaults.eos_token_id)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as lists of token ids")
            ids = self.tokenizer.encode(prompt)
            bos = self.config.bos_token_id
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos] + ids
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.config.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        return ids

    def _batch(self, prompts) -> tuple[list[list[int]], bool]:
        """One prompt (text, or a flat sequence / 1-D tensor of ids) or a batch of them."""
        if isinstance(prompts, torch.Tensor):
            if prompts.ndim not in (1, 2):
                raise ValueError("a tensor prompt must be 1-D (one prompt) or 2-D (a batch)")
            prompts = prompts.tolist()
        single = isinstance(prompts, str) or (
            isinstance(prompts, (list, tuple)) and len(prompts) > 0
            and not isinstance(prompts[0], (str, list, tuple, torch.Tensor)))
        if single:
            return [self.encode_prompt(prompts)], True
        if isinstance(prompts, (list, tuple)) and not prompts:
            raise ValueError("no prompts given")
        return [self.encode_prompt(p) for p in prompts], False

    def check_length(self, ids: list[list[int]], params: SamplingParams) -> None:
        """Raise ValueError unless every prompt and its canvases fit in the model's context."""
        for prompt in ids:
            self.core.check(prompt, params)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ generation
    @property
    def core(self) -> EngineCore:
        """The in-process engine core (made at first use; made again if ``runner`` was replaced)."""
        if self._core is None or self._core.model is not self.runner:
            self._core = EngineCore(self.runner, max_num_seqs=self.max_num_seqs, pad_id=self.pad_id, grow=True)
            self._outbox.clear()
        return self._core

    def submit(self, ids: list[int], params: SamplingParams, step_events: bool = False,
               constraint: CanvasConstraint | None = None) -> Request:
        """Queue one request on the in-process core (``constraint``: see ``dgemma.constraints``); its events
        come from :meth:`events`."""
        return self._submit_rows([ids], params, step_events, [constraint])[0]

    def events(self, req: Request) -> Iterator[StepEvent | CanvasEvent]:
        """``req``'s events as the core produces them, stepping it while they are needed. Closing the
        iterator before the last event aborts the request."""
        box = self._outbox[req.request_id]
        core = self.core
        try:
            while True:
                while box:
                    yield box.popleft()
                if req.done:
                    return
                for event in core.step():
                    target = self._outbox.get(event.request_id)
                    if target is not None:
                        target.append(event)
        finally:
            self._outbox.pop(req.request_id, None)
            if not req.done:
                core.abort(req.request_id)

    @torch.inference_mode()
    def generate(self, prompts, params: SamplingParams | None = None, *,
                 constraint: CanvasConstraint | Sequence[CanvasConstraint | None] | None = None,
                 json_schema: dict | None = None, response_format: dict | None = None, **overrides):
        """Complete one prompt (-> Completion) or a list of prompts (-> list[Completion]).

        ``constraint``: fixed tokens, allowed sets or starting tokens on any canvas (``dgemma.constraints``);
        one for every prompt (each row gets its own copy) or a list with one per prompt.
        ``json_schema`` (or OpenAI's ``response_format``): the answer is JSON that validates against it
        (``dgemma.structured``; ``max_new_tokens`` is raised to what its layout needs)."""
        ids, single = self._batch(prompts)
        p, rows = self._prepared(ids, params, overrides, constraint, json_schema, response_format)
        reqs = self._submit_rows(ids, p, constraints=rows)
        try:
            for req in reqs:
                for _ in self.events(req):
                    pass
        finally:  # interrupted (Ctrl-C, a failed step): the other rows must not stay on the core
            self._drop(reqs)
        out = [self.completion(r.result) for r in reqs]
        return out[0] if single else out

    def _submit_rows(self, ids: list[list[int]], p: SamplingParams, step_events: bool = False,
                     constraints: list[CanvasConstraint | None] | None = None) -> list[Request]:
        """One request per prompt; one seed for all (drawn once when none is given), ``initial_canvas`` /
        ``pinned_canvas`` as one canvas for all rows or one per row, and each row's own ``constraints``."""
        cfg = self.config
        initial = sampler.canvas_rows(p, "initial_canvas", len(ids), cfg.canvas_length, cfg.vocab_size)
        pinned = sampler.canvas_rows(p, "pinned_canvas", len(ids), cfg.canvas_length, cfg.vocab_size)
        seed = p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        row = p.replace(seed=seed, initial_canvas=None, pinned_canvas=None)
        reqs = []
        try:
            for b, prompt in enumerate(ids):
                req = self.core.add(prompt, row, step_events=step_events, initial=initial[b] if initial else None,
                                    pinned=pinned[b] if pinned else None,
                                    constraint=constraints[b] if constraints else None)
                self._outbox[req.request_id] = deque()
                reqs.append(req)
        except BaseException:
            self._drop(reqs)
            raise
        return reqs

    def _prepared(self, ids: list[list[int]], params, overrides: dict, constraint, json_schema,
                  response_format) -> tuple[SamplingParams, list[CanvasConstraint | None] | None]:
        """A call's params and each row's constraint: ``constraint`` (see :meth:`generate`) combined with a
        fresh constraint of the JSON layout (``dgemma.structured.request_plan``, which also raises
        ``max_new_tokens`` to what the layout needs). ValueError for a bad call or one past the context."""
        from dgemma.structured import request_plan

        p = self.params(params, **overrides)
        plan, p = request_plan(json_schema, response_format, self.tokenizer, self.config.canvas_length, p)
        try:
            self.check_length(ids, p)
        except ValueError as e:
            if plan is None:
                raise
            raise ValueError(f"the JSON layout needs {plan.max_new_tokens} answer tokens: {e}") from None
        rows = self._row_constraints(constraint, len(ids))
        if plan is not None:  # a plan's constraint keeps per-request state: one each
            rows = [plan.constraint() if r is None else Combined(plan.constraint(), r)
                    for r in (rows or [None] * len(ids))]
        return p, rows

    @staticmethod
    def _row_constraints(constraint, n: int) -> list[CanvasConstraint | None] | None:
        """One constraint per row: a list as given (checked for length), else a copy of one for each row
        (a constraint may keep per-request state)."""
        if constraint is None:
            return None
        if isinstance(constraint, (list, tuple)):
            if len(constraint) != n:
                raise ValueError(f"{len(constraint)} constraints for {n} prompts: give one, or one per prompt")
            return list(constraint)
        if not isinstance(constraint, CanvasConstraint):
            raise ValueError("constraint must be a dgemma.constraints.CanvasConstraint (or a list, one per prompt)")
        return [constraint] if n == 1 else [copy.deepcopy(constraint) for _ in range(n)]

    def _drop(self, reqs: list[Request]) -> None:
        """Abort those of ``reqs`` that are not done and forget their events."""
        for req in reqs:
            self._outbox.pop(req.request_id, None)
            if not req.done:
                self.core.abort(req.request_id)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, step_events: bool = True, *,
               constraint: CanvasConstraint | None = None, json_schema: dict | None = None,
               response_format: dict | None = None, **overrides) -> Iterator[StepUpdate | CanvasUpdate]:
        """Yield a StepUpdate per denoising step (unless ``step_events`` is False) and a CanvasUpdate per
        committed canvas of one prompt (``constraint``, ``json_schema``, ``response_format``: as in
        :meth:`generate`)."""
        ids, _ = self._batch([prompt])
        p, rows = self._prepared(ids, params, overrides, constraint, json_schema, response_format)
        # No grad mode is held across the yields (a suspended generator would leak it into the caller):
        # ``EngineCore.step`` runs in inference mode itself.
        req = self._submit_rows(ids, p, step_events, rows)[0]
        yield from self.updates(self.events(req), req, self.completion)

    def updates(self, events: Iterator[StepEvent | CanvasEvent], req: Request,
                finish: Callable[[RowResult], Completion]) -> Iterator[StepUpdate | CanvasUpdate]:
        """Turn one request's core events into StepUpdates and CanvasUpdates. The text delta comes from
        decoding the whole answer so far (a character may span canvases); the last CanvasUpdate carries
        ``finish(req.result)``, the Completion."""
        tokens: list[int] = []
        text = ""
        for event in events:
            if isinstance(event, StepEvent):
                yield StepUpdate(event.canvas, event.step, event.draft, event.accepted, event.mean_entropy,
                                 event.accepted_mask, event.attempt)
                continue
            tokens += event.tokens
            new_text = self.decode(tokens)
            delta, text = new_text[len(text):] if new_text.startswith(text) else new_text, new_text
            update = CanvasUpdate(event.canvas, event.tokens, delta, event.finished)
            if event.finished:
                update.completion = finish(req.result)
            yield update

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams | None = None,
             enable_thinking: bool = False, **overrides) -> ChatResponse:
        """Answer a conversation with the checkpoint's chat template; thinking is split out."""
        completion = self.generate(self.chat_ids(messages, enable_thinking), params, **overrides)
        thinking, answer = self.split_answer(completion.token_ids)
        completion.text = answer
        return ChatResponse(answer=answer, thinking=thinking, completion=completion)

    def chat_ids(self, messages: list[dict[str, Any]], enable_thinking: bool = False) -> list[int]:
        """The prompt ids of a conversation through the checkpoint's chat template (generation prompt added)."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so it cannot chat")
        return self.tokenizer.encode_chat(messages, enable_thinking=enable_thinking)

    def split_answer(self, token_ids: list[int]) -> tuple[str | None, str]:
        """``(thinking or None, answer)`` of a chat completion's tokens."""
        return split_thinking(self.decode(token_ids, skip_special_tokens=False))

    def chat_session(self, enable_thinking: bool = False, system: str | None = None):
        """A multi-turn conversation that keeps its KV cache between turns (``dgemma.chat.ChatSession``)."""
        from dgemma.chat import ChatSession

        return ChatSession(self, enable_thinking=enable_thinking, system=system)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path) -> Path:
        """Write a transformers-loadable checkpoint directory (weights, configs, tokenizer); the sampling
        defaults go to generation_config.json and, what transformers refuses, to dgemma_generation.json.
        A quantised model writes the quantised format (``dgemma.quant.checkpoint``), which dgemma loads and
        transformers does not."""
        path = loading.save_checkpoint(self.model, path, self.generation_config)
        if self.tokenizer is not None:
            self.tokenizer.save(path)
        return path

    @property
    def pad_id(self) -> int:
        """The token that pads batched encoder inputs (its K/V are never attended to)."""
        pad = self.defaults.pad_token_id if self.defaults.pad_token_id is not None else self.config.pad_token_id
        return 0 if pad is None else pad

    def completion(self, row: RowResult) -> Completion:
        return Completion(self.decode(row.token_ids), row.token_ids, row.finish_reason, row.steps, row.prompt_tokens)

    # ------------------------------------------------------------------ editing (dgemma.editing)
    def infill(self, prefix, suffix, length=None, **params):
        """The text between ``prefix`` and ``suffix`` (an ``editing.Infill``): see ``dgemma.editing.infill``."""
        from dgemma import editing

        return editing.infill(self, prefix, suffix, length, **params)

    def edit(self, text: str, start: int, end: int, instruction: str | None = None, **params) -> str:
        """``text`` with characters ``[start, end)`` rewritten, the rest unchanged: see ``dgemma.editing.edit``."""
        from dgemma import editing

        return editing.edit(self, text, start, end, instruction, **params)


def load(source=None, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
         cuda_graphs: bool | None = None, quant=None) -> Engine:
    """An Engine for a checkpoint directory or Hugging Face Hub repo id (safetensors only); with no
    ``source``, the model embedded in the package (``dgemma.embedded``), as the command line does.

    ``cuda_graphs``: replay the denoising steps of a canvas from CUDA graphs (see ``dgemma.graphs``);
    None (default) turns them on for a model on CUDA. ``quant``: weight-only quantisation, a scheme name
    (``int8``, ``int4``) or a dict / ``dgemma.quant.apply.QuantOptions`` (``scheme``, ``group_size``,
    ``embedding``); a float checkpoint is quantised tensor by tensor as it is read (the float model is never
    whole in memory); a checkpoint written quantised (``dgemma quantize``) loads quantised without it."""
    if quant is not None:
        QuantOptions.of(quant)  # bad options fail before anything loads
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError("dtype must be a torch dtype name such as bfloat16 or float32")
    if source is None:
        from dgemma.embedded import default_model

        source = default_model()
    model, _, gen, ckpt = loading.load_weights(source, device=device, dtype=dtype, quant=quant)
    tokenizer = Tokenizer.from_dir(ckpt) if (ckpt / "tokenizer.json").is_file() else None
    try:
        defaults = SamplingParams.from_generation_config(gen)
    except ValueError as e:
        raise LoadError(f"{ckpt / genconfig.GENERATION_FILE} (with {genconfig.DGEMMA_FILE}): {e}") from None
    return Engine(model, tokenizer, defaults=defaults, generation_config=gen, cuda_graphs=cuda_graphs)
