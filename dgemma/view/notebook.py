"""The notebook view: ``show(engine, prompt)`` draws the canvas as HTML that updates at every step.

Needs only IPython (present in any Jupyter kernel): one ``display(..., display_id=True)`` handle is
updated in place. ``render_html`` is the pure part (escaped spans styled like the terminal view).
"""

from __future__ import annotations

import html
from typing import Callable

from dgemma.view.state import CanvasState
from dgemma.view.terminal import PieceCache

_NOISE = "opacity:0.35"
_FRESH = "background:#b7f0b1"
_BOX = ("font-family:ui-monospace,monospace;white-space:pre-wrap;line-height:1.5;"
        "border:1px solid #ccc;border-radius:6px;padding:8px")


def render_html(state: CanvasState, piece: Callable[[int], str]) -> str:
    spans = [f'<span style="color:inherit">{html.escape(state.committed_text)}</span>']
    for tok, settled, fresh in state.visible_draft():
        text = html.escape(piece(tok))
        style = _FRESH if fresh else "" if settled else _NOISE
        spans.append(f'<span style="{style}">{text}</span>' if style else text)
    status = html.escape(state.status())
    return (f'<div class="dgemma-canvas" style="{_BOX}">{"".join(spans)}</div>'
            f'<div style="font-size:smaller;opacity:0.7">{status}</div>')


def show(engine, prompt, **overrides):
    """Generate ``prompt`` with a live HTML canvas in the notebook; returns the Completion."""
    try:
        from IPython.display import HTML, display
    except ImportError:
        raise RuntimeError("the notebook view needs IPython (run it inside Jupyter)") from None
    params = engine.params(**overrides)
    state, piece = CanvasState.for_params(params), PieceCache.for_engine(engine)
    handle = display(HTML(render_html(state, piece)), display_id=True)
    for event in engine.stream(prompt, params):
        state.update(event)
        handle.update(HTML(render_html(state, piece)))
    return state.completion
