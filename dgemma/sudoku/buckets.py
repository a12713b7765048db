"""Rated puzzle sets for the Sudoku commands (``generate --rating``, ``eval --rating``).

What the command line needs around :mod:`dgemma.sudoku.rating`: rating lists read and checked (a bad name is
a ``ValueError`` in one line), each rating's eval bucket (``rated-LEVEL`` in eval's table) and the seed it
draws from, and the lines ``generate --rating`` prints.

Seeds: eval's rated bucket of a level draws from ``seed + RATING_SEED_OFFSETS[level]``. The offsets differ
from the clue buckets' (``task.BUCKET_SEED_OFFSETS``: 0 to 3,000), so no two eval sets share a seed, and
rated puzzles come from their own random stream (``rated:LEVEL:SEED:K``, where training data and the clue
buckets draw from ``sudoku:SEED:K``, and training's minimal puzzles from ``minimal:SEED:K``), so they share no grids with any training set either.
"""

from __future__ import annotations

import json
from typing import Iterator

from dgemma.sudoku import board as sb
from dgemma.sudoku.rating import check_level, generate_rated

PREFIX = "rated-"
RATING_SEED_OFFSETS = {"easy": 10_000, "medium": 11_000, "hard": 12_000, "search": 13_000}


def parse_ratings(text: str) -> list[str]:
    """``easy,medium`` -> ``["easy", "medium"]`` (in the given order, repeats dropped); ValueError otherwise."""
    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not names:
        raise ValueError(f"--rating takes levels from {', '.join(RATING_SEED_OFFSETS)}, comma-separated")
    return [check_level(n) for n in names]


def bucket_name(level: str) -> str:
    return PREFIX + level


def is_rated(bucket: str) -> bool:
    return bucket.startswith(PREFIX)


def rated_bucket(n: int, bucket: str, seed: int, workers: int = 1) -> Iterator[tuple[sb.Board, sb.Board]]:
    """The ``(puzzle, solution)`` pairs of eval's bucket ``rated-LEVEL``, from that level's own seed (the
    arguments of ``task.bucket_puzzles``)."""
    level = check_level(bucket[len(PREFIX):] if is_rated(bucket) else bucket)
    return generate_rated(level, n, seed + RATING_SEED_OFFSETS[level], workers=workers)


def generate_lines(level: str, n: int, seed: int, clue_range: tuple[int, int] | None, jsonl: bool,
                   workers: int = 1) -> Iterator[str]:
    """What ``generate --rating LEVEL`` prints: one puzzle per line, or JSON lines with the solution, the clue
    count and the rating. ``clue_range`` None: the rater's default range."""
    check_level(level)
    extra = {} if clue_range is None else {"clues": clue_range}
    for puzzle, solution in generate_rated(level, n, seed, workers=workers, **extra):
        if jsonl:
            yield json.dumps({"puzzle": sb.format_board(puzzle), "solution": sb.format_board(solution),
                              "clues": sb.clues(puzzle), "rating": level})
        else:
            yield sb.format_board(puzzle)
