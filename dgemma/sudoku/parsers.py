"""The argument parsers of ``dgemma sudoku generate | train | eval | solve`` (``dgemma.sudoku.cli`` runs them)."""

from __future__ import annotations

import os

from dgemma.cli import options
from dgemma.sudoku import board as sb
from dgemma.sudoku import buckets as rated
from dgemma.sudoku import task
from dgemma.sudoku.solve import SOLVE_DEFAULTS

EVAL_SEED = 1_000_003  # differs from every training seed the commands use by default
SPEC_SAMPLER = "spec-sampler"  # the eval row with no restarts: the sampler exactly as the spec has it


def add_parsers(sub) -> None:
    s = sub.add_parser("sudoku", help="Sudoku: generate puzzles, train, evaluate and solve").add_subparsers(
        dest="sudoku_command", required=True)
    g = s.add_parser("generate", help="puzzles with a unique solution")
    g.add_argument("-n", type=int, default=10, help="how many (default 10)")
    g.add_argument("--clues", help="clue count N or range LO-HI (default 36-46; 22-32 with --rating)")
    g.add_argument("--bucket", help="easy (>=40), medium (30-39), hard (<30) or unsloth (36-46)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--jsonl", action="store_true", help="JSON lines with puzzle, solution and clue count")
    g.add_argument("--rating", help="easy, medium, hard or search: minimal puzzles with 180-degree symmetry whose "
                                    "hardest needed technique is of that level (JSON lines gain \"rating\")")
    t = s.add_parser("train", help="train the tiny Sudoku model from scratch")
    t.add_argument("--out", default="runs/sudoku")
    t.add_argument("--puzzles", type=int, default=10000, help="training puzzles to generate (default 10000)")
    t.add_argument("--augment", type=int, default=8,
                   help="examples per puzzle: the puzzle and N-1 symmetric views of it (default 8)")
    t.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes generating puzzles")
    t.add_argument("--clues", default="24-50")
    t.add_argument("--minimal", type=float, default=0.0, metavar="SHARE",
                   help="share of the generated puzzles (before --augment's views) that are minimal puzzles "
                        "with 180-degree symmetry (mostly 24-30 clues, like published ones) instead of drawn by "
                        "--clues (0..1, rounded to whole puzzles; default %(default)s)")
    t.add_argument("--hold-clues", action="store_true",
                   help="hold the clue cells on the canvas in training (never noised), as --constrain does when "
                        "solving; solve and eval such a model with --constrain")
    t.add_argument("--bucket")
    t.add_argument("--steps", type=int, default=2200)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--objective", choices=("diffusion", "ar"), default="diffusion",
                   help="diffusion (the embedded model's), or ar: next-token prediction only, the same architecture, "
                        "data and steps (an autoregressive baseline; `sudoku eval` scores it in the AR column)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    options.add_threads_option(t)
    e = s.add_parser("eval", help="accuracy per bucket, diffusion against autoregressive decoding")
    options.add_model_options(e)
    e.add_argument("-n", type=int, default=1000, help="puzzles per bucket (default %(default)s)")
    e.add_argument("--buckets", help=f"comma-separated, from {', '.join(sb.BUCKETS)} (default unsloth,medium,hard; "
                                     "none with --rating)")
    e.add_argument("--rating", help="rated buckets (after those of --buckets, when given), comma-separated levels "
                                    "from easy, medium, hard, search: minimal symmetric puzzles, each level from "
                                    "SEED plus its own offset ("
                                    + ", ".join(f"{k} +{o}" for k, o in rated.RATING_SEED_OFFSETS.items())
                                    + "); rows rated-LEVEL; hard puzzles are rare, several CPU seconds each "
                                    "(default: none)")
    e.add_argument("--seed", type=int, default=EVAL_SEED,
                   help="puzzle seed; each bucket draws from SEED plus its own offset ("
                        + ", ".join(f"{b} +{o}" for b, o in task.BUCKET_SEED_OFFSETS.items())
                        + "), so the buckets do not share solution grids (default %(default)s)")
    e.add_argument("--skip", type=int, default=0, metavar="K",
                   help="score puzzles K+1 to K+n of each bucket (the first K are drawn and left out), so that "
                        "runs can split a bucket between them (default %(default)s)")
    e.add_argument("--batch", type=int, default=32,
                   help="puzzles decoded together (default %(default)s); 1 also reports the median and 90th "
                        "percentile of the wall time per puzzle")
    e.add_argument("--no-ar", dest="ar", action="store_false",
                   help="skip greedy autoregressive decoding of the same weights (default: score it too)")
    e.add_argument("--ar-temperature", type=float, nargs="+", default=[], metavar="T",
                   help="also score autoregressive decoding sampled at each temperature T > 0 (seeded by --seed), "
                        "beside greedy (default: greedy only)")
    e.add_argument("--no-diffusion", dest="diffusion", action="store_false",
                   help="skip the diffusion row (for a model trained with `sudoku train --objective ar`)")
    e.add_argument("--constrain", "--pin", dest="constrain", action="store_true",
                   help="also decode under the clue constraint, side by side, row 'diffusion-constrained': clue cells "
                        "held at their digit, blanks limited to the digits 1-9, <eos> after the 81 cells, on every "
                        "step of every restart; the solve defaults otherwise (--pin is an alias; default: off)")
    e.add_argument("--restarts", type=int, metavar="N",
                   help="also score diffusion with up to N restarts of boards that do not settle (or are not "
                        "sure enough, see --restart-entropy), side by side with the solve defaults; N = 0 is "
                        f"the spec's sampler, row '{SPEC_SAMPLER}' (default: no such row)")
    _add_attempt_options(e)
    e.add_argument("--restart-entropy", type=float, metavar="H",
                   help="in that row, also restart a board that settles with a mean entropy of H or more "
                        f"(default {SOLVE_DEFAULTS['restart_entropy']}; with no --restarts, "
                        f"{SOLVE_DEFAULTS['restarts']} restarts)")
    e.add_argument("--json", action="store_true",
                   help="print one JSON object, {bucket: {row: scores}}, instead of the table (default: table)")
    v = s.add_parser("solve", help="solve puzzles given as arguments, in files or on stdin, one per line",
                     epilog="Exit status: 0 when every answer is a solution (a full grid that breaks no row, "
                            "column or box rule and keeps every clue); 1 when any is not (each is named on "
                            "stderr; stdout still has one answer per puzzle); 2 on a usage mistake.")
    v.add_argument("inputs", nargs="*", metavar="PUZZLE|FILE",
                   help="an 81-character puzzle (0 or . for a blank), or a file of them, one per line ('-' or none: "
                        "stdin)")
    options.add_model_options(v)
    v.add_argument("--batch", type=int, default=32, help="puzzles decoded together (default %(default)s)")
    v.add_argument("--show", action="store_true", help="draw each board live as it is denoised (on stderr)")
    v.add_argument("--seed", type=int, default=SOLVE_DEFAULTS["seed"], help="sampling seed (default 0)")
    v.add_argument("--constrain", "--pin", dest="constrain", action="store_true",
                   help="decode under the clue constraint: clue cells held at their digit, blanks limited to the "
                        "digits 1-9, <eos> after the 81 cells, on every step of every restart (--pin is an alias; "
                        "default: off, the canvas is free)")
    v.add_argument("--restarts", type=int, metavar="N", help="denoise a board that does not settle within the "
                   f"step cap again, up to N times (default {SOLVE_DEFAULTS['restarts']})")
    _add_attempt_options(v)
    v.add_argument("--restart-entropy", type=float, metavar="H", help="also restart a board that settles with a "
                   f"mean entropy of H or more (default {SOLVE_DEFAULTS['restart_entropy']})")


def _add_attempt_options(p) -> None:
    """The shape of one attempt, for ``eval`` (every diffusion row) and ``solve``."""
    p.add_argument("--max-steps", type=int, metavar="N",
                   help="denoising steps at most per attempt; the temperature falls from t_max to t_min over "
                        f"them (default {SOLVE_DEFAULTS['max_denoising_steps']})")
    p.add_argument("--restart-after", type=int, metavar="N",
                   help="give up an unsettled attempt after N steps while a restart remains; the temperature still "
                        f"falls over --max-steps (default {SOLVE_DEFAULTS['restart_after'] or 'none'})")
    p.add_argument("--parallel-attempts", type=int, metavar="N",
                   help="attempts of a board run at once, as rows of one decoder pass; the first that qualifies "
                        f"wins (default {SOLVE_DEFAULTS['parallel_attempts']})")


def attempt_shape(args) -> dict:
    """The attempt options of ``args`` as ``solve_boards`` keywords (None: the solve default)."""
    return {"max_steps": args.max_steps, "restart_after": args.restart_after,
            "parallel_attempts": args.parallel_attempts}
