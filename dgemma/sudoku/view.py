"""A live view of a Sudoku board being denoised (``dgemma sudoku solve --show``), drawn with rich.

Clues are bold, cells that changed since the previous step are highlighted, blanks the model has not
filled with a digit show as a dot. It draws on stderr, so stdout stays one answer per line.
"""

from __future__ import annotations

from rich.console import Console
from rich.live import Live
from rich.text import Text

from dgemma.sudoku import board as sb
from dgemma.sudoku import task


def render(puzzle: sb.Board, draft: sb.Board, previous: sb.Board | None, status: str = "") -> Text:
    out = Text()
    for r in range(9):
        if r and r % 3 == 0:
            out.append("------+-------+------\n", style="dim")
        for c in range(9):
            if c and c % 3 == 0:
                out.append("| ", style="dim")
            i = r * 9 + c
            v = draft[i]
            ch = str(v) if v else "."
            if puzzle[i]:
                style = "bold" if v == puzzle[i] else "bold red"
            elif previous is not None and previous[i] != v:
                style = "black on yellow"
            else:
                style = "cyan"
            out.append(ch, style=style)
            out.append(" ")
        out.append("\n")
    if status:
        out.append(status, style="dim")
    return out


def solve_live(engine, puzzle: sb.Board, params: dict, console: Console | None = None,
               constraint=None) -> sb.Board:
    """Denoise one puzzle, redrawing the board at every step; returns the final answer. ``constraint``: a
    canvas constraint for the stream (``dgemma.sudoku.cli.clue_constraint``)."""
    from dgemma.engine import CanvasUpdate, StepUpdate

    console = console or Console(stderr=True)
    previous = None
    answer = puzzle
    with Live(render(puzzle, puzzle, None, "step 0"), console=console, auto_refresh=False) as live:
        shown = 0  # the step drawn last: other attempts of the same pass (parallel_attempts) are not drawn
        for event in engine.stream(sb.format_board(puzzle), constraint=constraint, **params):
            if isinstance(event, StepUpdate) and event.step != shown:
                shown = event.step
                draft = task.answer_board(engine.decode(event.draft_tokens))
                again = f"attempt {event.attempt + 1}  " if event.attempt else ""
                live.update(render(puzzle, draft, previous,
                                   f"{again}step {event.step}  accepted {event.accepted}  "
                                   f"mean entropy {event.mean_entropy:.2g}"), refresh=True)
                previous = draft
            elif isinstance(event, CanvasUpdate) and event.completion is not None:
                answer = task.answer_board(engine.decode(event.completion.token_ids))
                live.update(render(puzzle, answer, previous, f"done: {sum(event.completion.steps)} steps"),
                            refresh=True)
                break
    if not console.is_terminal:  # rich ends a live view with a newline on a terminal only
        console.line()
    return answer
