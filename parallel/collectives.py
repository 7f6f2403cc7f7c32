"""Collective helpers over Megatron's process groups (gloo and NCCL alike): the one home for them.

Each is a no-op on a group of one, and accepts CPU tensors on any backend: NCCL only moves CUDA
tensors, so small host-side values (rewards, metrics, flags) travel through the current GPU and come
back on the device they came from.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def _world(group: Any = None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _comm_device(group: Any = None) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if _world() > 1:
        dist.barrier()


def broadcast_object(obj: Any, group: Any = None) -> Any:
    """``obj`` from the group's first rank (global rank 0 when ``group`` is None) to every member."""
    if _world(group) == 1:
        return obj
    box = [obj]
    src = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def broadcast_tp(t: torch.Tensor) -> torch.Tensor:
    """A tensor from TP rank 0 to the other TP ranks (same shape and dtype on every rank)."""
    group = parallel_state.get_tensor_model_parallel_group()
    if _world(group) == 1:
        return t
    buf = t.to(_comm_device(group)).contiguous()
    if buf is t:
        buf = t.clone()
    dist.broadcast(buf, src=dist.get_global_rank(group, 0), group=group)
    return buf.to(t.device)


def all_reduce(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM, group: Any = None) -> torch.Tensor:
    """In-place all-reduce over ``group`` (default: the whole world); returns ``t``."""
    if _world(group) == 1:
        return t
    buf = t.to(_comm_device(group))
    dist.all_reduce(buf, op=op, group=group)
    if buf is not t:
        t.copy_(buf)
    return t


def gather_tp_shards(t: torch.Tensor) -> list[torch.Tensor]:
    """All-gather one tensor's shards over the TP group, in TP-rank order (every rank gets all)."""
    group = parallel_state.get_tensor_model_parallel_group()
    size = _world(group)
    if size == 1:
        return [t]
    t = t.contiguous()
    out = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(out, t, group=group)
    return out


def all_gather_dp(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors from every DP rank along dim 0 (on ``t``'s device)."""
    group = parallel_state.get_data_parallel_group()
    size = _world(group)
    if size == 1:
        return t
    buf = t.to(_comm_device(group)).contiguous()
    out = [torch.empty_like(buf) for _ in range(size)]
    dist.all_gather(out, buf, group=group)
    return torch.cat(out, dim=0).to(t.device)


def all_reduce_dp(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over the data-parallel group; returns ``t``."""
    return all_reduce(t, op, parallel_state.get_data_parallel_group())
