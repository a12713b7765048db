"""The model that ships inside the package, used when a command names no model.

It is the Sudoku model trained by ``dgemma sudoku train``, stored in ``dgemma/models/sudoku``
in the release format with its tokenizer and a model card, so a fresh install works offline.
"""

from __future__ import annotations

from pathlib import Path

from dgemma.errors import LoadError

MODELS = Path(__file__).resolve().parent / "models"
SUDOKU = MODELS / "sudoku"


def default_model() -> Path:
    """The embedded checkpoint directory; a clear error if this install has none."""
    if (SUDOKU / "config.json").is_file():
        return SUDOKU
    raise LoadError("this install has no embedded default model; pass --model with a checkpoint directory "
                    "or a Hugging Face repo id")
