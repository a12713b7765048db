"""The engine core: requests, a scheduler, a KV slot pool, and one ``step()`` that advances them all.

``EngineCore`` (``engine_core.py``) is what ``Engine.generate`` / ``stream`` / ``ChatSession`` and the
server drive; ``run`` (``batch.py``) runs a fixed batch through it as one generator.
"""

from dgemma.core.batch import run
from dgemma.core.engine_core import CoreStats, EngineCore
from dgemma.core.request import Attempt, CanvasEvent, Request, RowResult, StepEvent

__all__ = ["EngineCore", "CoreStats", "Request", "StepEvent", "CanvasEvent", "RowResult", "Attempt", "run"]
