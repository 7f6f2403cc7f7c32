"""Optimizer, gradient clipping and LR schedule over a Megatron-DDP-wrapped model.

- GPU: Megatron-Core's optimizer (``get_megatron_optimizer``; distributed optimizer optional).
- CPU: Megatron's optimizer wrappers allocate with ``device='cuda'``, so the CPU path is
  ``torch.optim.AdamW`` over the parameters with their DDP ``main_grad`` buffers as ``.grad``,
  plus a TP-aware global grad-norm clip (replicated norm weights counted once).
The LR schedule is Megatron's ``OptimizerParamScheduler`` in both cases (linear warmup, cosine to
``min_lr``), which matches HF's ``cosine_with_min_lr`` used by the open-rs recipe.

Checkpoints hold optimizer state in ONE format for both paths: per model parameter name, full
(DP-gathered, TP-local) tensors ``{"exp_avg", "exp_avg_sq", "step"[, "param"]}`` where ``param`` is
the fp32 master copy of mixed-precision training (``named_state`` / ``load_named_state``). Megatron's
own ``state_dict()`` is not used: its distributed optimizer leaves the per-parameter state out of it
(``save_parameter_state`` writes that separately, in a DP/bucket-dependent layout).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from engine.train_config import OptimizerConfig


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


ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")


def _cpu(v: Any) -> Any:
    return v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v


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

    def named_state(self, named: dict[str, torch.nn.Parameter]) -> dict[str, dict[str, Any]]:
        """AdamW state per parameter name (clones, on CPU) on DP rank 0, the rank that writes it;
        {} on the other DP ranks (their replicas are identical)."""
        if parallel_state.get_data_parallel_rank() != 0:
            return {}
        st = self.optimizer.state
        return {n: {k: _cpu(v) for k, v in st[p].items()} for n, p in named.items() if p in st}

    def load_named_state(self, named: dict[str, torch.nn.Parameter], per_name: dict[str, dict]) -> None:
        for name, p in named.items():
            self.optimizer.state[p] = {
                k: v.to(p.device) if torch.is_tensor(v) else v
                for k, v in per_name[name].items()
                if k in ADAM_KEYS  # a GPU checkpoint's fp32 master "param" is not AdamW state here
            }


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
                min_lr=cfg.lr * cfg.min_lr_ratio,  # the scheduler reads max/min LR from the groups
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

    def _subs(self) -> list:
        return list(getattr(self.optimizer, "chained_optimizers", [self.optimizer]))

    def named_state(self, named: dict[str, torch.nn.Parameter]) -> dict[str, dict[str, Any]]:
        return megatron_named_state(self._subs(), named)

    def load_named_state(self, named: dict[str, torch.nn.Parameter], per_name: dict[str, dict]) -> None:
        if not all("param" in per_name[n] for n in named):  # a CPU checkpoint: no fp32 masters saved
            self.optimizer.reload_model_params()  # masters from the just-loaded model weights
        load_megatron_named_state(self._subs(), named, per_name)


# ---- Megatron optimizer state <-> per-name full tensors (pure functions: CPU-testable with stand-ins) ---
Master = tuple[Any, "torch.Tensor | None", tuple[int, int]]


def master_map(subs: list) -> dict[torch.nn.Parameter, Master]:
    """model param -> (sub-optimizer, the fp32 master its inner Adam steps on this rank, the flat range
    of the param that master covers). Master is None where the distributed optimizer gave the whole
    param to other DP ranks. Uses Megatron's lock-step (model group, master group) lists; the inner
    optimizer's param_groups are reordered (fp32 params first) and must not be indexed directly."""
    out: dict[torch.nn.Parameter, Master] = {}
    for sub in subs:
        distributed = hasattr(sub, "model_float16_groups")
        if distributed:  # DistributedOptimizer: DP shards of flat params
            pairs = [(sub.model_float16_groups, sub.shard_fp32_from_float16_groups),
                     (sub.model_fp32_groups, sub.shard_fp32_groups)]  # fmt: skip
            for p in sub.model_param_gbuf_map:
                out[p] = (sub, None, (0, 0))
        elif hasattr(sub, "float16_groups"):  # Float16OptimizerWithFloat16Params
            pairs = [(sub.float16_groups, sub.fp32_from_float16_groups),
                     (sub.fp32_from_fp32_groups, sub.fp32_from_fp32_groups)]  # fmt: skip
        else:  # FP32Optimizer: the model params are the masters
            groups = [g["params"] for g in sub.optimizer.param_groups]
            pairs = [(groups, groups)]
        for model_groups, master_groups in pairs:
            for mg, sg in zip(model_groups, master_groups, strict=True):
                for p, master in zip(mg, sg, strict=True):
                    if distributed:
                        r = sub._get_model_param_range_map(p)["param"]
                        out[p] = (sub, master, (r.start, r.end))
                    else:
                        out[p] = (sub, master, (0, p.numel()))
    return out


