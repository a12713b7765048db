"""``dgemma chat``: a multi-turn conversation on the chat template that keeps its KV cache between turns
(``dgemma.chat.ChatSession``), so each turn encodes only its new tokens.

On a terminal each answer is drawn live while it forms; ``--think`` turns on thinking mode and shows the
thinking channel (dimmed, before the answer). ``/reset`` starts over, ``/exit`` or Ctrl-D ends. With stdin
piped, every line is one user turn and only the answers are printed, one block per turn. A turn that
fails (e.g. the history outgrew the context) prints ``dgemma: ...`` on stderr and the chat goes on; a model
without a chat template is refused at startup (one line, exit status 2).
"""

from __future__ import annotations

import sys

from dgemma.cli.options import add_model_options, add_sampling_options, load_engine, sampling_overrides
from dgemma.errors import DgemmaError


def add_parser(sub) -> None:
    c = sub.add_parser("chat", help="multi-turn chat, keeping the conversation's KV cache between turns")
    add_model_options(c)
    c.add_argument("--think", action="store_true", help="thinking mode; the thinking is shown apart")
    c.add_argument("--system", help="system prompt")
    c.add_argument("--plain", action="store_true", help="no live view")
    c.add_argument("--render", choices=("text", "markdown"), default="text")
    add_sampling_options(c)


def run(parser, args) -> int:
    from rich.console import Console
    from rich.markdown import Markdown

    from dgemma.view.state import CanvasState
    from dgemma.view.terminal import PieceCache, live

    engine = load_engine(args)
    if engine.tokenizer is None or engine.tokenizer.chat_template is None:  # refuse now, not at every turn
        raise DgemmaError(f"{args.model or 'the embedded model'} has no chat template, so it cannot chat; "
                          "`dgemma generate` completes plain prompts")
    session = engine.chat_session(enable_thinking=args.think, system=args.system)
    overrides = sampling_overrides(args)
    params = engine.params(**overrides)
    interactive = sys.stdin.isatty()
    show = not args.plain and sys.stdout.isatty()
    console = Console()
    piece = PieceCache.for_engine(engine)
    errors = Console(stderr=True)  # the intro, the prompt and per-turn errors: stdout holds only answers
    if interactive:
        errors.print("[dim]dgemma chat: /reset starts over, /exit or Ctrl-D ends[/dim]")
    failed = 0
    while True:
        try:
            if interactive:
                errors.print("you> ", end="")
            line = input()
        except EOFError:
            return 1 if failed else 0
        except KeyboardInterrupt:
            return 130
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            if interactive:
                console.print("[dim]conversation cleared[/dim]")
            continue
        try:
            events = session.stream(text, **overrides)
            if show:
                live(events, CanvasState.for_params(params), piece, console, markdown=args.render == "markdown")
            else:
                for _ in events:
                    pass
        except (DgemmaError, ValueError) as e:  # e.g. the history outgrew the context: say so, go on
            errors.print(f"dgemma: {e}", markup=False, highlight=False)
            failed += 1
            continue
        except KeyboardInterrupt:  # stop this answer, keep the conversation (the cache self-repairs)
            errors.print("[dim]interrupted[/dim]")
            continue
        reply = session.last_completion
        if session.last_thinking and show:
            console.print(session.last_thinking, style="dim", markup=False)
        elif session.last_thinking:
            print(session.last_thinking, file=sys.stderr)
        if show and args.render == "markdown":
            console.print(Markdown(reply.text))
        else:
            print(reply.text, flush=True)
        if show:
            console.print(f"[dim]{len(reply.token_ids)} tokens, {sum(reply.steps)} steps; "
                          f"encoded {session.last_encoded} new prompt tokens "
                          f"({reply.prompt_tokens - session.last_encoded} from the cache)[/dim]")
