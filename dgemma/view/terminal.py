"""The terminal view of ``dgemma generate``: the canvas redrawn at every denoising step (rich ``Live``).

Settled tokens are plain, tokens settled this step are highlighted, positions still noise are dimmed; a
status line gives canvas, step, settled positions, mean entropy and tokens/s. Committed text sits above
the canvas and grows as canvases commit (only its last lines while it is taller than the terminal). With
``markdown=True`` the committed text plus the draft render as Markdown while they form. When the stream
ends the live area is cleared and the caller prints the final text.
"""

from __future__ import annotations

from typing import Callable, Iterable

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markdown import Markdown
from rich.text import Text

from dgemma.view.state import CanvasState

STYLE_NOISE, STYLE_FRESH, STYLE_SETTLED = "dim", "bold black on green", ""


class PieceCache:
    """Text of single tokens (``decode([id])``), memoised: a redraw decodes each id once per run."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode, self._memo = decode, {}

    @classmethod
    def for_engine(cls, engine) -> "PieceCache":
        """Pieces of ``engine``'s tokenizer, special tokens included (EOS and turn markers stay visible)."""
        return cls(lambda ids: engine.decode(ids, skip_special_tokens=False))

    def __call__(self, token: int) -> str:
        if token not in self._memo:
            self._memo[token] = self.decode([token])
        return self._memo[token]


def canvas_text(state: CanvasState, piece: Callable[[int], str]) -> Text:
    out = Text()
    for tok, settled, fresh in state.visible_draft():
        text = piece(tok)
        if not settled:
            text = text.replace("\n", "↵") or "·"  # noise keeps the canvas shape but never breaks lines
        out.append(text, style=STYLE_FRESH if fresh else STYLE_SETTLED if settled else STYLE_NOISE)
    return out


def _tail(text: str, lines: int) -> str:
    parts = text.split("\n")
    return text if len(parts) <= lines else "…\n" + "\n".join(parts[-lines:])


def render(state: CanvasState, piece: Callable[[int], str], markdown: bool = False,
           height: int = 40) -> RenderableType:
    status = Text(state.status(), style="dim")
    if markdown:
        draft = "".join(piece(t) for t, _, _ in state.visible_draft())
        return Group(Markdown(_tail(state.committed_text + draft, height - 2)), status)
    parts: list[RenderableType] = []
    if state.committed_text:
        parts.append(Text(_tail(state.committed_text, max(3, height // 2)), end=""))
    parts += [canvas_text(state, piece), status]
    return Group(*parts)


def live(events: Iterable, state: CanvasState, piece: Callable[[int], str], console: Console,
         markdown: bool = False) -> CanvasState:
    """Draw ``events`` (from ``Engine.stream``) on ``console`` until they end; returns the final state."""
    with Live(render(state, piece, markdown), console=console, auto_refresh=False, transient=True,
              vertical_overflow="crop") as view:
        for event in events:
            state.update(event)
            view.update(render(state, piece, markdown, console.size.height), refresh=True)
    return state
