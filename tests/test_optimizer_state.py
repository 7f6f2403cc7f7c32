"""Megatron optimizer state <-> the per-name checkpoint format (engine.optimizer), on 2 CPU ranks.

The GPU path (real Megatron optimizers) is covered by tests/test_gpu.py; here stand-ins with the
same attributes check the DP gather/scatter and the master-param pairing against full-tensor AdamW.
"""

from __future__ import annotations

import pytest
from conftest import check, torchrun

CHECKS = [
    f"{kind}/{name}"
    for kind in ("distributed", "float16")
    for name in ("gathered_equals_full_adam", "resumed_step_identical", "no_master_keeps_own")
]


@pytest.fixture(scope="module")
def results(session_tmp):
    return torchrun("optimizer_state.py", 2, session_tmp / "optimizer_state")


@pytest.mark.multi_rank
@pytest.mark.parametrize("name", CHECKS)
def test_optimizer_state(results, name):
    check(results, name)


def test_fused_adam_group_step_round_trip():
    """TE / Apex FusedAdam keep the step count in the param group, not per parameter."""
    from types import SimpleNamespace

    import torch

    from engine.optimizer import load_megatron_named_state, megatron_named_state

    def fp32_optimizer(step: int):  # FP32Optimizer-like: the model params are the masters
        p = torch.nn.Parameter(torch.randn(3, 2))
        inner = SimpleNamespace(param_groups=[{"params": [p], "step": step}], state={})
        inner.state[p] = {"exp_avg": torch.full((3, 2), 0.5), "exp_avg_sq": torch.full((3, 2), 0.25)}
        return SimpleNamespace(optimizer=inner), p

    a, pa = fp32_optimizer(step=7)
    state = megatron_named_state([a], {"w": pa})
    assert float(state["w"]["step"]) == 7.0 and torch.equal(state["w"]["param"], pa.detach())
    b, pb = fp32_optimizer(step=0)
    b.optimizer.state[pb] = {}
    load_megatron_named_state([b], {"w": pb}, state)
    assert b.optimizer.param_groups[0]["step"] == 7 and "step" not in b.optimizer.state[pb]
    assert torch.equal(pb.detach(), pa.detach()) and torch.equal(
        b.optimizer.state[pb]["exp_avg_sq"], torch.full((3, 2), 0.25)
    )
