"""Megatron optimizer state <-> per-name checkpoint tensors, on CPU ranks (run under torchrun).

Megatron's optimizer classes need CUDA, so this drives ``engine.optimizer``'s pure functions with
stand-ins that carry the same attributes: a distributed optimizer that gives each DP rank a contiguous
range of the flattened bf16 params (fp32 master shards, torch AdamW over them, inner param_groups in a
different order than the lock-step lists, as Megatron's), and a non-distributed mixed-precision one.
Reference: torch AdamW over full fp32 copies of the params with the same gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from common import Results

from engine.optimizer import load_megatron_named_state, megatron_named_state
from parallel.collectives import broadcast_object
from parallel.distributed import init_distributed

SHAPES = {"a.weight": (6, 5), "b.bias": (7,), "c.weight": (3, 4), "d.norm": (9,)}
FP32_PARAM = "d.norm"  # an fp32 param inside a bf16 model: its own dtype group, ordered first


class Range:
    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end


class FakeDistributedOptimizer:
    """The attributes of megatron.core.optimizer.DistributedOptimizer that engine.optimizer reads."""

    def __init__(self, params: dict[str, torch.nn.Parameter], group) -> None:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        total = sum(p.numel() for p in params.values())
        per = -(-total // world)
        lo, hi = rank * per, min(total, (rank + 1) * per)
        self.data_parallel_group = group
        self.model_param_gbuf_map = {p: (0, p.dtype, 0) for p in params.values()}
        self.ranges: dict[torch.nn.Parameter, Range] = {}
        self.model_float16_groups, self.shard_fp32_from_float16_groups = [[]], [[]]
        self.model_fp32_groups, self.shard_fp32_groups = [[]], [[]]
        off = 0
        for p in params.values():
            s, e = max(lo, off), min(hi, off + p.numel())
            if s < e:
                r = Range(s - off, e - off)
                self.ranges[p] = r
                shard = p.detach().reshape(-1)[r.start : r.end].float().clone()
                if p.dtype == torch.bfloat16:
                    self.model_float16_groups[0].append(p)
                    self.shard_fp32_from_float16_groups[0].append(shard)
                else:
                    self.model_fp32_groups[0].append(p)
                    self.shard_fp32_groups[0].append(shard)
            off += p.numel()
        # Megatron's inner groups: fp32 shards first, then the fp32 copies of bf16 shards.
        self.optimizer = torch.optim.AdamW(
            [*self.shard_fp32_groups[0], *self.shard_fp32_from_float16_groups[0]], lr=1e-2, weight_decay=0.1
        )

    def _get_model_param_range_map(self, p):
        return {"param": self.ranges[p]}

    def step(self, full_grads: dict[torch.nn.Parameter, torch.Tensor]) -> None:
        pairs = [*zip(self.model_fp32_groups[0], self.shard_fp32_groups[0], strict=True),
                 *zip(self.model_float16_groups[0], self.shard_fp32_from_float16_groups[0], strict=True)]  # fmt: skip
        for p, shard in pairs:
            r = self.ranges[p]
            shard.grad = full_grads[p].reshape(-1)[r.start : r.end].float().clone()
        self.optimizer.step()


class FakeFloat16Optimizer:
    """The attributes of Float16OptimizerWithFloat16Params that engine.optimizer reads."""

    def __init__(self, params: dict[str, torch.nn.Parameter]) -> None:
        self.float16_groups = [[p for p in params.values() if p.dtype == torch.bfloat16]]
        self.fp32_from_float16_groups = [[p.detach().float().clone() for p in self.float16_groups[0]]]
        self.fp32_from_fp32_groups = [[p for p in params.values() if p.dtype == torch.float32]]
        self.optimizer = torch.optim.AdamW(
            [*self.fp32_from_fp32_groups[0], *self.fp32_from_float16_groups[0]], lr=1e-2, weight_decay=0.1
        )

    def step(self, full_grads: dict[torch.nn.Parameter, torch.Tensor]) -> None:
        for p, m in zip(self.float16_groups[0], self.fp32_from_float16_groups[0], strict=True):
            m.grad = full_grads[p].float().clone()
        for p in self.fp32_from_fp32_groups[0]:
            p.grad = full_grads[p].float().clone()
        self.optimizer.step()


def make_params() -> dict[str, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return {
        n: torch.nn.Parameter(
            torch.randn(s, generator=g).to(torch.float32 if n == FP32_PARAM else torch.bfloat16)
        )
        for n, s in SHAPES.items()
    }


def grads(params: dict[str, torch.nn.Parameter], step: int) -> dict[torch.nn.Parameter, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return {p: torch.randn(p.shape, generator=g) for p in params.values()}


def check_kind(res: Results, kind: str, group) -> None:
    make = (lambda ps: FakeDistributedOptimizer(ps, group)) if kind == "distributed" else FakeFloat16Optimizer
    params = make_params()
    opt = make(params)
    ref_params = {n: torch.nn.Parameter(p.detach().float().clone()) for n, p in params.items()}
    ref = torch.optim.AdamW(list(ref_params.values()), lr=1e-2, weight_decay=0.1)
    for s in range(3):
        opt.step(grads(params, s))
        gr = grads(params, s)
        for n, p in params.items():
            ref_params[n].grad = gr[p]
        ref.step()

    state = megatron_named_state([opt], params)
    if dist.get_rank() != 0:  # only DP rank 0 (the writer) assembles the state; the others contribute
        res.record(f"{kind}/gathered_equals_full_adam", state == {}, note="non-writing DP rank")
    else:
        check_gathered(res, kind, state, params, ref_params, ref)
    state = broadcast_object(state)  # on resume every rank reads the written file
    expect = set(params) if dist.get_rank() == 0 else set()  # names assembled on this rank

    # A fresh optimizer (random masters, no moments) loaded from the state continues identically.
    params_b = make_params()
    with torch.no_grad():
        for n in params:
            params_b[n].copy_(params[n])
    opt_b = make(params_b)
    load_megatron_named_state([opt_b], params_b, state)
    opt.step(grads(params, 3))
    opt_b.step(grads(params_b, 3))
    after_a, after_b = megatron_named_state([opt], params), megatron_named_state([opt_b], params_b)
    diff = max(
        (float((after_a[n][k] - after_b[n][k]).abs().max()) for n in after_a for k in ("param", "exp_avg")),
        default=0.0,
    )
    res.record(
        f"{kind}/resumed_step_identical",
        diff == 0.0 and after_a.keys() == after_b.keys() == expect,
        max_abs=diff,
    )

    # A state without fp32 masters (a CPU checkpoint) loads the moments and keeps the own masters.
    pc = make_params()
    opt_c = make(pc)
    before = megatron_named_state([opt_c], pc)
    no_master = {n: {k: v for k, v in st.items() if k != "param"} for n, st in state.items()}
    load_megatron_named_state([opt_c], pc, no_master)
    after = megatron_named_state([opt_c], pc)
    ok = all(torch.equal(after[n]["param"], before[n]["param"]) for n in before) and all(
        torch.equal(after[n]["exp_avg"], state[n]["exp_avg"]) for n in after
    )
    res.record(f"{kind}/no_master_keeps_own", ok and after.keys() == before.keys() == expect)


def check_gathered(res: Results, kind: str, state, params, ref_params, ref) -> None:
    err = max(
        float(
            (state[n][k] - (ref_params[n].detach() if k == "param" else ref.state[ref_params[n]][k]))
            .abs()
            .max()
        )
        for n in params
        for k in ("param", "exp_avg", "exp_avg_sq")
    )
    steps = {float(state[n]["step"]) for n in params}
    res.record(
        f"{kind}/gathered_equals_full_adam", err <= 1e-6 and steps == {3.0}, max_abs=err, steps=sorted(steps)
    )


def main() -> None:
    res = Results()
    init_distributed(1)
    group = dist.group.WORLD
    for kind in ("distributed", "float16"):
        res.run(kind, check_kind, res, kind, group)
    res.finish()


if __name__ == "__main__":
    main()
