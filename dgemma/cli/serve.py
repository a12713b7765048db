"""``dgemma serve``: the OpenAI-compatible HTTP server (``dgemma.server``) on uvicorn.

Binds 127.0.0.1 unless ``--host`` says otherwise. The model id it reports is the ``--model`` directory's
name or Hub id (``dgemma-sudoku`` for the embedded model). Sampling flags set the server's defaults; a
request's own fields override them.
"""

from __future__ import annotations

import os
import sys

from dgemma.cli.options import add_model_options, add_sampling_options, load_engine, sampling_overrides

API_KEY_ENV = "DGEMMA_API_KEY"


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    add_model_options(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    s.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every route but /health (default: ${API_KEY_ENV})")
    s.add_argument("--max-num-seqs", type=int, default=16, metavar="N", help="requests generating at once (default: 16)")
    s.add_argument("--kv-cache-gb", type=float, default=None, metavar="G",
                   help="memory for the KV cache in GiB (default: the engine core's choice)")
    s.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help="positions one request may use, prompt and canvases (default: the context, at most 8192)")
    s.add_argument("--max-queue", type=int, default=None, metavar="N",
                   help="requests waiting for a slot before new ones get 429 (default: 4 x --max-num-seqs)")
    s.add_argument("--max-tokens-limit", type=int, default=4096, metavar="N",
                   help="largest max_tokens a request may ask for (default: 4096)")
    s.add_argument("--max-n", type=int, default=8, metavar="N", help="most choices per request (default: 8)")
    s.add_argument("--max-prompt-tokens", type=int, default=None, metavar="N",
                   help="longest prompt in tokens (default: what the context allows)")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_sampling_options(s)


def run(parser, args) -> int:
    import uvicorn

    from dgemma.server.app import create_app, model_id_for
    from dgemma.server.protocol import Limits

    for name in ("max_num_seqs", "max_tokens_limit", "max_n"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer")
    if args.max_queue is not None and args.max_queue < 0:
        raise ValueError("--max-queue must be 0 or more")
    if args.max_model_len is not None and args.max_model_len < 1:
        raise ValueError("--max-model-len must be a positive integer")
    if args.kv_cache_gb is not None and not args.kv_cache_gb > 0:
        raise ValueError("--kv-cache-gb must be a positive number")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    engine = load_engine(args)
    limits = Limits(max_tokens=args.max_tokens_limit, max_n=args.max_n, max_prompt_tokens=args.max_prompt_tokens)
    app = create_app(engine, model_id=model_id_for(args.model), max_num_seqs=args.max_num_seqs,
                     kv_cache_gb=args.kv_cache_gb, max_queue=args.max_queue,
                     api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, limits=limits,
                     defaults=engine.params(**sampling_overrides(args)), max_model_len=args.max_model_len)
    server = app.state.server
    core = server.core
    print(f"dgemma: serving {server.model_id} on http://{args.host}:{args.port} ({core.num_slots} requests at once, "
          f"{core.max_model_len} positions each; playground: http://{args.host}:{args.port}/)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
