"""dgemma: run, serve and fine-tune block-diffusion language models (DiffusionGemma) locally.

Public API::

    engine = dgemma.load("path/or/owner-name", device=None, dtype=None)
    engine = dgemma.load()                             # the embedded Sudoku model (dgemma/models/sudoku)
    engine.generate("prompt", max_new_tokens=64)      # or a list of prompts / token-id lists
    engine.stream("prompt")                            # StepUpdate / CanvasUpdate events
    engine.chat([{"role": "user", "content": "hi"}])   # ChatResponse(answer, thinking, completion)
"""

from dgemma.config import ModelConfig
from dgemma.engine import CanvasUpdate, ChatResponse, Completion, Engine, StepUpdate, load
from dgemma.errors import ConfigError, DgemmaError, LoadError
from dgemma.params import SamplingParams

__all__ = [
    "load", "Engine", "SamplingParams", "ModelConfig", "Completion", "ChatResponse", "StepUpdate",
    "CanvasUpdate", "DgemmaError", "LoadError", "ConfigError",
]
