"""Megatron Qwen2 == HF transformers at TP=1, TP=2 and TP2 x DP2 on real gloo ranks (torchrun)."""

from __future__ import annotations

import pytest
from conftest import check, per_layout
from workers.common import TINY_VARIANTS

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 2), "tp2xdp2": (4, 2)}  # name -> (nproc, tp)
CHECKS = ["logits", "padded_vocab_shape", "logprobs", "grads", "weights_roundtrip"]


@pytest.fixture(scope="module")
def layout_results(session_tmp):
    return per_layout("model_parity.py", session_tmp, LAYOUTS)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
@pytest.mark.parametrize("what", CHECKS)
def test_parity(layout_results, layout, variant, what):
    check(layout_results(layout), f"{variant}/{what}")


@pytest.mark.parametrize("what", ["meta_shapes", "is_meta"])
def test_full_size_config_builds_on_meta_at_tp2(layout_results, what):
    check(layout_results("tp2"), f"full_1.5b/{what}")
