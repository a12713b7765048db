"""``dgemma bench``: speed against transformers and AR decoding (the harness is ``dgemma.bench``)."""

from __future__ import annotations

import argparse
import sys

from dgemma.cli.options import add_threads_option, set_threads
from dgemma.errors import DgemmaError


def add_parser(sub) -> None:
    from dgemma.bench.presets import PRESETS

    b = sub.add_parser("bench", help="measure speed against transformers and AR decoding")
    src = b.add_mutually_exclusive_group()
    src.add_argument("--preset", default="small", choices=list(PRESETS), help="random-weight model (default small)")
    src.add_argument("--config", help="config.json of a random-weight model, built directly on the device")
    src.add_argument("--checkpoint", help="checkpoint directory or Hub id")
    b.add_argument("--device", default="cpu")
    b.add_argument("--dtype", default="float32")
    b.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (default 1)")
    b.add_argument("--steps", type=int, nargs="+", default=[16], help="denoising steps per canvas (default 16)")
    b.add_argument("--prompt-len", type=int, default=128)
    b.add_argument("--new-tokens", type=int, default=512)
    b.add_argument("--adaptive", action="store_true", help="stop canvases adaptively instead of fixed steps")
    b.add_argument("--no-transformers", dest="transformers", action="store_false")
    b.add_argument("--no-ar", dest="autoregressive", action="store_false")
    add_threads_option(b)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--moe", choices=["auto", "loop", "grouped"], default="auto",
                   help="expert path: auto (grouped GEMM for bf16 on CUDA, per-expert loop elsewhere), or force one")
    b.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure dgemma with the decoder steps replayed from CUDA graphs, as Engine "
                        "runs them on CUDA (default: on with a CUDA device)")
    b.add_argument("--batch-search", type=int, default=0, metavar="LIMIT",
                   help="also find the largest power-of-two batch up to LIMIT that fits in memory")
    b.add_argument("--json", dest="json_out", help="write the report here")
    b.add_argument("--plot", help="write a PNG plot here (needs matplotlib)")


def run(parser, args) -> int:
    from dgemma.bench import BenchSpec, format_table, plot_reports, run_benchmark, write_report

    positive = {"--batch": args.batch, "--steps": args.steps, "--prompt-len": [args.prompt_len],
                "--new-tokens": [args.new_tokens]}
    for flag, values in positive.items():
        if any(v <= 0 for v in values):
            parser.exit(2, f"dgemma: {flag} must be positive\n")
    set_threads(args)
    spec = BenchSpec(
        preset=None if (args.config or args.checkpoint) else args.preset, config=args.config,
        checkpoint=args.checkpoint, device=args.device, dtype=args.dtype, batch_sizes=tuple(args.batch),
        steps=tuple(args.steps), prompt_len=args.prompt_len, new_tokens=args.new_tokens, adaptive=args.adaptive,
        transformers=args.transformers, autoregressive=args.autoregressive, seed=args.seed,
        batch_search=args.batch_search, moe=args.moe, cuda_graphs=args.cuda_graphs)
    try:
        report = run_benchmark(spec, echo=lambda line: print(line, file=sys.stderr))
    except (DgemmaError, ValueError) as e:
        parser.exit(2, f"dgemma: {e}\n")
    print(format_table(report))
    if args.json_out:
        write_report(report, args.json_out)
    if args.plot:
        try:
            plot_reports([report], args.plot)
        except RuntimeError as e:
            parser.exit(2, f"dgemma: {e}\n")
    return 0
