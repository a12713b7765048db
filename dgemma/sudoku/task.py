"""Sudoku as a text task for a tiny DiffusionGemma: tokenizer, model config, data and scoring.

A puzzle is written as 81 digits (``0`` = blank) after ``<bos>``; the answer is the 81 digits of the
solution followed by ``<eos>``, so the canvas (82 positions) holds the whole answer and position ``i``
of the canvas is cell ``i``. The tokenizer is a ``tokenizers`` word-level model over single characters.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from concurrent.futures import ProcessPoolExecutor
from typing import Iterable, Iterator

from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from dgemma.sudoku.board import BUCKETS, Board, generate, random_grid, relabel
from dgemma.sudoku.rating import minimal_symmetric
from dgemma.tokenizer import Tokenizer

SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")
CANVAS = 82  # 81 cells + <eos>
VOCAB = 16  # 4 specials + 10 digits, rounded up


def build_tokenizer() -> Tokenizer:
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({str(d): len(SPECIALS) + d for d in range(10)})
    tok = _HFTokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\S"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIALS))
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    return Tokenizer(tok, config, chat_template=None)


def grid_rope_theta(head_dim: int, period: int = 9) -> float:
    """RoPE base whose second frequency turns once every ``period`` positions.

    RoPE rotates pair ``k`` by ``theta ** (-2k / head_dim)`` radians per position; with this base pair 1
    turns by 2*pi/9, so "same column" (a distance that is a multiple of 9) is one frequency, and pairs 4
    and 7 land within 2-4% of 2*pi/27 and 2*pi/81 (band and board periods). Attention can then find a
    cell's column from relative positions alone; with the usual base 10000 no frequency is near 2*pi/9.
    """
    return (period / (2 * math.pi)) ** (head_dim / 2)


def model_config(hidden: int = 128, layers: int = 6, heads: int = 4, experts: int = 4, top_k: int = 2,
                 dense: int = 256, moe: int = 128) -> dict:
    """A DiffusionGemma ``config.json`` sized for Sudoku (sliding window covers the whole puzzle).

    Sliding layers use :func:`grid_rope_theta` (the board's periods), full layers the usual 10000.
    """
    types = ["sliding_attention", "full_attention"] * (layers // 2) + ["full_attention"] * (layers % 2)
    head_dim = hidden // heads
    return {
        "architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
        "canvas_length": CANVAS, "tie_word_embeddings": True,
        "text_config": {
            "model_type": "diffusion_gemma_text", "vocab_size": VOCAB, "hidden_size": hidden,
            "intermediate_size": dense, "moe_intermediate_size": moe, "num_experts": experts,
            "top_k_experts": top_k, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": heads // 2, "head_dim": head_dim,
            "per_layer_config": {str(i): {"head_dim": head_dim, "num_key_value_heads": heads // 2}
                                 for i, t in enumerate(types) if t == "full_attention"},
            "layer_types": types, "sliding_window": 256, "max_position_embeddings": 512,
            "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                "sliding_attention": {"rope_type": "default",
                                                      "rope_theta": round(grid_rope_theta(head_dim), 3)}},
            "final_logit_softcapping": 30.0, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
            "use_bidirectional_attention": "vision", "tie_word_embeddings": True,
            "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
        },
    }


def _puzzle(job: tuple[int, int, int, int]) -> tuple[Board, Board]:
    seed, k, lo, hi = job
    rng = random.Random(f"sudoku:{seed}:{k}")  # one RNG per puzzle: the same set whatever the worker count
    return generate(rng.randint(lo, hi), rng)


def puzzles(n: int, clue_range: tuple[int, int], seed: int, workers: int = 1) -> Iterator[tuple[Board, Board]]:
    """``n`` unique puzzles, clue counts uniform in ``clue_range`` (inclusive), reproducible from ``seed``.

    ``workers > 1`` generates in that many processes; the puzzles and their order do not change.
    """
    jobs = ((seed, k, *clue_range) for k in range(n))
    if workers <= 1 or n < 64:
        yield from map(_puzzle, jobs)
        return
    with ProcessPoolExecutor(workers) as pool:
        yield from pool.map(_puzzle, jobs, chunksize=32)


def _minimal(job: tuple[int, int]) -> tuple[Board, Board]:
    seed, k = job
    rng = random.Random(f"minimal:{seed}:{k}")  # not eval's rated stream (rated:LEVEL:SEED:K): no shared grids
    solution = random_grid(rng)
    return minimal_symmetric(solution, rng), solution


def minimal_puzzles(n: int, seed: int, workers: int = 1) -> Iterator[tuple[Board, Board]]:
    """``n`` minimal puzzles with 180-degree symmetry (:func:`~dgemma.sudoku.rating.minimal_symmetric`), of
    every rating (most have 24-30 clues), reproducible from ``seed`` whatever the number of ``workers``."""
    jobs = ((seed, k) for k in range(n))
    if workers <= 1 or n < 64:
        yield from map(_minimal, jobs)
        return
    with ProcessPoolExecutor(workers) as pool:
        yield from pool.map(_minimal, jobs, chunksize=32)


def training_puzzles(n: int, clue_range: tuple[int, int], seed: int, minimal: float = 0.0,
                     workers: int = 1) -> Iterator[tuple[Board, Board]]:
    """The puzzles of ``sudoku train``: ``round(n * minimal)`` minimal symmetric ones (:func:`minimal_puzzles`)
    after the rest, drawn by clue count (:func:`puzzles`); the trainer shuffles them."""
    if not 0.0 <= minimal <= 1.0:
        raise ValueError(f"the share of minimal puzzles must lie in 0..1, got {minimal}")
    k = round(n * minimal)
    yield from puzzles(n - k, clue_range, seed, workers) if k < n else ()
    yield from minimal_puzzles(k, seed, workers) if k else ()


# Evaluation buckets each draw from their own seed, ``seed + BUCKET_SEED_OFFSETS[bucket]``. With one seed
# for all, puzzle k of every bucket would come from the same random grid (the RNG is seeded per puzzle
# index), so the buckets would share most of their solution grids. The 36-46 band keeps the seed itself.
BUCKET_SEED_OFFSETS = {"unsloth": 0, "easy": 1_000, "medium": 2_000, "hard": 3_000}


def bucket_puzzles(n: int, bucket: str, seed: int, workers: int = 1) -> Iterator[tuple[Board, Board]]:
    """:func:`puzzles` of one bucket of ``BUCKETS``, from that bucket's own seed (see ``BUCKET_SEED_OFFSETS``)."""
    return puzzles(n, BUCKETS[bucket], seed + BUCKET_SEED_OFFSETS[bucket], workers)


def augmented(pairs: Iterable[tuple[Board, Board]], copies: int, seed: int) -> Iterator[tuple[Board, Board]]:
    """Each pair, then ``copies - 1`` random symmetric views of it (:func:`~dgemma.sudoku.board.relabel`)."""
    for k, (puzzle, solution) in enumerate(pairs):
        yield puzzle, solution
        rng = random.Random(f"relabel:{seed}:{k}")
        for _ in range(copies - 1):
            yield relabel(puzzle, solution, rng)


def clue_spans(puzzle: Board) -> list[list[int]]:
    """The clue cells as ``[start, end)`` runs of the 81-character answer: the data's ``"fixed"`` spans."""
    spans: list[list[int]] = []
    for i, v in enumerate(puzzle):
        if v and spans and spans[-1][1] == i:
            spans[-1][1] = i + 1
        elif v:
            spans.append([i, i + 1])
    return spans


def record(puzzle: Board, solution: Board, hold_clues: bool = False) -> dict:
    """One JSONL training record; ``hold_clues``: the clue cells as ``"fixed"`` spans (never corrupted on the
    canvas; such a model is solved with the clue constraint, ``--constrain``)."""
    out: dict = {"prompt": "".join(map(str, puzzle)), "completion": "".join(map(str, solution))}
    return {**out, "fixed": clue_spans(puzzle)} if hold_clues else out


def write_jsonl(path: Path, items: Iterable[tuple[Board, Board]], progress=None, hold_clues: bool = False) -> int:
    n = 0
    tmp = Path(path).with_suffix(".tmp")
    with tmp.open("w") as f:
        for puzzle, solution in items:
            f.write(json.dumps(record(puzzle, solution, hold_clues)) + "\n")
            n += 1
            if progress is not None:
                progress(1)
    tmp.replace(path)
    return n


def answer_board(text: str) -> Board:
    """The first 81 digits of a model's answer; missing cells count as blanks (0)."""
    digits = [int(c) for c in text if c.isdigit()][:81]
    return tuple(digits + [0] * (81 - len(digits)))


@dataclass
class Score:
    """Accuracy of answers against solutions."""

    n: int = 0
    exact: int = 0
    cells_right: int = 0
    cells_blank: int = 0  # blanks of the puzzles (the cells to fill)
    clues_kept: int = 0
    clues: int = 0
    steps: list[int] = field(default_factory=list)

    def add(self, puzzle: Board, solution: Board, answer: Board, steps: int | None = None) -> None:
        self.n += 1
        self.exact += answer == solution
        for p, s, a in zip(puzzle, solution, answer):
            if p:
                self.clues += 1
                self.clues_kept += a == p
            else:
                self.cells_blank += 1
                self.cells_right += a == s
        if steps is not None:
            self.steps.append(steps)

    def summary(self) -> dict[str, float]:
        out = {"puzzles": self.n, "exact": self.exact / max(1, self.n),
               "cell_accuracy": self.cells_right / max(1, self.cells_blank),
               "clue_preservation": self.clues_kept / max(1, self.clues)}
        if self.steps:
            out["mean_steps"] = sum(self.steps) / len(self.steps)
        return out
