"""Megatron Qwen2 == HF transformers at TP=1, TP=2, TP2 x DP2 and TP=2 with sequence parallelism, on
real gloo ranks (torchrun): plain and packed rows, the pad-token row, activation recomputation."""

from __future__ import annotations

import pytest
from conftest import check, per_layout, torchrun
from workers.common import TINY_VARIANTS

pytestmark = pytest.mark.multi_rank

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 2), "tp2xdp2": (4, 2)}  # name -> (nproc, tp)
ALL_LAYOUTS = [*LAYOUTS, "tp2sp"]  # tp2sp: TP=2 with sequence parallelism
CHECKS = ["logits", "padded_vocab_shape", "logprobs", "grads", "weights_roundtrip"]
PACKED_CHECKS = [
    "packed_logits",
    "packed_grads",
    "packed_positions_per_row",
    "packed_control_sees_neighbour",
    "packed_control_branches_see_each_other",
]
PAD_VARIANTS = ["pad_token_gqa_untied_v300", "pad_token_gqa_tied_v512"]
RECOMPUTE = [f"{m}_{w}" for m in ("selective", "full_uniform", "full_block") for w in ("grads", "saves_less")]


@pytest.fixture(scope="module")
def layout_results(session_tmp):
    plain = per_layout("model_parity.py", session_tmp, LAYOUTS)
    cache: dict[str, dict] = {}

    def get(layout: str) -> dict:
        if layout != "tp2sp":
            return plain(layout)
        if layout not in cache:
            cache[layout] = torchrun(
                "model_parity.py", 2, session_tmp / "model_parity_tp2sp", "--tp", "2", "--sp"
            )
        return cache[layout]

    return get


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
@pytest.mark.parametrize("what", CHECKS + PACKED_CHECKS)
def test_parity(layout_results, layout, variant, what):
    check(layout_results(layout), f"{variant}/{what}")


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
@pytest.mark.parametrize("variant", PAD_VARIANTS)
@pytest.mark.parametrize("what", [*CHECKS, "pad_row_frozen"])
def test_pad_token_row_matches_hf(layout_results, layout, variant, what):
    """config.json's pad_token_id: HF's nn.Embedding(padding_idx) never trains that row's lookup."""
    check(layout_results(layout), f"{variant}/{what}")


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
@pytest.mark.parametrize("what", RECOMPUTE)
def test_recompute_same_grads_less_saved(layout_results, layout, what):
    check(layout_results(layout), f"recompute/{what}")


@pytest.mark.parametrize("what", ["meta_shapes", "is_meta"])
def test_full_size_config_builds_on_meta_at_tp2(layout_results, what):
    check(layout_results("tp2"), f"full_1.5b/{what}")
