"""Training progress: a rich progress bar (loss, tokens/s, ETA) on a terminal, log lines otherwise."""

from __future__ import annotations

import sys
from typing import Any, Callable


def _fmt(entry: dict[str, Any]) -> str:
    parts = []
    for k, v in entry.items():
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


class Progress:
    def __init__(self, total: int, start: int, enabled: bool, live: bool | None, say: Callable[[str], None]):
        """``live``: True forces the bar, False forces log lines, None picks the bar on a terminal."""
        self.enabled, self.say = enabled, say
        self.live = enabled and (live if live is not None else sys.stderr.isatty())
        self.total, self.start = total, start
        self._bar = self._task = None

    def __enter__(self):
        if self.live:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            from rich.console import Console

            # stderr: stdout carries the run's result (``dgemma train`` prints a JSON summary there).
            self._bar = RichProgress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[stats]}"), TimeElapsedColumn(),
                                     TextColumn("ETA"), TimeRemainingColumn(), transient=False,
                                     console=Console(stderr=True))
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.total, completed=self.start, stats="")
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
        return False

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if self._bar is not None:
            stats = f"loss {metrics['loss']:.4f}  {metrics['tokens_per_s']:.0f} tok/s"
            self._bar.update(self._task, completed=step, stats=stats)

    def line(self, entry: dict[str, Any]) -> None:
        if not self.enabled:
            return
        text = _fmt(entry)
        if self._bar is not None:
            self._bar.console.print(text, highlight=False)
        else:
            self.say(text)
