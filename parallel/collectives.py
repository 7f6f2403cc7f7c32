"""Collective helpers over Megatron's process groups (gloo and NCCL alike)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def gather_tp_shards(t: torch.Tensor) -> list[torch.Tensor]:
    """All-gather one tensor's shards over the TP group, in TP-rank order (every rank gets all)."""
    group = parallel_state.get_tensor_model_parallel_group()
    size = dist.get_world_size(group)
    if size == 1:
        return [t]
    t = t.contiguous()
    out = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(out, t, group=group)
    return out


def all_gather_dp_objects(obj: Any) -> list[Any]:
    """Python objects from every data-parallel rank, in DP-rank order."""
    group = parallel_state.get_data_parallel_group()
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def all_gather_dp(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors from every DP rank along dim 0."""
    group = parallel_state.get_data_parallel_group()
    size = dist.get_world_size(group)
    if size == 1:
        return t
    out = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.cat(out, dim=0)


def all_reduce_dp(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over the data-parallel group; returns ``t``."""
    group = parallel_state.get_data_parallel_group()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t
