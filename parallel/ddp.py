"""Megatron-Core DistributedDataParallel wrapping (grads reduced over DP in contiguous buffers)."""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig


def wrap_ddp(model: torch.nn.Module, use_distributed_optimizer: bool = False) -> DistributedDataParallel:
    """Wrap a GPTModel in Megatron DDP. Grads land in ``param.main_grad`` (fp32), averaged over DP.

    The distributed optimizer needs Megatron's CUDA-bound optimizer wrapper, so it is GPU only.
    Megatron DDP does not broadcast initial parameters: DP replicas must be seeded identically
    (``parallel.distributed.seed_everything`` does) or loaded from the same checkpoint.
    """
    if use_distributed_optimizer and not torch.cuda.is_available():
        raise ValueError("use_distributed_optimizer needs CUDA (Megatron's optimizer wrapper)")
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
        average_in_collective=False,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
