"""Parameter counts and per-rank training memory for a Qwen2 config at a TP x DP layout.

Counts come from the weight mapping's per-rank shard shapes, so they are exactly what the built
model holds (checked against a meta-device build in the tests), with no weights needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.qwen.config import QwenConfig
from models.qwen.hf_mapping import mcore_shard_shape, rules

GiB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    tp: int
    dp: int
    params_total: int  # unpadded, as HF counts them
    params_per_rank: int  # this rank's shards, vocab padding included
    weights_bytes: int
    grads_bytes: int  # Megatron DDP keeps fp32 main_grad buffers
    master_bytes: int  # fp32 master copy when params are bf16/fp16 (sharded by the distributed optimizer)
    adam_bytes: int  # exp_avg + exp_avg_sq in fp32 (sharded by the distributed optimizer)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.grads_bytes + self.master_bytes + self.adam_bytes


def param_count(cfg: QwenConfig) -> int:
    """Total parameters of the HF model (no vocab padding)."""
    from models.qwen.hf_mapping import hf_names, hf_shape

    return sum(math.prod(hf_shape(cfg, n)) for n in hf_names(cfg))


def params_per_rank(cfg: QwenConfig, tp: int) -> int:
    return sum(math.prod(mcore_shard_shape(cfg, r, tp)) for r in rules(cfg))


def estimate(
    cfg: QwenConfig, tp: int, dp: int, params_dtype: torch.dtype, distributed_optimizer: bool = True
) -> MemoryEstimate:
    """Static training memory per rank (activations, KV cache and the reference model excluded)."""
    cfg.check_tp(tp)
    n = params_per_rank(cfg, tp)
    width = torch.finfo(params_dtype).bits // 8
    shard = dp if distributed_optimizer else 1
    master = 0 if params_dtype == torch.float32 else 4 * n // shard
    return MemoryEstimate(
        tp=tp,
        dp=dp,
        params_total=param_count(cfg),
        params_per_rank=n,
        weights_bytes=width * n,
        grads_bytes=4 * n,
        master_bytes=master,
        adam_bytes=8 * n // shard,
    )


def format_table(rows: list[MemoryEstimate]) -> str:
    head = "| TP | DP | params total | params/rank | weights GiB | grads GiB | master GiB | Adam GiB | total GiB |"
    lines = [head, "|" + "---|" * 9]
    for e in rows:
        lines.append(
            f"| {e.tp} | {e.dp} | {e.params_total:,} | {e.params_per_rank:,} | {e.weights_bytes / GiB:.2f} | "
            f"{e.grads_bytes / GiB:.2f} | {e.master_bytes / GiB:.2f} | {e.adam_bytes / GiB:.2f} | "
            f"{e.total_bytes / GiB:.2f} |"
        )
    return "\n".join(lines)
