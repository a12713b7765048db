"""CPU threads of the compute commands: ``--threads``, ``$DGEMMA_THREADS``, a user's ``$OMP_NUM_THREADS``,
else one thread for small models and torch's default (the physical cores) for large ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dgemma.cli import build_parser
from dgemma.cli.options import ONE_THREAD_BELOW, THREADS_ENV, requested_threads, thread_count
from dgemma.errors import DgemmaError

ROOT = Path(__file__).resolve().parents[1]


def test_the_choice_follows_flag_then_environment_then_model_size():
    small, large = 2_150_000, 2 * ONE_THREAD_BELOW
    assert thread_count(None, small, {}) == 1
    assert thread_count(None, large, {}) is None  # torch's default: the physical cores
    assert thread_count(None, None, {}) is None  # size unknown up front (train, bench): torch's default
    assert thread_count(None, small, {"OMP_NUM_THREADS": "2"}) is None  # the user's OMP_NUM_THREADS stands
    assert thread_count(3, small, {"OMP_NUM_THREADS": "2"}) == 3
    ns = build_parser().parse_args(["generate", "x"])
    assert requested_threads(ns, {THREADS_ENV: "4"}) == 4 and requested_threads(ns, {}) is None
    ns.threads = 2
    assert requested_threads(ns, {THREADS_ENV: "4"}) == 2  # the flag wins
    for bad in ("0", "two", "-1"):
        with pytest.raises(DgemmaError, match=THREADS_ENV):
            requested_threads(build_parser().parse_args(["generate", "x"]), {THREADS_ENV: bad})


@pytest.mark.parametrize("command", [
    ["generate", "x"], ["chat"], ["bench"], ["train", "c.toml"], ["sudoku", "solve"], ["sudoku", "eval"],
    ["sudoku", "train"],
])
def test_every_compute_command_takes_threads(command):
    assert build_parser().parse_args([*command, "--threads", "3"]).threads == 3


@pytest.mark.parametrize("command", [["generate", "x"], ["chat"], ["sudoku", "solve"], ["sudoku", "eval"]])
def test_model_commands_take_device_and_dtype(command):
    args = build_parser().parse_args([*command, "--device", "cpu", "--dtype", "float32", "--model", "m"])
    assert (args.device, args.dtype, args.model) == ("cpu", "float32", "m")


def _threads(model: str, *flags: str, **env: str) -> int:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", THREADS_ENV)}
    proc = subprocess.run([sys.executable, "-m", "dgemma", "generate", "hi", "--model", model, "--json",
                           "--max-new-tokens", "4", "--max-denoising-steps", "2", *flags],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**base, "PYTHONPATH": str(ROOT), **env})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["timings"]["threads"]


def test_generate_uses_the_chosen_threads(ckpt_factory):
    model = str(ckpt_factory("tiny"))  # a few hundred thousand parameters: one thread by default
    assert _threads(model) == 1
    assert _threads(model, "--threads", "2") == 2
    assert _threads(model, **{THREADS_ENV: "2"}) == 2
    assert _threads(model, "--threads", "1", **{THREADS_ENV: "2"}) == 1
    assert _threads(model, OMP_NUM_THREADS="2") == 2  # respected even for a small model