def _locate(masters: dict, p: torch.nn.Parameter) -> Master:
    if p not in masters:
        raise KeyError(f"parameter of shape {tuple(p.shape)} is in no Megatron sub-optimizer")
    return masters[p]


def megatron_named_state(subs: list, named: dict[str, torch.nn.Parameter]) -> dict[str, dict[str, Any]]:
    """Collective over DP. On DP rank 0 (the rank that writes it): per name, the full fp32 master
    ``param`` + Adam moments + ``step``, on CPU; {} on the other DP ranks.

    The distributed optimizer holds a contiguous range of each flattened parameter per DP rank: each
    rank writes its range into a zero buffer and a sum-reduce to DP rank 0 assembles the whole, so
    only that rank holds a host copy.
    """
    masters = master_map(subs)
    keep = parallel_state.get_data_parallel_rank() == 0
    out: dict[str, dict[str, Any]] = {}
    for name, p in named.items():
        sub, master, (start, end) = _locate(masters, p)
        state = sub.optimizer.state.get(master, {}) if master is not None else {}
        group = getattr(sub, "data_parallel_group", None)
        reduce = group is not None and dist.get_world_size(group) > 1
        dst = dist.get_global_rank(group, 0) if reduce else None
        entry: dict[str, Any] = {}
        for key in ("param", "exp_avg", "exp_avg_sq"):
            full = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
            src = master if key == "param" else state.get(key)
            if src is not None:
                full[start:end] = src.detach().reshape(-1).float()
            if reduce:
                dist.reduce(full, dst=dst, group=group)
            if keep:
                entry[key] = full.view(p.shape).cpu()
        own_step = state.get("step", _group_of(sub, master).get("step", 0) if master is not None else 0)
        step = torch.tensor([float(own_step)], dtype=torch.float64, device=p.device)
        if reduce:
            dist.reduce(step, dst=dst, op=dist.ReduceOp.MAX, group=group)
        if keep:
            entry["step"] = torch.tensor(float(step))
            out[name] = entry
    return out


def load_megatron_named_state(
    subs: list, named: dict[str, torch.nn.Parameter], per_name: dict[str, dict]
) -> None:
    """Inverse of ``megatron_named_state``: each rank takes its own range (fp32 masters only when
    the state has them)."""
    masters = master_map(subs)
    with torch.no_grad():
        for name, p in named.items():
            sub, master, (start, end) = _locate(masters, p)
            if master is None:
                continue
            saved = per_name[name]
            if "param" in saved:
                master.copy_(saved["param"].reshape(-1)[start:end].view_as(master))
            state = sub.optimizer.state[master]  # torch Adam(W) creates its state lazily: fill it here
            for k in ("exp_avg", "exp_avg_sq"):
                state[k] = (
                    saved[k].reshape(-1)[start:end].to(master.device, master.dtype).view_as(master).clone()
                )
            group = _group_of(sub, master)
            if "step" in group:  # TE / Apex FusedAdam count steps per param group
                group["step"] = int(saved["step"])
                continue
            step = torch.tensor(float(saved["step"]))  # torch Adam(W) keeps it per param on the CPU ...
            fused = group.get("fused") or group.get("capturable")
            state["step"] = step.to(master.device) if fused else step  # ... unless fused/capturable


def _group_of(sub: Any, master: torch.Tensor) -> dict[str, Any]:
    """The inner optimizer's param group that steps ``master``."""
    for g in sub.optimizer.param_groups:
        if any(q is master for q in g["params"]):
            return g
    raise KeyError(
        f"master tensor of shape {tuple(master.shape)} is in no param group of {type(sub).__name__}"
    )


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
