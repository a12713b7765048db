"""The solver: diffusion answers under the solve defaults (restarts from the model's own confidence), the
clue constraint (``--constrain``: clues held, blanks limited to the digits 1-9, on every step of every
restart, through ``dgemma.constraints``), and left-to-right answers of the same weights for comparison.
The engine is an argument; ``dgemma.sudoku.cli`` is the command line around these."""

from __future__ import annotations

from dgemma.errors import DgemmaError
from dgemma.sudoku import board as sb
from dgemma.sudoku import task

SOLVE_DEFAULTS = {"max_new_tokens": task.CANVAS, "max_denoising_steps": 16, "t_max": 0.2, "t_min": 0.05,
                  "stability_threshold": 1, "confidence_threshold": 0.005, "entropy_bound": 0.1,
                  # A board that does not settle within 16 steps, or settles less sure than 1e-18 nats per cell,
                  # is solved again from fresh noise, up to 127 times; the most confident attempt is kept. At
                  # 16 steps the temperature falls twice as fast as at 32, and more wrong boards settle sure
                  # of themselves: below 1e-12 they ended the restarts (hard validation boards saturated at
                  # 67%), below 1e-18 few do. On validation puzzles (seed 4242, 200 per bucket) this solved
                  # hard 84.0% and rated easy 92.0% in 409 / 275 steps per board (one attempt after another),
                  # against 72.5% / - in 610 / - for the 32-step cap with 63 restarts below 1e-12
                  # (docs/TRAINING.md). The worst case is
                  # the same 2,048 steps (128 x 16, was 64 x 32); boards solved on the first attempt cost less.
                  # Two attempts run at once, as two rows of each decoder pass (the first that qualifies wins):
                  # one puzzle at a time, a pass costs ~1.5x but a board needs about half the passes (first 100
                  # medium evaluation puzzles, side by side: median 193 vs 205 ms, mean 1.07 vs 1.41 s;
                  # docs/bench/sudoku-parallel-attempts-xeon.json).
                  "restarts": 127, "restart_entropy": 1e-18, "restart_after": None, "parallel_attempts": 2,
                  "seed": 0}


CONSTRAIN_ERROR = ("--constrain needs a model that writes a board as one token per cell and the digits 1-9 as "
                   "one token each, in a canvas of at least 81 positions (as `dgemma sudoku train` makes it)")


class CellTokens:
    """A model's tokens for the board: ``digits[d]`` is the token of digit ``d`` (0-9), ``eos`` the end token
    (None: the tokenizer has none), ``canvas`` the canvas length. Raises DgemmaError (``CONSTRAIN_ERROR``)
    unless each digit is one token and the canvas holds the 81 cells."""

    def __init__(self, engine):
        digits = "0123456789"
        ids = engine.tokenizer.encode(digits) if engine.tokenizer is not None else []
        self.canvas = engine.config.canvas_length
        if len(ids) != 10 or engine.decode(ids) != digits or self.canvas < 81 or \
                any(engine.decode([t]) != d for t, d in zip(ids, digits)):
            raise DgemmaError(CONSTRAIN_ERROR)
        import torch

        self.engine, self.digits, self.eos = engine, ids, engine.tokenizer.eos_id
        # one allowed set: the digits 1-9 (a blank cell may not stay 0, nor take <eos> or another token)
        self.table = torch.zeros(1, engine.config.vocab_size, dtype=torch.bool)  # [1, V]
        self.table[0, ids[1:]] = True

    def rule(self, board: sb.Board):
        """The clue constraint of ``board`` for one canvas: clues fixed, blanks in the 1-9 set, ``<eos>`` fixed
        at position 81 (when the canvas has it), later positions free."""
        import torch

        from dgemma.constraints import CanvasRule

        text = sb.format_board(board)
        cells = self.engine.encode_prompt(text)[-81:]  # the prompt writes each cell as the answer does
        if len(cells) != 81 or self.engine.decode(cells) != text or \
                any(t != self.digits[v] for t, v in zip(cells, board)):
            raise DgemmaError(CONSTRAIN_ERROR)
        fixed = torch.full((self.canvas,), -1, dtype=torch.long)
        index = torch.full((self.canvas,), -1, dtype=torch.long)
        for i, v in enumerate(board):
            if v:
                fixed[i] = self.digits[v]
            else:
                index[i] = 0
        if self.canvas > 81 and self.eos is not None:
            fixed[81] = self.eos
        return CanvasRule(fixed=fixed, set_index=index, table=self.table)


