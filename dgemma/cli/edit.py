"""``dgemma edit FILE --span START:END`` and ``dgemma infill --prefix TEXT --suffix TEXT``.

``edit`` rewrites characters ``[START, END)`` of a UTF-8 file (with ``--instruction``, as the model is asked
to) and prints the whole edited text to stdout, exactly as it is (no newline added); ``--write`` replaces the
file in place atomically instead. ``infill`` prints the text of the gap (``--full``: prefix, gap and suffix).
``--length N`` (or ``N,M,...``: candidates) sets the gap in tokens; without it the length is chosen among
candidates (``dgemma.editing``). While stderr is a terminal (and without ``--plain``) the canvases of every
candidate are drawn there live (``dgemma.view``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from dgemma.cli.options import add_model_options, add_sampling_options, load_engine, sampling_overrides


def add_parsers(sub) -> None:
    e = sub.add_parser("edit", help="rewrite a span of a text file (infill, or as an instruction says)")
    e.add_argument("file", help="a UTF-8 text file")
    e.add_argument("--span", required=True, metavar="START:END",
                   help="the characters to rewrite, as Python string offsets (START: or :END for the rest)")
    e.add_argument("--instruction", default=None, help="what to do with the span (through the chat template)")
    e.add_argument("--write", action="store_true", help="rewrite FILE in place (atomically) instead of printing")
    _common(e)
    i = sub.add_parser("infill", help="fill the gap between a prefix and a suffix")
    i.add_argument("--prefix", required=True, help="text before the gap (the prompt)")
    i.add_argument("--suffix", required=True, help="text after the gap (fixed on the gap's canvases)")
    i.add_argument("--full", action="store_true", help="print prefix + gap + suffix instead of the gap alone")
    _common(i)


def _common(p) -> None:
    p.add_argument("--length", type=_lengths, default=None, metavar="N[,M...]",
                   help="gap length in tokens, or candidates to choose among (default: a few, chosen by the model)")
    p.add_argument("--plain", action="store_true", help="no live view on stderr")
    add_model_options(p)
    add_sampling_options(p)


def _lengths(text: str) -> int | list[int]:
    import argparse

    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens or a comma-separated list, got {text!r}")
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"lengths must be >= 0, got {text!r}")
    return values[0] if len(values) == 1 else values


def parse_span(text: str, size: int) -> tuple[int, int]:
    """``START:END`` (either side may be empty: 0 / ``size``) -> ``(start, end)``; ValueError otherwise."""
    head, sep, tail = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(head) if head.strip() else 0, int(tail) if tail.strip() else size
    except ValueError:
        raise ValueError(f"--span must be START:END (character offsets), got {text!r}") from None


def read_text(path: Path) -> str:
    """The file's text exactly (no newline translation); ValueError for a missing or non-UTF-8 file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not a file") from None
    except OSError as err:
        raise ValueError(f"{path}: cannot read it ({err.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start} cannot be decoded)") from None


def run(parser, args) -> int:
    from dgemma import editing

    if args.command == "edit":
        path = Path(args.file)
        text = read_text(path)
        start, end = parse_span(args.span, len(text))
        editing.check_span(text, start, end)  # before the model loads
    engine = load_engine(args)
    overrides = sampling_overrides(args)

    def work(on_event):
        if args.command == "edit":
            return editing.edit(engine, text, start, end, args.instruction, length=args.length, on_event=on_event,
                                **overrides)
        gap = editing.infill(engine, args.prefix, args.suffix, args.length, on_event=on_event, **overrides)
        return args.prefix + gap.text + args.suffix if args.full else gap.text

    live = not args.plain and sys.stderr.isatty()
    result = _live(engine, engine.params(**overrides), work) if live else work(None)
    if args.command == "edit" and args.write:
        from dgemma.fileio import atomic_write

        atomic_write(path, lambda tmp: tmp.write_bytes(result.encode("utf-8")))
        return 0
    sys.stdout.write(result if args.command == "edit" else result + "\n")
    sys.stdout.flush()
    return 0


def _live(engine, params, work):
    """``work(on_event)`` with every candidate's canvas drawn on stderr as it denoises."""
    from rich.console import Console, Group
    from rich.live import Live
    from rich.text import Text

    from dgemma.view.state import CanvasState
    from dgemma.view.terminal import PieceCache, render

    console, piece, states = Console(stderr=True), PieceCache.for_engine(engine), {}
    with Live(Group(), console=console, auto_refresh=False, transient=True, vertical_overflow="crop") as view:
        def on_event(length, event):
            states.setdefault(length, CanvasState.for_params(params)).update(event)
            height = max(4, console.size.height // len(states))
            parts = []
            for n, state in sorted(states.items()):
                parts += [Text(f"gap of {n} tokens", style="bold"), render(state, piece, height=height)]
            view.update(Group(*parts), refresh=True)

        return work(on_event)
