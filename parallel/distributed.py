"""Process-group setup: torchrun environment -> torch.distributed -> Megatron parallel_state."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from parallel.cpu_compat import apply_cpu_compat, cpu_model_parallel_seed


def init_distributed(tp: int = 1, pp: int = 1, seed: int = 42, timeout_minutes: int = 30) -> None:
    """Initialise torch.distributed from torchrun's env (or as a single process) and Megatron state.

    NCCL on GPU, gloo on CPU. Data parallel size is world_size / (tp * pp). Seeds the model-parallel
    RNG tracker (CUDA tracker on GPU, the CPU twin otherwise) so DP replicas draw identical initial
    weights and TP ranks draw different dropout masks, as Megatron does.
    """
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        apply_cpu_compat()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size % (tp * pp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_parallel*pipeline_parallel = {tp}*{pp}"
        )
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if world_size == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            world_size=world_size,
            rank=rank,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    seed_everything(seed)


def seed_everything(seed: int) -> None:
    """Seed Python/torch RNGs and Megatron's tracker; same seed on DP replicas, offset per TP rank."""
    import random

    import numpy as np

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        cpu_model_parallel_seed(seed, tp_rank)


def destroy_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def dp_rank() -> int:
    return parallel_state.get_data_parallel_rank()


def dp_size() -> int:
    return parallel_state.get_data_parallel_world_size()


def world_size() -> int:
    """Ranks in the default process group (1 before torch.distributed is initialised)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
