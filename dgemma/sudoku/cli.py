"""``dgemma sudoku generate | train | eval | solve``: what each command does (their options:
``dgemma.sudoku.parsers``).

* ``generate``: unique puzzles by clue count or bucket, seedable; one 81-character puzzle per line, or
  JSONL with solutions. ``--rating``: minimal symmetric puzzles rated by the techniques they need
  (``rating``, ``buckets``).
* ``train``: writes the tokenizer, a tiny DiffusionGemma config and training data, then runs the project's
  trainer (``dgemma.train``) from scratch; the model is ``OUT/final`` (release format).
* ``eval``: exact boards, cell accuracy, clue preservation and steps per canvas per bucket, for diffusion
  decoding and for greedy autoregressive decoding of the same weights, on fresh puzzles (each bucket from
  its own seed, ``task.bucket_puzzles``); ``--rating``: on rated puzzles, each rating from its own seed
  (``buckets.rated_bucket``).
* ``solve``: puzzles as arguments, files or stdin, one per line -> one 81-digit answer per line, in order;
  an answer that is not a solution is named on stderr (``board.problems``) and the exit status is 1.

``--constrain`` (alias ``--pin``) on ``solve`` and ``eval``: a canvas constraint (``dgemma.constraints``,
:func:`dgemma.sudoku.solve.clue_constraint`) holds every clue cell at its digit, lets a blank cell take only the digits 1-9 and
holds ``<eos>`` after the 81 cells, on every step of every attempt (restarts included).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from dgemma.cli import options
from dgemma.errors import DgemmaError
from dgemma.fileio import atomic_write_text
from dgemma.sudoku import board as sb
from dgemma.sudoku import buckets as rated
from dgemma.sudoku import task
from dgemma.sudoku.parsers import SPEC_SAMPLER, add_parsers, attempt_shape
from dgemma.sudoku.solve import SOLVE_DEFAULTS, CellTokens, ar_boards, clue_constraint, solve_boards, solve_options

__all__ = ["add_parsers", "run"]  # what dgemma.cli calls (the parsers live in dgemma.sudoku.parsers)

CONSTRAINED = "diffusion-constrained"  # the eval row of --constrain: the solve defaults under the clue constraint


def _clue_range(args) -> tuple[int, int]:
    if args.bucket:
        if args.bucket not in sb.BUCKETS:
            raise DgemmaError(f"unknown bucket {args.bucket!r}; choose one of {', '.join(sb.BUCKETS)}")
        return sb.BUCKETS[args.bucket]
    text = str(args.clues or "36-46")
    lo, _, hi = text.partition("-")
    try:
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise DgemmaError(f"--clues takes N or LO-HI, got {text!r}") from None
    if not 17 <= lo_i <= hi_i <= 81:
        raise DgemmaError(f"--clues must lie in 17..81 with LO <= HI, got {text!r}")
    return lo_i, hi_i


def run(parser, args) -> int:
    try:
        if args.sudoku_command == "train":
            options.set_threads(args)  # solve and eval choose theirs by model size, in options.load_engine
        return {"generate": _generate, "train": _train, "eval": _eval, "solve": _solve}[args.sudoku_command](args)
    except (DgemmaError, ValueError, OSError) as e:
        parser.exit(2, f"dgemma: {e}\n")


def _generate(args) -> int:
    if args.n < 1:
        raise DgemmaError("-n must be positive")
    if args.rating:
        clue_range = _clue_range(args) if args.clues or args.bucket else None
        for line in rated.generate_lines(args.rating, args.n, args.seed, clue_range, args.jsonl, os.cpu_count() or 1):
            print(line, flush=True)
        return 0
    for puzzle, solution in task.puzzles(args.n, _clue_range(args), args.seed, workers=os.cpu_count() or 1):
        if args.jsonl:
            print(json.dumps({"puzzle": sb.format_board(puzzle), "solution": sb.format_board(solution),
                              "clues": sb.clues(puzzle)}))
        else:
            print(sb.format_board(puzzle))
    return 0


def train_recipe(out: Path, steps: int, seed: int, objective: str = "diffusion") -> dict:
    """The raw training config of ``dgemma sudoku train --out OUT`` (before ``--set`` overrides)."""
    return {
        "objective": {"kind": objective},
        "model": {"config": str(out / "model_config.json"), "tokenizer": str(out / "tokenizer")},
        "data": {"train": str(out / "train.jsonl"), "max_length": 2 * task.CANVAS, "template": "raw"},
        "train": {"out": str(out / "run"), "steps": steps, "batch_size": 32, "micro_batch": 32, "lr": 2e-3,
                  "min_lr": 1e-4, "warmup": 100, "log_every": 50, "save_every": 500, "seed": seed,
                  "weight_decay": 0.01, "precision": "fp32", "activation_checkpointing": False},
    }  # fp32 on every machine: the shipped model's numerics (bf16 autocast is also slower at this size)


def _train(args) -> int:
    from dgemma import loading
    from dgemma.train import config, dist, launch

    if args.puzzles < 1 or args.augment < 1:
        raise DgemmaError("--puzzles and --augment must be positive")
    if not 0.0 <= args.minimal <= 1.0:
        raise DgemmaError(f"--minimal takes a share from 0 to 1, got {args.minimal}")
    if args.hold_clues and args.objective == "ar":
        raise DgemmaError("--hold-clues holds cells on the diffusion canvas; --objective ar has none")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir, data = out / "tokenizer", out / "train.jsonl"
    task.build_tokenizer().save(tok_dir)
    (out / "model_config.json").write_text(json.dumps(task.model_config(), indent=2) + "\n")
    recipe = {"puzzles": args.puzzles, "clues": list(_clue_range(args)), "seed": args.seed, "augment": args.augment,
              **({"minimal": args.minimal} if args.minimal else {}),  # no key at 0: older run folders still match
              **({"hold_clues": True} if args.hold_clues else {})}
    meta = out / "train.recipe.json"
    if not data.is_file() or not meta.is_file() or json.loads(meta.read_text()) != recipe:
        pairs = task.training_puzzles(args.puzzles, _clue_range(args), args.seed, args.minimal, args.workers)
        with _bar(f"generating {args.puzzles} puzzles", args.puzzles * args.augment) as tick:
            task.write_jsonl(data, task.augmented(pairs, args.augment, args.seed), tick, args.hold_clues)
        atomic_write_text(meta, json.dumps(recipe) + "\n")
    raw = train_recipe(out, args.steps, args.seed, args.objective)
    for text in args.overrides:
        (section, key), value = config.parse_override(text)
        raw.setdefault(section, {})[key] = value
    cfg = config.from_dict(raw)
    env = dist.setup(cfg.train.device)
    t0 = time.perf_counter()
    try:
        result, status = launch.train(cfg, env, args.resume, sys.argv[1:])
    finally:
        dist.teardown()
    if result is None:  # interrupted; launch said how to resume
        return status
    if env.main and result.final is not None:
        gen = loading.read_generation_config(result.final)  # split into the two files again on writing
        loading.write_generation_config(result.final, {**gen, **SOLVE_DEFAULTS})
        print(json.dumps({"model": str(result.final), "seconds": round(time.perf_counter() - t0, 1),
                          "last": result.history[-1] if result.history else None}))
    return 0


@contextmanager
def _bar(what: str, total: int, announce: bool = True):
    """A rich progress bar on stderr when it is a terminal; yields ``tick(n)``. ``announce``: also say
    ``what`` on a line of its own when stderr is not a terminal."""
    if announce or sys.stderr.isatty():
        print(f"{what} ...", file=sys.stderr)
    if not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task_id = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task_id, n)


def _scored(pairs, what: str, solve) -> dict:
    """Score ``solve(tick) -> [(answer, steps or None)]`` on ``pairs``; the summary plus seconds per puzzle
    (all the time over all the puzzles) and, when every tick reports one puzzle (``--batch 1``), the median and
    90th percentile of the puzzles' own wall times (from one tick to the next)."""
    t0 = time.perf_counter()
    score = task.Score()
    ticks = [(t0, 0)]
    with _bar(what, len(pairs)) as bar:
        def tick(n: int) -> None:
            ticks.append((time.perf_counter(), n))
            bar(n)

        answers = solve(tick)
    for (p, s), (a, steps) in zip(pairs, answers):
        score.add(p, s, a, steps)
    out = {**score.summary(), "seconds_per_puzzle": (time.perf_counter() - t0) / len(pairs)}
    if len(ticks) == len(pairs) + 1 and all(n == 1 for _, n in ticks[1:]):
        each = sorted(b - a for (a, _), (b, _) in zip(ticks, ticks[1:]))
        out["median_seconds"] = statistics.median(each)
        out["p90_seconds"] = each[math.ceil(0.9 * len(each)) - 1]  # nearest rank
    return out


