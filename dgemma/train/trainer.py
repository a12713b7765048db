"""The training loop: build (or load) the model, read the data, optimise, evaluate, save, resume.

One optimiser step takes ``train.batch_size`` examples (over all processes), in micro-batches of
``train.micro_batch``; losses are divided by the step's global token counts (spec 4.5), so the result
does not depend on how the batch is split. AdamW with linear warm-up and cosine decay, gradient clipping,
bf16 autocast where the hardware has it, activation checkpointing. Checkpoints are atomic and resumable
(``dgemma.train.checkpoint``); a resumed run continues the same loss curve, and the learning-rate schedule
keeps the length it had when the run started (``train.schedule_steps`` changes it). ``objective.kind = "ar"``
trains only the encoder's next-token loss (no decoder pass). What the output directory allows (a new run
only in an empty one; nothing to do for a finished one) is ``dgemma.train.rundir``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from dgemma.bench.measure import PeakMemory
from dgemma.errors import DgemmaError
from dgemma.fileio import atomic_write_text
from dgemma.train import checkpoint, dist, lora, rundir
from dgemma.train.config import TrainConfig
from dgemma.train.data import DataStats, DataStream, ExampleBuilder, collate
from dgemma.train.model_setup import ModelSetup, build, fill_eos, initial_state, merge_adapter, plan
from dgemma.train.objective import EVAL_STREAM, Objective, draw, draws, token_counts
from dgemma.train.progress import Progress
from dgemma.train.rundir import LOG_FILE


@dataclass
class TrainResult:
    out: Path
    final: Path | None  # release-format model (merged, for LoRA)
    adapter: Path | None  # LoRA adapter directory
    history: list[dict] = field(default_factory=list)  # one entry per logged step
    evals: list[dict] = field(default_factory=list)
    trainable_parameters: int = 0
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""
    data: DataStats | None = None
    step: int = 0  # the step the run is at when this call returns


def lr_at(step: int, cfg: TrainConfig, schedule_steps: int | None = None) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr`` at ``schedule_steps``
    (default ``train.schedule_steps``, or ``train.steps`` when that is 0), and ``min_lr`` after it."""
    t = cfg.train
    end = schedule_steps or t.schedule_steps or t.steps
    if step < t.warmup:
        return t.lr * (step + 1) / (t.warmup + 1)
    progress = (step - t.warmup) / max(1, end - t.warmup)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    from dgemma.loading import cpu_has_fast_bf16

    fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()
    return torch.bfloat16 if fast else None


