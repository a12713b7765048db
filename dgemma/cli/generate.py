"""``dgemma generate [PROMPT]``: complete a prompt (or stdin).

On a terminal the canvas is drawn live at every denoising step (``dgemma.view.terminal``), then the final
text is printed (as Markdown with ``--render markdown``). Piped or with ``--plain``: only the final text.
``--json``: text, token ids, steps per canvas, finish reason, timings and the CPU threads used.
``--json-schema FILE``: the answer is JSON that validates against that schema (``dgemma.structured``).
"""

from __future__ import annotations

import json
import sys
import time

from dgemma.cli.options import add_model_options, add_sampling_options, load_engine, sampling_overrides


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="complete a prompt (or stdin), drawing the canvas live on a terminal")
    g.add_argument("prompt", nargs="?", help="prompt text; read from stdin when omitted")
    add_model_options(g)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template (one user turn)")
    g.add_argument("--think", action="store_true", help="with --chat: thinking mode (the thinking goes to stderr)")
    out = g.add_mutually_exclusive_group()
    out.add_argument("--plain", action="store_true", help="no live view: print only the final text")
    out.add_argument("--json", action="store_true", help="print text, token ids, steps per canvas and timings as JSON")
    g.add_argument("--render", choices=("text", "markdown"), default="text",
                   help="live view and final text as plain text (default) or Markdown")
    g.add_argument("--json-schema", metavar="FILE",
                   help="answer with JSON that validates against this JSON Schema file (`{}`: any JSON object)")
    add_sampling_options(g)


def run(parser, args) -> int:
    if args.prompt is None and sys.stdin.isatty():  # say what the silent wait is for
        print("dgemma: reading the prompt from stdin (end with Ctrl-D)", file=sys.stderr, flush=True)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read().removesuffix("\n")
    if not prompt.strip():
        raise ValueError("the prompt is empty (give it as an argument or on stdin)")
    if args.think and not args.chat:
        raise ValueError("--think needs --chat")
    schema = _schema(args.json_schema)
    engine = load_engine(args)
    if args.chat:
        prompt = engine.chat_ids([{"role": "user", "content": prompt}], args.think)
    params = engine.params(**sampling_overrides(args))
    live = not (args.plain or args.json) and sys.stdout.isatty()
    t0 = time.perf_counter()
    if live:
        state = _live(engine, prompt, params, args.render == "markdown", schema)
        completion, canvas_s = state.completion, state.canvas_seconds
    else:
        completion, canvas_s = None, []
        for event in engine.stream(prompt, params, step_events=False, **schema):
            canvas_s.append(time.perf_counter() - t0)
            completion = event.completion or completion
    seconds = time.perf_counter() - t0
    thinking, text = None, completion.text
    if args.chat:
        thinking, text = engine.split_answer(completion.token_ids)
    if args.json:
        import torch

        print(json.dumps({"text": text, "thinking": thinking, "token_ids": completion.token_ids,
                          "steps": completion.steps, "finish_reason": completion.finish_reason,
                          "prompt_tokens": completion.prompt_tokens,
                          "timings": {"seconds": round(seconds, 4), "first_canvas_s": round(canvas_s[0], 4),
                                      "canvas_s": [round(t, 4) for t in canvas_s],
                                      "tokens_per_s": round(len(completion.token_ids) / seconds, 2),
                                      "threads": torch.get_num_threads()}}))
        return 0
    if thinking:
        print(thinking, file=sys.stderr)
    if live and args.render == "markdown":
        from rich.console import Console
        from rich.markdown import Markdown

        Console().print(Markdown(text))
    else:
        print(text)
    return 0


def _schema(path: str | None) -> dict:
    """``stream`` keywords for ``--json-schema FILE``: ``{"json_schema": ...}`` or ``{"response_format":
    json_object}`` for an empty schema; {} without the option. A file that is not a JSON object: ValueError."""
    if path is None:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            schema = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--json-schema {path}: {e}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"--json-schema {path}: a JSON Schema is a JSON object")
    return {"json_schema": schema} if schema else {"response_format": {"type": "json_object"}}


def _live(engine, prompt, params, markdown: bool, schema: dict):
    from rich.console import Console

    from dgemma.view.state import CanvasState
    from dgemma.view.terminal import PieceCache, live

    return live(engine.stream(prompt, params, **schema), CanvasState.for_params(params),
                PieceCache.for_engine(engine), Console(), markdown=markdown)
