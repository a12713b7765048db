"""Views of a generation as it forms: the shared state (``state``), a terminal view (``terminal``, rich)
and a notebook view (``notebook``, HTML through IPython). All are fed by ``Engine.stream`` events."""

from dgemma.view.state import CanvasState

__all__ = ["CanvasState"]
