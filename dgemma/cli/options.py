"""Options every model command shares (``--model``, ``--device``, ``--dtype``, ``--threads``, sampling flags
named as in generation_config.json) and the one place that turns them into an Engine, with one-line errors.

Threads: ``--threads N``, else ``$DGEMMA_THREADS``, else an ``$OMP_NUM_THREADS`` the user set (left to
torch), else by model size: one thread for a model under ``ONE_THREAD_BELOW`` parameters (its ops are too
small to gain from more, and a busy core stalls every parallel op; measured in docs/BENCHMARKS.md), torch's
default (the physical cores) above it and for commands that do not know their model's size up front.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Mapping

from dgemma.errors import DgemmaError

SAMPLING_OPTIONS = (("max_new_tokens", int), ("max_denoising_steps", int), ("entropy_bound", float),
                    ("t_max", float), ("t_min", float), ("stability_threshold", int),
                    ("confidence_threshold", float), ("restarts", int), ("restart_entropy", float),
                    ("restart_after", int), ("parallel_attempts", int), ("seed", int))
THREADS_ENV = "DGEMMA_THREADS"
ONE_THREAD_BELOW = 100_000_000  # parameters


def add_model_options(p: argparse.ArgumentParser, model_required: bool = False) -> None:
    if model_required:
        p.add_argument("model", help="checkpoint directory or Hugging Face repo id")
    else:
        p.add_argument("--model", help="checkpoint directory or Hugging Face repo id (default: the embedded model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when present, else cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: the checkpoint's)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the denoising steps of a canvas from CUDA graphs (default: on with CUDA; "
                        "they need bf16 weights, other dtypes decode eagerly)")
    p.add_argument("--quant", default=None, metavar="int8|int4",
                   help="quantise the weights while loading (weight-only; a checkpoint written by dgemma quantize "
                        "is quantised already)")
    add_threads_option(p, by_size=True)


def add_threads_option(p: argparse.ArgumentParser, by_size: bool = False) -> None:
    size = (f"1 for a model under {ONE_THREAD_BELOW // 10**6}M parameters, else the physical cores" if by_size
            else "the physical cores")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help=f"CPU threads for torch (default: ${THREADS_ENV}, else $OMP_NUM_THREADS, else {size})")


def requested_threads(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> int | None:
    """``--threads``, else ``$DGEMMA_THREADS`` (checked: a positive integer), else None."""
    flag = getattr(args, "threads", None)
    if flag is not None:
        if flag < 1:
            raise DgemmaError(f"--threads must be a positive integer, got {flag}")
        return flag
    text = environ.get(THREADS_ENV, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise DgemmaError(f"{THREADS_ENV} must be a positive integer, got {text!r}")
    return int(text)


def thread_count(requested: int | None, parameters: int | None,
                 environ: Mapping[str, str] = os.environ) -> int | None:
    """The thread count to set, or None to leave torch's (``$OMP_NUM_THREADS`` or the physical cores)."""
    if requested is not None:
        return requested
    if environ.get("OMP_NUM_THREADS", "").strip() or parameters is None:
        return None
    return 1 if parameters < ONE_THREAD_BELOW else None


def set_threads(args: argparse.Namespace, parameters: int | None = None) -> int:
    """Apply the thread choice (see the module docstring) for a model of ``parameters``; the count in use."""
    import torch

    n = thread_count(requested_threads(args), parameters)
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (generation_config.json names; default: the checkpoint's values)")
    for name, kind in SAMPLING_OPTIONS:
        g.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None, metavar=kind.__name__.upper())


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k, _ in SAMPLING_OPTIONS if getattr(args, k, None) is not None}


def model_source(args: argparse.Namespace) -> str:
    from dgemma.embedded import default_model

    return args.model or str(default_model())


def device_and_dtype(args: argparse.Namespace):
    """``--device`` / ``--dtype`` checked (one-line errors): a usable torch device and a float dtype or None."""
    import torch

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise DgemmaError(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DgemmaError("--device cuda: this torch build or machine has no CUDA GPU")
    dtype = None
    if args.dtype:
        dtype = getattr(torch, args.dtype.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise DgemmaError(f"--dtype {args.dtype!r} is not a floating-point torch dtype (float32, bfloat16, ...)")
    return device, dtype


def load_engine(args: argparse.Namespace):
    """The Engine for ``--model`` (or the embedded model); raises DgemmaError/ValueError on user mistakes."""
    import dgemma
    from dgemma.quant import accounting

    device, dtype = device_and_dtype(args)
    requested_threads(args)  # a bad --threads / $DGEMMA_THREADS fails before the model loads
    engine = dgemma.load(model_source(args), device=device, dtype=dtype,
                         cuda_graphs=getattr(args, "cuda_graphs", None), quant=getattr(args, "quant", None))
    set_threads(args, sum(t.numel for t in accounting.weight_tensors(engine.model.cfg)))  # quantised or not
    return engine
