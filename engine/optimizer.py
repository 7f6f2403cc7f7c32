"""Optimizer, gradient clipping and LR schedule over a Megatron-DDP-wrapped model.

- GPU: Megatron-Core's optimizer (``get_megatron_optimizer``; distributed optimizer optional).
- CPU: Megatron's optimizer wrappers allocate with ``device='cuda'``, so the CPU path is
  ``torch.optim.AdamW`` over the parameters with their DDP ``main_grad`` buffers as ``.grad``,
  plus a TP-aware global grad-norm clip (replicated norm weights counted once).
The LR schedule is Megatron's ``OptimizerParamScheduler`` in both cases (linear warmup, cosine to
``min_lr``), which matches HF's ``cosine_with_min_lr`` used by the open-rs recipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate


@dataclass
class OptimizerConfig:
    lr: float = 1e-6
    min_lr_ratio: float = 0.1  # cosine floor = lr * min_lr_ratio
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True  # GPU only; ignored on CPU

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


def grad_norm(params: list[torch.nn.Parameter]) -> float:
    """Global L2 norm of ``main_grad`` over the model-parallel group, TP-replicated params once.

    DP replicas hold identical (all-reduced) grads, so no DP reduction is needed.
    """
    sq = torch.zeros((), dtype=torch.float64)
    for p in params:
        g = getattr(p, "main_grad", None)
        if g is not None and param_is_not_tensor_parallel_duplicate(p):
            sq += g.detach().double().pow(2).sum().cpu()
    group = parallel_state.get_model_parallel_group()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(sq, group=group)
    return math.sqrt(float(sq))


class CpuOptimizer:
    """AdamW over DDP main_grads with Megatron-style clipping; the CPU stand-in for MegatronOptimizer."""

    def __init__(self, model: torch.nn.Module, cfg: OptimizerConfig) -> None:
        self.cfg = cfg
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        )
        self.param_groups = self.optimizer.param_groups

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> tuple[bool, float]:
        """Clip and step; returns (stepped, grad_norm). A non-finite norm skips the update."""
        norm = grad_norm(self.params)
        if not math.isfinite(norm):
            return False, norm
        scale = min(1.0, self.cfg.clip_grad / (norm + 1e-6)) if self.cfg.clip_grad > 0 else 1.0
        for p in self.params:
            g = p.main_grad
            p.grad = (g * scale if scale < 1.0 else g).to(p.dtype)
        self.optimizer.step()
        self.zero_grad()
        return True, norm

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd)


class GpuOptimizer:
    """Megatron-Core's optimizer (mixed precision, optional distributed optimizer). GPU only."""

    def __init__(self, model: torch.nn.Module, cfg: OptimizerConfig) -> None:
        from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
        from megatron.core.optimizer import get_megatron_optimizer

        tcfg = model.config
        self.cfg = cfg
        self.optimizer = get_megatron_optimizer(
            McoreOptimizerConfig(
                optimizer="adam",
                lr=cfg.lr,
                weight_decay=cfg.weight_decay,
                adam_beta1=cfg.adam_beta1,
                adam_beta2=cfg.adam_beta2,
                adam_eps=cfg.adam_eps,
                clip_grad=cfg.clip_grad,
                bf16=tcfg.bf16,
                fp16=tcfg.fp16,
                params_dtype=tcfg.params_dtype,
                use_distributed_optimizer=cfg.use_distributed_optimizer,
            ),
            [model],
        )
        self.param_groups = self.optimizer.param_groups

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def step(self) -> tuple[bool, float]:
        ok, norm, _ = self.optimizer.step()
        return bool(ok), float(norm or 0.0)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd)


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> CpuOptimizer | GpuOptimizer:
    return GpuOptimizer(model, cfg) if torch.cuda.is_available() else CpuOptimizer(model, cfg)


def build_scheduler(
    optimizer: CpuOptimizer | GpuOptimizer, cfg: OptimizerConfig, total_steps: int
) -> OptimizerParamScheduler:
    """Linear warmup from 0 over ``warmup_ratio * total_steps``, then cosine to ``lr * min_lr_ratio``."""
    warmup = int(cfg.warmup_ratio * total_steps)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=cfg.lr * cfg.min_lr_ratio,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, warmup + 1),
        lr_decay_style="cosine",
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
