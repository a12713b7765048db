"""Sudoku as a text task for a tiny DiffusionGemma: tokenizer, model config, data and scoring.

A puzzle is written as 81 digits (``0`` = blank) after ``<bos>``; the answer is the 81 digits of the
solution followed by ``<eos>``, so the canvas (82 positions) holds the whole answer and position ``i``
of the canvas is cell ``i``. The tokenizer is a ``tokenizers`` word-level model over single characters.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from dgemma.sudoku.board import Board, generate
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


def model_config(hidden: int = 128, layers: int = 6, heads: int = 4, experts: int = 4, top_k: int = 2,
                 dense: int = 256, moe: int = 128) -> dict:
    """A DiffusionGemma ``config.json`` sized for Sudoku (sliding window covers the whole puzzle)."""
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
                                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
            "final_logit_softcapping": 30.0, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
            "use_bidirectional_attention": "vision", "tie_word_embeddings": True,
            "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
        },
    }


def puzzles(n: int, clue_range: tuple[int, int], seed: int) -> Iterable[tuple[Board, Board]]:
    """``n`` unique puzzles, clue counts uniform in ``clue_range`` (inclusive), reproducible from ``seed``."""
    rng = random.Random(seed)
    lo, hi = clue_range
    for _ in range(n):
        yield generate(rng.randint(lo, hi), rng)


def record(puzzle: Board, solution: Board) -> dict[str, str]:
    return {"prompt": "".join(map(str, puzzle)), "completion": "".join(map(str, solution))}


def write_jsonl(path: Path, items: Iterable[tuple[Board, Board]], progress=None) -> int:
    n = 0
    tmp = Path(path).with_suffix(".tmp")
    with tmp.open("w") as f:
        for puzzle, solution in items:
            f.write(json.dumps(record(puzzle, solution)) + "\n")
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
