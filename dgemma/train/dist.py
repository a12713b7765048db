"""Processes and devices for training: single process, or ``torchrun`` with FSDP2 sharding.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group uses NCCL on GPUs and gloo on CPUs; every
decoder block is its own ``fully_shard`` unit and the training objective is the root, so parameters,
gradients and optimiser state are split across processes. Full (unsharded) state dicts for saving are
gathered onto rank 0 in CPU memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def setup(device_name: str) -> Dist:
    """Join the ``torchrun`` process group if there is one; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Dist(rank, world, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(objective: torch.nn.Module, blocks) -> None:
    """FSDP2: one unit per block, the objective (embedding, LM head, self-conditioning) as the root."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
    fully_shard(objective)


def materialize(objective: torch.nn.Module, model, state: dict[str, torch.Tensor], env: Dist) -> None:
    """Give a sharded, storage-less (meta) model its shards on this device, filled from ``state`` (the full
    tensors, given on rank 0 only and broadcast from there)."""
    objective.to_empty(device=env.device)
    with torch.device(env.device):
        fresh = type(model).rope_buffers(model.cfg)  # non-persistent: not in any state dict
    for name, buf in fresh.items():
        setattr(model, name, buf)
    set_model_state_dict(objective, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def all_sum(values: list[float], env: Dist) -> list[float]:
    if not env.sharded:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def barrier(env: Dist) -> None:
    if env.sharded:
        dist.barrier()


def full_model_state(objective: torch.nn.Module, env: Dist) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, unsharded, on CPU (only rank 0 gets them when sharded)."""
    if env.sharded:
        return get_model_state_dict(objective, options=FULL)
    return {k: v.detach().cpu() for k, v in objective.state_dict().items()}


def full_optimizer_state(objective, optimizer, env: Dist) -> dict:
    return get_optimizer_state_dict(objective, optimizer, options=FULL)


def load_model_state(objective, state: dict[str, torch.Tensor], env: Dist) -> None:
    """Set the given (full, CPU) tensors, read on rank 0 and broadcast when sharded; parameters not named
    keep their values."""
    opts = StateDictOptions(full_state_dict=True, strict=False, broadcast_from_rank0=env.sharded)
    set_model_state_dict(objective, state, options=opts)


def load_optimizer_state(objective, optimizer, state: dict, env: Dist) -> None:
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=env.sharded)
    set_optimizer_state_dict(objective, optimizer, state, options=opts)