def _check_sampling(args) -> None:
    """Fail on bad ``--restarts`` / ``--restart-entropy`` / attempt options before loading a model."""
    from dgemma.params import SamplingParams

    if args.max_steps is not None and args.max_steps < 1:
        raise DgemmaError(f"--max-steps must be a positive integer, got {args.max_steps}")
    SamplingParams(**{**SOLVE_DEFAULTS, **solve_options(args.restarts, args.restart_entropy, **attempt_shape(args))})


def bucket_pairs(name: str, n: int, seed: int) -> list[tuple[sb.Board, sb.Board]]:
    """``eval``'s ``(puzzle, solution)`` pairs of one bucket (``task.bucket_puzzles``, or a rated bucket:
    ``buckets.rated_bucket``), with a progress bar."""
    pairs = []
    draw = rated.rated_bucket if rated.is_rated(name) else task.bucket_puzzles
    with _bar(f"{name}: generating {n} puzzles", n) as tick:
        for pair in draw(n, name, seed, workers=os.cpu_count() or 1):
            pairs.append(pair)
            tick(1)
    return pairs


def _eval(args) -> int:
    if args.n < 1 or args.batch < 1 or args.skip < 0:
        raise DgemmaError("-n and --batch must be positive, --skip at least 0")
    default = "" if args.rating else "unsloth,medium,hard"
    buckets = [b.strip() for b in (args.buckets or default).split(",") if b.strip()]
    for name in buckets:
        if name not in sb.BUCKETS:
            raise DgemmaError(f"unknown bucket {name!r}; choose from {', '.join(sb.BUCKETS)}")
    buckets += [rated.bucket_name(r) for r in rated.parse_ratings(args.rating)] if args.rating else []
    _check_sampling(args)
    if any(not t > 0 for t in args.ar_temperature):
        raise DgemmaError("--ar-temperature values must be positive (greedy decoding is always scored)")
    engine = options.load_engine(args)
    if args.constrain:
        CellTokens(engine)  # a model that cannot be constrained fails before the puzzles are drawn
    rows = {}
    for name in buckets:
        pairs = bucket_pairs(name, args.skip + args.n, args.seed)[args.skip:]
        boards = [p for p, _ in pairs]
        shape = attempt_shape(args)  # every diffusion row's
        modes = {"diffusion": lambda tick: solve_boards(engine, boards, args.batch, tick, **shape)
                 } if args.diffusion else {}
        if args.restarts is not None or args.restart_entropy is not None:
            n = SOLVE_DEFAULTS["restarts"] if args.restarts is None else args.restarts
            h = SOLVE_DEFAULTS["restart_entropy"] if args.restart_entropy is None else args.restart_entropy
            name_h = f"-below{h:g}" if h is not None else ""
            modes[f"diffusion-restarts{n}{name_h}" if n else SPEC_SAMPLER] = lambda tick: solve_boards(
                engine, boards, args.batch, tick, restarts=n, restart_entropy=h, **shape)
        if args.constrain:
            modes[CONSTRAINED] = lambda tick: solve_boards(engine, boards, args.batch, tick, constrain=True, **shape)
        if args.ar:
            modes["autoregressive"] = lambda tick: [(a, None) for a in ar_boards(engine, boards, args.batch, tick)]
            for t in args.ar_temperature:
                modes[f"autoregressive-T{t:g}"] = lambda tick, t=t: [
                    (a, None) for a in ar_boards(engine, boards, args.batch, tick, temperature=t, seed=args.seed)]
        row = {mode: _scored(pairs, f"{name}: {mode}", solve) for mode, solve in modes.items()}
        rows[name] = row
        if not args.json:
            for mode, r in row.items():
                print(f"{name:8s} {mode:20s} exact {r['exact']:6.1%}  cells {r['cell_accuracy']:6.1%}  "
                      f"clues kept {r['clue_preservation']:6.1%}  "
                      + (f"steps {r['mean_steps']:5.1f}  " if "mean_steps" in r else "")
                      + f"{r['seconds_per_puzzle'] * 1000:7.1f} ms/puzzle"
                      + (f" (median {r['median_seconds'] * 1000:.1f} ms)" if "median_seconds" in r else ""))
    if args.json:
        print(json.dumps(rows))
    return 0


