"""Train a tiny DiffusionGemma from scratch on a synthetic task (reverse a letter string) and measure it.

Prints the loss curve, exact-match and character accuracy of diffusion decoding on held-out strings after
training, and the peak memory of ``small``-preset training steps (full training, and LoRA on a random
``small`` checkpoint).

    python benchmarks/train_reverse.py [--steps 2000] [--out /tmp/dgemma-reverse]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

import dgemma
from dgemma.bench.measure import PeakMemory, _vm_hwm_bytes
from dgemma.tokenizer import write_test_tokenizer
from dgemma.train import config
from dgemma.train.trainer import Trainer


def task(path: Path, n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[dict]:
    """``n`` strings of 3-7 letters and their reversals, none of them in ``exclude`` (held-out data is
    disjoint from the training strings; the held-out strings are also distinct from each other)."""
    r = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        s = "".join(r.choice("abcdefgh") for _ in range(r.randint(3, 7)))
        if s in exclude or (exclude and s in seen):
            continue
        seen.add(s)
        rows.append({"prompt": s, "completion": s[::-1]})
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return rows


def accuracy(model_dir: Path, rows: list[dict]) -> dict:
    """Exact match and per-character accuracy of greedy-ish diffusion decoding on ``rows``."""
    engine = dgemma.load(model_dir)
    exact = chars = total = 0
    for x in rows:
        reply = engine.chat([{"role": "user", "content": x["prompt"]}], max_new_tokens=16, seed=0,
                            t_max=1e-3, t_min=1e-3)
        got, want = reply.answer.strip(), x["completion"]
        exact += got == want
        chars += sum(a == b for a, b in zip(got, want))
        total += len(want)
    return {"exact_match": exact / len(rows), "char_accuracy": chars / total, "n": len(rows)}


def _small_checkpoint(path: Path, tok: Path) -> Path:
    """A random ``small``-preset checkpoint with the byte tokenizer, for LoRA to adapt."""
    if not (path / "config.json").is_file():
        from dgemma.loading import build_model, save_checkpoint
        from dgemma.tokenizer import Tokenizer
        from dgemma.train.model_setup import scratch_config

        cfg = config.from_dict({"model": {"preset": "small", "tokenizer": str(tok)}, "data": {"train": "x"}})
        tokenizer = Tokenizer.from_dir(tok)
        save_checkpoint(build_model(scratch_config(cfg, tokenizer), seed=0), path)
        tokenizer.save(path)
    return path


def memory_per_parameter(out: Path, tok: Path, train: Path, lora: bool) -> dict:
    model = {"init": str(_small_checkpoint(out.parent / "small-base", tok))} if lora else \
        {"preset": "small", "tokenizer": str(tok)}
    raw = {"model": model,
           "data": {"train": str(train), "max_length": 512},
           "lora": {"enabled": lora},
           "train": {"out": str(out), "steps": 2, "batch_size": 1, "micro_batch": 1, "save_every": 0,
                     "precision": "fp32", "warmup": 0}}
    trainer = Trainer(config.from_dict(raw), show_progress=False, log=lambda m: None)
    with PeakMemory(torch.device("cpu")) as peak:
        before = _vm_hwm_bytes()  # the high-water mark was just reset: this is the RSS with the model built
        for step in range(2):
            trainer.train_step(step)
    return {"lora": lora, "trainable": trainer.trainable, "peak_rss": peak.bytes, "rss_before": before,
            "bytes_per_trainable": (peak.bytes - before) / trainer.trainable}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--out", default="/tmp/dgemma-reverse")
    ap.add_argument("--no-memory", dest="memory", action="store_false")
    ap.add_argument("--json", help="also write the printed records to this JSON file")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_test_tokenizer(out / "tok", 272)
    seen = frozenset(x["prompt"] for x in task(out / "train.jsonl", 4000, 0))
    held = task(out / "eval.jsonl", 100, 1, exclude=seen)
    cfg = config.from_dict({
        "model": {"preset": "tiny", "tokenizer": str(out / "tok")},
        "data": {"train": str(out / "train.jsonl"), "eval": str(out / "eval.jsonl"), "max_length": 64},
        "train": {"out": str(out / "run"), "steps": args.steps, "batch_size": 16, "micro_batch": 16,
                  "lr": 3e-3, "min_lr": 3e-4, "warmup": 20, "log_every": 25, "eval_every": 100,
                  "save_every": 100, "precision": "fp32"},
    })
    t0 = time.perf_counter()
    result = Trainer(cfg, show_progress=False).run()
    took = time.perf_counter() - t0
    records = [{"train_seconds": round(took, 1), "first_loss": result.history[0]["loss"],
                "last_loss": result.history[-1]["loss"], "evals": result.evals,
                "peak_rss": result.peak_memory_bytes, "trainable": result.trainable_parameters},
               {"held_out": accuracy(result.final, held),
                "held_out_in_train": sum(x["prompt"] in seen for x in held)}]
    for record in records:
        print(json.dumps(record))
    for lora in (False, True) if args.memory else ():
        records.append(memory_per_parameter(out / f"mem-{int(lora)}", out / "tok", out / "train.jsonl", lora))
        print(json.dumps(records[-1]))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": "python benchmarks/train_reverse.py "
                                               f"--steps {args.steps}", "torch": torch.__version__,
                                               "records": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
