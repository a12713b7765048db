"""The ``dgemma`` command line: argparse subcommands that parse, build objects and call; no logic here.

``generate``, ``chat``, ``info``, ``quantize`` and ``edit`` / ``infill`` (this package), ``serve`` (``cli/serve.py``),
``bench`` (``cli/bench.py``), ``train`` / ``merge`` (``dgemma.train.cli``) and ``sudoku`` (``dgemma.sudoku.cli``).
A user mistake (``DgemmaError`` or ``ValueError``: unknown model, offline Hub id, prompt too long, bad option
value) prints one line, ``dgemma: ...``, and exits with status 2; Ctrl-C exits with 130 and no traceback.
"""

from __future__ import annotations

import argparse
import sys

from dgemma.errors import DgemmaError


def build_parser() -> argparse.ArgumentParser:
    from dgemma.cli import bench, chat, edit, generate, info, quantize, serve
    from dgemma.sudoku import cli as sudoku_cli
    from dgemma.train import cli as train_cli

    parser = argparse.ArgumentParser(prog="dgemma", description="Block-diffusion text generation (DiffusionGemma).")
    sub = parser.add_subparsers(dest="command", required=True)
    generate.add_parser(sub)
    chat.add_parser(sub)
    info.add_parser(sub)
    quantize.add_parser(sub)
    serve.add_parser(sub)
    edit.add_parsers(sub)
    bench.add_parser(sub)
    train_cli.add_parsers(sub)
    sudoku_cli.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from dgemma.cli import bench, chat, edit, generate, info, quantize, serve
    from dgemma.sudoku import cli as sudoku_cli
    from dgemma.train import cli as train_cli

    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"generate": generate.run, "chat": chat.run, "info": info.run, "bench": bench.run, "train": train_cli.run,
                "merge": train_cli.run, "sudoku": sudoku_cli.run, "serve": serve.run,
                "edit": edit.run, "infill": edit.run, "quantize": quantize.run}
    try:
        return commands[args.command](parser, args)
    except (DgemmaError, ValueError) as e:
        parser.exit(2, f"dgemma: {e}\n")
    except KeyboardInterrupt:
        print("dgemma: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (``dgemma generate ... | head``): not an error of ours
        sys.stderr.close()
        return 0
