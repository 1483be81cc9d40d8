"""Process-group helpers for ``torchrun`` (DDP): rank facts, and gathering embeddings with gradients.

Objectives are computed on the embeddings of the *global* batch: every rank gathers all ranks' rows
with a differentiable all-gather, computes the same loss, and back-propagates; the gather's backward
sums the gradients of all ranks into each rank's rows, and DDP's gradient averaging then yields
exactly the single-process gradient of the global batch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace

import torch
import torch.distributed as dist

from lib.embeddings import Embeddings


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (no-op otherwise)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def gather_tensor(x: torch.Tensor, differentiable: bool) -> torch.Tensor:
    if differentiable and x.requires_grad:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x))
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def gather_embeddings(batch: Embeddings, info: DistInfo) -> Embeddings:
    """The global batch: rows of every rank in rank order (equal local batch sizes required)."""
    if not info.enabled:
        return batch
    out = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, torch.Tensor):
            if f.name == "groups":
                # make group ids unique across ranks: shift by the group counts of the lower ranks
                count = (value.max() + 1).view(1) if value.numel() else value.new_zeros(1)
                counts = gather_tensor(count, differentiable=False)
                value = value + (counts[: info.rank].sum() if info.rank else 0)
            out[f.name] = gather_tensor(value, differentiable=True)
    return replace(batch, **out)


def all_reduce_mean(value: float, info: DistInfo, device) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / info.world_size


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown_distributed(info: DistInfo) -> None:
    """Leave the process group together: a rank that tears gloo down while a peer still talks to it
    can abort the peer ("terminate called without an active exception")."""
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


__all__ = ["DistInfo", "init_distributed", "gather_embeddings", "all_reduce_mean", "barrier", "shutdown_distributed"]