class Trainer:
    def __init__(self, cfg: TrainConfig, env: dist.Dist | None = None, setup: ModelSetup | None = None,
                 log: Callable[[str], None] | None = None, show_progress: bool | None = None):
        self.cfg, self.t = cfg, cfg.train
        self.env = env or dist.setup(cfg.train.device)
        self.out = Path(self.t.out)
        self.say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.show_progress = show_progress
        self.done = 0  # optimiser steps completed (read after an interrupt)
        self.schedule_steps = self.t.schedule_steps or self.t.steps  # on resume: the checkpoint's, unless set
        self.ar_only = cfg.objective.kind == "ar"
        self.autocast = resolve_precision(self.t.precision, self.env.device)
        per_step = self.t.micro_batch * self.env.world
        if self.t.batch_size % per_step:
            raise DgemmaError(f"train.batch_size ({self.t.batch_size}) must be a multiple of micro_batch x "
                              f"processes ({self.t.micro_batch} x {self.env.world})")
        self.accum = self.t.batch_size // per_step
        # Tokenizer, model config and data first: a bad data line is reported before a big model loads.
        planned = (setup.tokenizer, setup.model.cfg, None) if setup is not None else plan(cfg)
        self._load_data(*planned[:2])
        # Sharded full training starts from a storage-less model: no process ever holds all the weights
        # on its device (LoRA keeps the frozen base whole on each device, as it is not trained).
        deferred = self.env.sharded and setup is None and not cfg.lora.enabled
        self.setup = setup or build(cfg, self.env.device, self.autocast, planned, meta=deferred)
        s = self.setup
        self.objective = Objective(s.net, cfg.objective, checkpoint=self.t.activation_checkpointing)
        self.objective.train()
        if self.env.sharded:
            dist.shard(self.objective, s.model.layers)
        if deferred:
            state = initial_state(cfg, planned[1], planned[2]) if self.env.main else {}
            dist.materialize(self.objective, s.model, {"net." + k: v for k, v in state.items()}, self.env)
            del state
        named = [(n, p) for n, p in self.objective.named_parameters() if p.requires_grad]
        if not named:
            raise DgemmaError("nothing to train: every parameter is frozen")
        self.params = [p for _, p in named]
        self.trainable = sum(p.numel() for p in self.params)
        groups = [{"params": [p for _, p in named if p.ndim >= 2], "weight_decay": self.t.weight_decay},
                  {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.t.lr, betas=self.t.betas,
                                           eps=self.t.adam_eps)

    # ------------------------------------------------------------------ data
    def _load_data(self, tokenizer, model_cfg) -> None:
        d = self.cfg.data
        if d.max_length > model_cfg.max_position_embeddings:
            raise DgemmaError(f"data.max_length ({d.max_length}) exceeds the model's context "
                              f"({model_cfg.max_position_embeddings})")
        eos = fill_eos(tokenizer, model_cfg)
        builder = ExampleBuilder(tokenizer, model_cfg.canvas_length, d.max_length, d.overlong, d.template,
                                 eos_id=eos)
        self.stats, eval_stats = DataStats(), DataStats()
        self.examples = builder.load(d.train, self.stats)
        self.eval_examples = builder.load(d.eval, eval_stats) if d.eval else []
        self.stream = DataStream(len(self.examples), self.t.seed)
        if self.env.main:
            self.say(f"data: {self.stats.summary()}; end-of-answer fill id {eos}")
            if d.eval:
                self.say(f"eval data: {eval_stats.summary()}")
            if self.t.sample_prompts and self.t.sample_every and self.env.sharded:
                self.say("note: sample generation runs only in single-process training; skipped under torchrun")
        for path, stats in ((d.train, self.stats), (d.eval, eval_stats)):
            problem = stats.unknown_problem()
            if problem and not d.allow_unknown:
                raise DgemmaError(f"{path}: {problem}. Use a tokenizer that covers it (from scratch, model.tokenizer"
                                  " = \"bytes\" builds a byte-level one) or set data.allow_unknown = true")
            if problem and self.env.main:
                self.say(f"warning: {path}: {problem}")

    # ------------------------------------------------------------------ steps
    def _amp(self):
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.autocast)

    def _first_pass(self, flat, i: int) -> bool | None:
        """Sharded: whether any process's micro-batch ``i`` self-conditions (then all run the pass)."""
        if not self.env.sharded:
            return None
        per = self.t.micro_batch * self.env.world * self.cfg.objective.draws_per_example
        return any(d.self_condition for d in flat[i * per: (i + 1) * per])

    def _micro_slots(self, i: int, n: int) -> list[int]:
        lo = (i * self.env.world + self.env.rank) * self.t.micro_batch
        return [k for k in range(lo, lo + self.t.micro_batch) if k < n]

    def train_step(self, step: int) -> dict[str, float]:
        """One optimiser step; returns the global mean losses, gradient norm and learning rate."""
        idx = self.stream.indices(step, self.t.batch_size)
        exs = [self.examples[i] for i in idx]
        n_sup, n_pairs = token_counts(exs, self.cfg.objective.draws_per_example)
        vocab = self.setup.model.cfg.vocab_size
        torch.manual_seed((self.t.seed * 1_000_003 + step) * 1024 + self.env.rank)  # LoRA dropout, if any
        # AR only: the diffusion sum is a zero and the loss is the mean next-token loss.
        weight = 1.0 if self.ar_only else self.cfg.objective.encoder_loss_weight
        sums = [0.0, 0.0]
        per_ex = [[] if self.ar_only else draws(ex, self.t.seed, step, slot, vocab, self.cfg.objective)
                  for slot, ex in enumerate(exs)]
        flat = [d for ds in per_ex for d in ds]  # example-major, K per example
        for i in range(self.accum):
            slots = self._micro_slots(i, len(exs))
            batch = collate([exs[k] for k in slots], self.setup.pad_id).to(self.env.device)
            if self.env.sharded:
                self.objective.set_requires_gradient_sync(i == self.accum - 1)
            with self._amp():
                diff, ar = self.objective(batch, [d for j in slots for d in per_ex[j]], self._first_pass(flat, i))
            loss = (diff / n_sup + weight * ar / n_pairs) * self.env.world
            loss.backward()
            sums[0] += float(diff.detach())
            sums[1] += float(ar.detach())
        diff_sum, ar_sum = dist.all_sum(sums, self.env)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.t.clip if self.t.clip > 0 else float("inf"))
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        lr = lr_at(step, self.cfg, self.schedule_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        if not math.isfinite(diff_sum + ar_sum + norm):
            raise DgemmaError(f"the loss ({diff_sum + ar_sum}) or gradient norm ({norm}) became non-finite at "
                              f"step {step + 1}; lower train.lr or check the data (the last checkpoint is intact)")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        diff_m, ar_m = diff_sum / n_sup, ar_sum / n_pairs
        losses = {"ar_loss": ar_m} if self.ar_only else {"diffusion_loss": diff_m, "ar_loss": ar_m}
        if weight == 0:  # the encoder did not compute the AR loss
            losses.pop("ar_loss")
        return {"loss": diff_m + weight * ar_m, **losses, "grad_norm": norm, "lr": lr,
                "tokens": sum(len(e.ids) for e in exs)}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """Mean losses over the eval set with fixed noise (the same draws at every evaluation)."""
        exs = self.eval_examples
        if not exs:
            return None
        self.objective.eval()  # no LoRA dropout: evaluations are comparable
        try:
            return self._evaluate(exs)
        finally:
            self.objective.train()

    def _evaluate(self, exs) -> dict[str, float]:
        vocab = self.setup.model.cfg.vocab_size
        per = self.t.micro_batch * self.env.world
        sums = [0.0, 0.0, 0.0, 0.0]
        for i in range(math.ceil(len(exs) / per)):
            slots = self._micro_slots(i, len(exs))
            real = bool(slots)
            slots = slots or [0]  # every process must run the same number of (sharded) forward passes
            chosen = [exs[k] for k in slots]
            ds = [] if self.ar_only else [draw(exs[k], self.t.seed, 0, k, vocab, self.cfg.objective, EVAL_STREAM)
                                          for k in slots]
            first = self.env.sharded and self.cfg.objective.self_conditioning_p > 0 or None
            with self._amp():
                diff, ar = self.objective(collate(chosen, self.setup.pad_id).to(self.env.device), ds, first)
            if real:
                n_sup, n_pairs = token_counts(chosen)
                sums = [sums[0] + float(diff), sums[1] + float(ar), sums[2] + n_sup, sums[3] + n_pairs]
        diff_s, ar_s, n_sup, n_pairs = dist.all_sum(sums, self.env)
        if self.ar_only:
            return {"eval_loss": ar_s / n_pairs, "eval_ar_loss": ar_s / n_pairs}
        w = self.cfg.objective.encoder_loss_weight
        out = {"eval_loss": diff_s / n_sup + w * ar_s / n_pairs, "eval_diffusion_loss": diff_s / n_sup}
        return {**out, "eval_ar_loss": ar_s / n_pairs} if w > 0 else out  # weight 0: not computed

    def samples(self) -> list[dict[str, str]]:
        """Generate from ``train.sample_prompts`` with the model as it is now (single process only)."""
        if not self.t.sample_prompts or self.env.sharded:
            return []
        from dgemma.engine import Engine

        s = self.setup
        # No CUDA graphs: their memory pool would stay held through the training steps between samples.
        engine = Engine(s.model, s.tokenizer, generation_config=s.generation_config, cuda_graphs=False)
        out = []
        try:
            for prompt in self.t.sample_prompts:
                kw = {"max_new_tokens": self.t.sample_max_new_tokens, "seed": self.t.seed}
                if s.tokenizer.chat_template is not None:
                    text = engine.chat([{"role": "user", "content": prompt}], **kw).answer
                else:
                    text = engine.generate(prompt, **kw).text
                out.append({"prompt": prompt, "text": text})
        finally:
            self.objective.train()
        return out

    # ------------------------------------------------------------------ run
    def _meta(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "world_size": self.env.world, "saved_at": time.time(),
                "schedule_steps": self.schedule_steps}

    def _save(self, step: int) -> None:
        s = self.setup
        checkpoint.save(self.out, step, self.env, self.objective, self.optimizer, peft_model=s.peft_model,
                        tokenizer=s.tokenizer, generation_config=s.generation_config, meta=self._meta(),
                        keep=self.t.keep_checkpoints)

    def _start(self, resume: bool) -> int:
        found = checkpoint.latest(self.out) if resume else None
        if found is None:
            if resume and self.env.main:
                self.say(f"note: --resume, but {self.out} holds no complete checkpoint; starting a new run")
            if self.env.main:
                self.out.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.out / "train_config.json", self.cfg.to_json())
                atomic_write_text(self.out / LOG_FILE, "")
            return 0
        meta = checkpoint.load(found, self.env, self.objective, self.optimizer, self.setup.peft_model is not None)
        step = int(meta["step"])
        old = meta.get("config", {})
        was = old.get("train", {})
        kept = meta.get("schedule_steps") or was.get("schedule_steps") or was.get("steps") or self.schedule_steps
        if not self.t.schedule_steps:
            self.schedule_steps = kept
        if self.env.main:
            self.say(f"resuming from {found} (step {step})")
            changed = rundir.changed_keys(old, self.cfg.to_dict())
            if changed:
                self.say(f"note: the config differs from the checkpoint's in {', '.join(changed)}; the run "
                         "continues with the new values (optimizer hyper-parameters come from the checkpoint)")
            if self.schedule_steps != kept:
                self.say(f"note: train.schedule_steps = {self.schedule_steps} replaces the run's schedule of {kept} "
                         f"steps: the learning rate goes from {lr_at(step, self.cfg, kept):.3g} to "
                         f"{lr_at(step, self.cfg, self.schedule_steps):.3g} at step {step + 1}")
            elif self.t.steps > kept:
                self.say(f"note: train.steps = {self.t.steps} goes past the schedule's {kept} steps: the learning rate "
                         f"stays at train.min_lr ({self.t.min_lr:.3g}) from step {kept + 1} (set train.schedule_steps "
                         "to decay over a new length instead)")
            lines = (self.out / LOG_FILE).read_text().splitlines() if (self.out / LOG_FILE).exists() else []
            atomic_write_text(self.out / LOG_FILE, "".join(ln + "\n" for ln in rundir.log_until(lines, step)))
        return step

    def _log(self, entry: dict[str, Any]) -> None:
        if self.env.main:
            with (self.out / LOG_FILE).open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")

    def run(self, resume: bool = False) -> TrainResult:
        t = self.t
        at = rundir.check(self.out, resume)  # a new run only in an empty directory
        result = TrainResult(self.out, None, None, trainable_parameters=self.trainable, data=self.stats, step=at or 0)
        if at is not None and at >= t.steps:  # finished: leave it as it is
            if self.env.main:
                self.say(rundir.already_done(self.out, at, t.steps))
            last = rundir.last_logged(self.out)
            result.final, result.adapter = rundir.outputs(self.out)
            result.history = [last] if last else []
            return result
        dist.barrier(self.env)  # every process has checked the directory before the first one writes to it
        start = self.done = result.step = self._start(resume)
        bar = Progress(t.steps, start, enabled=self.env.main, live=self.show_progress, say=self.say)
        window_tokens, window_start = 0, time.perf_counter()
        with PeakMemory(self.env.device) as peak, bar:
            for step in range(start, t.steps):
                m = self.train_step(step)
                done = self.done = result.step = step + 1
                window_tokens += m["tokens"]
                elapsed = time.perf_counter() - window_start
                m["tokens_per_s"] = window_tokens / elapsed if elapsed > 0 else 0.0
                bar.update(done, m)
                if done % t.log_every == 0 or done == t.steps:
                    entry = {"step": done, **{k: round(v, 6) if isinstance(v, float) else v for k, v in m.items()}}
                    result.history.append(entry)
                    self._log(entry)
                    bar.line(entry)
                    window_tokens, window_start = 0, time.perf_counter()
                if (t.eval_every and done % t.eval_every == 0) or done == t.steps:
                    ev = self.evaluate()
                    if ev is not None:
                        result.evals.append({"step": done, **ev})
                        self._log({"step": done, **ev})
                        bar.line({"step": done, **ev})
                if t.sample_every and (done % t.sample_every == 0 or done == t.steps):
                    for sample in self.samples():
                        self._log({"step": done, "sample": sample})
                        bar.line({"step": done, "sample": sample["text"][:200]})
                if (t.save_every and done % t.save_every == 0) or done == t.steps:
                    self._save(done)
        result.peak_memory_bytes, result.peak_memory_kind = peak.bytes, peak.kind
        result.final, result.adapter = self._write_final()
        return result

    def _write_final(self) -> tuple[Path | None, Path | None]:
        s = self.setup
        state = dist.full_model_state(self.objective, self.env)
        final = adapter = None
        if self.env.main:
            if s.peft_model is None:
                final = self.out / rundir.FINAL
                cast = {k: v.to(s.save_dtype) if v.is_floating_point() else v for k, v in state.items()}
                checkpoint.write_weights(final, self.objective, cast, None, s.tokenizer, s.generation_config)
            else:
                adapter = self.out / rundir.ADAPTER
                lora.save_adapter(s.peft_model, adapter, state={k.removeprefix("net."): v for k, v in state.items()})
                s.tokenizer.save(adapter)
        del state
        dist.barrier(self.env)  # the other processes may leave now; rank 0 merges on its own time
        if self.env.main and adapter is not None and self.cfg.lora.merge_at_end and s.base_source is not None:
            final = merge_adapter(s.base_source, adapter, self.out / rundir.FINAL)
        if self.env.main:
            self.say(f"saved {final or adapter}")
        return final, adapter

