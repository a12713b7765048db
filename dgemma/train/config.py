"""Training configuration: one TOML file of sections, overridable from the command line.

Sections mirror the work: ``[model]`` (what to start from), ``[data]``, ``[objective]`` (spec section 4
knobs), ``[lora]`` and ``[train]`` (optimiser, schedule, checkpoints, evaluation). Defaults are the
reference SFT recipe (spec 4.6). ``--set train.lr=3e-4`` style overrides take TOML values. Unknown keys
and bad values are rejected with the key named, before any model is built.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dgemma.errors import DgemmaError
from dgemma.train.data import OVERLONG, TEMPLATES
from dgemma.train.objective import OBJECTIVES, ObjectiveConfig

# LoRA targets of the reference recipe: attention and dense-MLP projections of every layer.
LORA_TARGETS = (r".*layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",)
PRECISIONS = ("auto", "bf16", "fp32")
QUANT_SCHEMES = ("int4", "int8")


class TrainConfigError(DgemmaError, ValueError):
    """A training config that cannot be used; the message names the key."""


@dataclass(frozen=True)
class ModelSection:
    init: str | None = None  # checkpoint directory or Hub id to fine-tune
    config: str | None = None  # from scratch: a config.json (or a directory holding one)
    preset: str | None = None  # from scratch: a dgemma bench preset, with the tokenizer's vocabulary
    tokenizer: str | None = None  # tokenizer directory (default: the init checkpoint's), or "bytes" (byte-level)
    freeze_router: bool | None = None  # default: frozen when fine-tuning, trained from scratch
    quant: str | None = None  # QLoRA: "int4" / "int8" quantises the frozen base as it loads (needs LoRA)
    quant_group_size: int | None = None  # int4 inputs per scale (default: 64, or what divides the widths)


@dataclass(frozen=True)
class DataSection:
    train: str = ""
    eval: str | None = None
    max_length: int = 1024
    overlong: str = "skip"  # "skip" | "truncate" (to whole canvas blocks)
    template: str = "auto"  # "auto" | "chat" | "raw"
    allow_unknown: bool = False  # train even when the tokenizer maps much of the data to its unknown token


@dataclass(frozen=True)
class LoraSection:
    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS
    experts: bool = False  # also adapt the MoE expert tensors
    merge_at_end: bool = True  # also write the merged model (release format) next to the adapter


@dataclass(frozen=True)
class TrainSection:
    out: str = "runs/train"
    steps: int = 800
    batch_size: int = 8  # examples per optimiser step, over all processes
    micro_batch: int = 1  # examples per forward pass per process
    lr: float = 1.5e-4
    min_lr: float = 1.5e-5
    warmup: int = 25
    # Steps the warm-up + cosine schedule spans (lr reaches min_lr there and stays). 0: train.steps of the
    # run's first start, kept on --resume, so that raising train.steps continues at min_lr without a jump.
    schedule_steps: int = 0
    betas: tuple[float, float] = (0.95, 0.99)
    adam_eps: float = 1e-8
    weight_decay: float = 1e-4
    clip: float = 1.0
    precision: str = "auto"  # "auto" (bf16 where the hardware has it) | "bf16" | "fp32"
    activation_checkpointing: bool = True
    device: str = "auto"
    seed: int = 0
    log_every: int = 10
    save_every: int = 100
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0: only at the end (when there is eval data)
    sample_every: int = 0
    sample_prompts: tuple[str, ...] = ()
    sample_max_new_tokens: int = 64


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


def _coerce(section: str, f: dataclasses.Field, value: Any) -> Any:
    name = f"{section}.{f.name}"
    kind = str(f.type)
    if value is None:
        if "None" in kind:
            return None
        raise TrainConfigError(f"{name} cannot be empty")
    if kind.startswith("tuple"):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise TrainConfigError(f"{name} must be a list, got {value!r}")
        want = (int, float) if "float" in kind else str
        if not all(isinstance(v, want) and not isinstance(v, bool) for v in value):
            raise TrainConfigError(f"{name} must be a list of {'numbers' if want is not str else 'strings'}, "
                                   f"got {value!r}")
        return tuple(float(v) if "float" in kind else v for v in value)
    if kind.startswith("bool"):
        if not isinstance(value, bool):
            raise TrainConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TrainConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if kind.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TrainConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise TrainConfigError(f"{name} must be a string, got {value!r}")
    return value


def from_dict(raw: dict[str, Any]) -> TrainConfig:
    sections = {}
    for top in fields(TrainConfig):
        given = raw.get(top.name, {})
        if not isinstance(given, dict):
            raise TrainConfigError(f"[{top.name}] must be a table")
        cls = top.default_factory().__class__
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise TrainConfigError(f"unknown key {top.name}.{unknown[0]} (known: {', '.join(sorted(known))})")
        sections[top.name] = cls(**{k: _coerce(top.name, known[k], v) for k, v in given.items()})
    extra = sorted(set(raw) - {f.name for f in fields(TrainConfig)})
    if extra:
        raise TrainConfigError(f"unknown section [{extra[0]}] (known: model, data, objective, lora, train)")
    cfg = TrainConfig(**sections)
    validate(cfg)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 0.0003): the value is read as TOML, else as a string."""
    key, sep, value = text.partition("=")
    path = key.strip().split(".")
    if not sep or len(path) != 2 or not all(path):
        raise TrainConfigError(f"override {text!r} must look like section.key=value")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return path, parsed