def _solve(args) -> int:
    """Print one answer per puzzle on stdout; name each answer that is not a solution, then a summary, on
    stderr. Exit status 1 when any answer is not a solution."""
    puzzles = sb.read_puzzles(args.inputs, sys.stdin)
    if args.batch < 1:
        raise DgemmaError("--batch must be positive")
    _check_sampling(args)
    engine = options.load_engine(args)
    boards = [b for b, _ in puzzles]
    cells = CellTokens(engine) if args.constrain else None  # a model that cannot be constrained fails first

    def answers():
        if not args.show:  # a bar on a terminal: a board that never settles runs every restart to the cap
            what = f"solving {len(boards)} puzzle" + ("s" if len(boards) != 1 else "")
            with _bar(what, len(boards), announce=False) as tick:
                found = solve_boards(engine, boards, args.batch, tick, seed=args.seed, constrain=args.constrain,
                                     restarts=args.restarts, restart_entropy=args.restart_entropy,
                                     **attempt_shape(args))
            yield from (a for a, _ in found)
            return
        from dgemma.sudoku.view import solve_live

        extra = solve_options(args.restarts, args.restart_entropy, **attempt_shape(args))
        for b in boards:
            yield solve_live(engine, b, {**SOLVE_DEFAULTS, "seed": args.seed, **extra},
                             constraint=clue_constraint(engine, b, cells) if cells else None)

    invalid = 0
    for k, ((board, where), answer) in enumerate(zip(puzzles, answers()), 1):
        print(sb.format_board(answer), flush=True)
        problems = sb.problems(answer, board)
        if problems:
            invalid += 1
            more = f"; and {len(problems) - 4} more" if len(problems) > 4 else ""
            print(f"dgemma: answer {k} ({where}) is not a solution: {'; '.join(problems[:4])}{more}",
                  file=sys.stderr, flush=True)
    print(f"dgemma: {len(puzzles) - invalid} solved, {invalid} invalid", file=sys.stderr)
    return 1 if invalid else 0