def clue_constraint(engine, board: sb.Board, cells: CellTokens | None = None):
    """``board``'s canvas constraint (``dgemma.constraints.Rules`` on canvas 0, so on every restart of it):
    each clue cell fixed to its digit's token, each blank cell limited to the digits 1-9, ``<eos>`` fixed after
    the 81 cells. ``cells``: the model's :class:`CellTokens` (made when not given). DgemmaError for a model that
    does not write one token per cell."""
    from dgemma.constraints import Rules

    return Rules({0: (cells or CellTokens(engine)).rule(board)})


def solve_boards(engine, boards: list[sb.Board], batch: int = 32, tick=None, seed: int = SOLVE_DEFAULTS["seed"],
                 constrain: bool = False, restarts: int | None = None, restart_entropy: float | None = None,
                 max_steps: int | None = None, restart_after: int | None = None,
                 parallel_attempts: int | None = None):
    """Diffusion answers for ``boards``: ``[(answer board, steps)]``; ``tick(n)`` after each batch.

    Reproducible for a given ``seed`` (each row of a batch equals its solo run). ``constrain``: each board
    decodes under its :func:`clue_constraint` (clues held, blanks limited to 1-9, on every step and restart).
    ``restarts`` and ``restart_entropy`` (default: the solve defaults'): boards that do not settle within the
    step cap, or settle with a mean entropy at or above ``restart_entropy``, are denoised again from noise, up
    to ``restarts`` times, and the most confident attempt is kept (``SamplingParams.restarts``).
    ``max_steps``: the step cap of each attempt (default: the solve defaults'; the temperature falls over it);
    ``restart_after``: the steps after which an unsettled attempt is given up while a restart remains;
    ``parallel_attempts``: attempts of a board run at once (the first that qualifies wins). The steps
    returned are decoder passes: with parallel attempts a pass carries that many rows per board.
    """
    extra = solve_options(restarts, restart_entropy, max_steps, restart_after, parallel_attempts)
    cells = CellTokens(engine) if constrain else None
    out = []
    for i in range(0, len(boards), batch):
        chunk = boards[i: i + batch]
        rules = [clue_constraint(engine, b, cells) for b in chunk] if constrain else None
        for c in engine.generate([sb.format_board(b) for b in chunk], constraint=rules,
                                 **{**SOLVE_DEFAULTS, "seed": seed, **extra}):
            out.append((task.answer_board(c.text), sum(c.steps)))
        if tick:
            tick(len(chunk))
    return out


def ar_boards(engine, boards: list[sb.Board], batch: int = 32, tick=None, temperature: float = 0.0,
              seed: int = 0) -> list[sb.Board]:
    """Left-to-right answers of the same weights (encoder mode, one token per pass): greedy, or sampled at
    ``temperature`` (seeded; each batch draws from ``seed`` + its index)."""
    import torch

    from dgemma.bench.baselines import autoregressive

    out = []
    for i in range(0, len(boards), batch):
        ids = torch.tensor([engine.encode_prompt(sb.format_board(b)) for b in boards[i: i + batch]])
        with torch.no_grad():
            run = autoregressive(engine.model, ids, 81, temperature=temperature, seed=seed + i)
        out += [task.answer_board(engine.decode(t)) for t in run.tokens]
        if tick:
            tick(len(ids))
    return out


def solve_options(restarts: int | None = None, restart_entropy: float | None = None,
                  max_steps: int | None = None, restart_after: int | None = None,
                  parallel_attempts: int | None = None) -> dict:
    """Sampling overrides of the solve defaults (None: keep the default's)."""
    named = {"restarts": restarts, "restart_entropy": restart_entropy, "max_denoising_steps": max_steps,
             "restart_after": restart_after, "parallel_attempts": parallel_attempts}
    return {k: v for k, v in named.items() if v is not None}