def load(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise TrainConfigError(f"training config not found: {path}")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise TrainConfigError(f"{path}: not valid TOML ({e})") from None
    for text in overrides:
        (section, key), value = parse_override(text)
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise TrainConfigError(f"[{section}] must be a table")
        table[key] = value
    return from_dict(raw)


def validate(cfg: TrainConfig) -> None:
    m, d, t, o, lora = cfg.model, cfg.data, cfg.train, cfg.objective, cfg.lora
    sources = [n for n in ("init", "config", "preset") if getattr(m, n)]
    if len(sources) != 1:
        raise TrainConfigError("set exactly one of model.init (fine-tune a checkpoint), model.config or "
                               f"model.preset (train from scratch); got {sources or 'none'}")
    if m.quant is not None:
        if m.quant not in QUANT_SCHEMES:
            raise TrainConfigError(f"model.quant must be one of {', '.join(QUANT_SCHEMES)} (got {m.quant!r})")
        if not cfg.lora.enabled:
            raise TrainConfigError("model.quant needs lora.enabled: a quantized base is frozen")
        if not m.init:
            raise TrainConfigError("model.quant needs model.init: the quantized base is a trained checkpoint "
                                   "(its float original, into which the adapter is merged)")
        if m.quant_group_size is not None and m.quant_group_size < 1:
            raise TrainConfigError(f"model.quant_group_size must be positive (got {m.quant_group_size})")
    if not m.init and not m.tokenizer:
        raise TrainConfigError("training from scratch needs model.tokenizer: a directory with tokenizer.json, "
                               "or \"bytes\" for a byte-level tokenizer built on the spot")
    if cfg.lora.enabled and not m.init:
        raise TrainConfigError("LoRA adapts a trained model: set model.init (LoRA on a random model would "
                               "leave an adapter without a usable base)")
    if not d.train:
        raise TrainConfigError("data.train is not set (a JSONL file)")
    checks = [
        (d.overlong in OVERLONG, f"data.overlong must be one of {OVERLONG}"),
        (d.template in TEMPLATES, f"data.template must be one of {TEMPLATES}"),
        (d.max_length > 0, "data.max_length must be positive"),
        (t.precision in PRECISIONS, f"train.precision must be one of {PRECISIONS}"),
        (t.steps > 0, "train.steps must be positive"),
        (t.batch_size > 0 and t.micro_batch > 0, "train.batch_size and train.micro_batch must be positive"),
        (t.batch_size % t.micro_batch == 0, "train.batch_size must be a multiple of train.micro_batch"),
        (t.lr > 0 and 0 <= t.min_lr <= t.lr, "need train.lr > 0 and 0 <= train.min_lr <= train.lr"),
        (t.warmup >= 0 and t.clip >= 0 and t.weight_decay >= 0, "train.warmup, clip and weight_decay must be >= 0"),
        (t.schedule_steps >= 0, "train.schedule_steps must be >= 0 (0: train.steps of the first start)"),
        (o.kind in OBJECTIVES, f"objective.kind must be one of {OBJECTIVES}"),
        (len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas must be two numbers in [0, 1)"),
        (t.save_every >= 0 and t.eval_every >= 0 and t.sample_every >= 0 and t.log_every > 0,
         "train.save_every, eval_every and sample_every must be >= 0, log_every > 0"),
        (t.keep_checkpoints >= 1, "train.keep_checkpoints must be at least 1"),
        (0 < o.eps < 1, "objective.eps must be in (0, 1)"),
        (o.noise_power > 0, "objective.noise_power must be positive"),
        (o.focal_gamma >= 0, "objective.focal_gamma must be at least 0"),
        (0 <= o.self_conditioning_p <= 1, "objective.self_conditioning_p must be in [0, 1]"),
        (o.encoder_loss_weight >= 0, "objective.encoder_loss_weight must be >= 0"),
        (o.loss_chunk_rows > 0, "objective.loss_chunk_rows must be positive"),
        (o.draws_per_example >= 1, "objective.draws_per_example must be at least 1"),
        (lora.rank > 0 and lora.alpha > 0 and 0 <= lora.dropout < 1, "lora.rank, lora.alpha > 0, lora.dropout in [0, 1)"),
    ]
    for ok, message in checks:
        if not ok:
            raise TrainConfigError(message)
