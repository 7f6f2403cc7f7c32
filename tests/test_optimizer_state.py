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


@pytest.mark.parametrize("name", CHECKS)
def test_optimizer_state(results, name):
    check(results, name)
