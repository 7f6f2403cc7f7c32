"""GRPO gradient and built-in generator at TP=1, TP=2 and TP2 x DP2 == single-rank HF references."""

from __future__ import annotations

import pytest
from conftest import check, per_layout

pytestmark = pytest.mark.multi_rank

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 2), "tp2xdp2": (4, 2)}
CHECKS = [
    "grpo/grads",
    "grpo/loss",
    "grpo/clipping_active",
    "gen/greedy_equals_hf",
    "gen/top_k1_equals_greedy",
    "gen/top_p_tiny_equals_greedy",
    "gen/shared_prefill_equals_single",
    "gen/seeded_deterministic",
    "gen/tp_lock_step",
    "gen/eos_or_truncated",
    "gen/logprobs_match_trainer",
]


@pytest.fixture(scope="module")
def results(session_tmp):
    return per_layout("grpo_parity.py", session_tmp, LAYOUTS)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", CHECKS)
def test_grpo_parity(results, layout, name):
    check(results(layout), name)
