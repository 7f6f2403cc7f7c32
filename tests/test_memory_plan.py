"""The memory plan: its activation figure vs the bytes autograd saves (tests/workers/memory_worker.py, TP1
and TP2, with recomputation and sequence parallelism), hand counts, and the recipe's plan on 48 GB GPUs."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, check, per_layout

from engine.batching.memory_plan import GiB, builtin_decode_bytes, plan_memory
from engine.config import load_config
from engine.rollout.kv_cache import KVCache
from engine.train_config import TrainConfig
from models.qwen.config import ActivationOptions, QwenConfig
from models.qwen.memory import activation_estimate, layer_activation_elements
from tools import model_info

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 2)}
SHAPES = ["2x(20+130)", "4x(50+200)", "1x(8+600)", "3x(30+170)_selective", "3x(30+170)_full"]
R1 = REPO / "configs/models/deepseek-r1-distill-qwen-1.5b.json"
EXP3 = REPO / "configs/open_rs_exp3.yaml"


@pytest.fixture(scope="module")
def results(session_tmp):
    return per_layout("memory_worker.py", session_tmp, LAYOUTS)


@pytest.mark.multi_rank
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", SHAPES)
def test_plan_activations_match_saved_tensor_bytes(results, layout, shape):
    check(results(layout), f"plan/{shape}")


@pytest.mark.multi_rank
def test_plan_with_sequence_parallelism_matches_saved_tensor_bytes(results):
    check(results("tp2"), "plan/3x(30+170)_sequence_parallel")


def test_layer_activation_hand_count():
    cfg = QwenConfig.from_file(REPO / "configs/models/narrow-real-vocab.json")  # h 256, f 768, 4 x 64, 2 KV
    elems, lse = layer_activation_elements(cfg, tp=1)
    # 3 h per RMSNorm x 2, q k v (h + 2 x 128) + output h, attention output x 2, RoPE 4 d, SwiGLU 5 f
    assert elems == 6 * 256 + (256 + 256) + 256 + 2 * 256 + 4 * 64 + 5 * 768 == 6912
    assert lse == 4 * 4
    sp, _ = layer_activation_elements(cfg, tp=2, sequence_parallel=True)
    assert sp == 6 * 256 / 2 + (256 + 256) / 2 + 256 / 2 + 2 * 256 / 2 + 4 * 64 + 5 * 768 / 2
    one = activation_estimate(cfg, 1000, 1, torch.float32, 256)
    two = activation_estimate(cfg, 2000, 1, torch.float32, 256)
    assert two.saved_bytes == pytest.approx(2 * one.saved_bytes)  # linear in tokens: O(S) attention
    full = activation_estimate(
        cfg, 1000, 1, torch.float32, 256,
        activations=ActivationOptions(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    )  # fmt: skip
    assert full.saved_bytes < one.saved_bytes and full.recompute_bytes == pytest.approx(
        1000 * (4 * 6912 + 16)
    )


def recipe(*overrides: str) -> TrainConfig:
    return load_config(TrainConfig, EXP3, ["rollout.backend=vllm", *overrides])


def test_recipe_plan_fits_48gb_at_tp2_dp2_with_a_token_budget():
    """open_rs_exp3 (1.5B, TP2 x DP2, bf16, vLLM at 0.5 of the GPU), loss on 6-completion logical
    micro-batches: the config's physical micro-batches (8192 packed tokens) fit a 48 GiB GPU; 6 full
    rows at once do not, and the plan names the key to change."""
    qcfg = QwenConfig.from_file(R1)
    ok = plan_memory(recipe(), qcfg, dp=2, device_gib=48, distributed_optimizer=True)
    assert ok.problems() == [], ok.format()
    assert 10 < ok.static_bytes / GiB < 14  # weights, fp32 grads, sharded masters + Adam, reference
    assert ok.train.tokens == 8192 and ok.phase_bytes["train"] < 48 * GiB
    no_budget = (
        "batching.pack_sequences=false",
        "batching.train_max_tokens=null",
        "batching.logprob_max_tokens=null",
    )
    whole = plan_memory(recipe(*no_budget), qcfg, dp=2, device_gib=48, distributed_optimizer=True)
    assert whole.train.tokens == 6 * (512 + 3584)
    (msg,) = whole.problems()
    assert "TRAIN needs" in msg and "batching.train_max_tokens" in msg
    # full recomputation also makes the whole logical micro-batch fit in one pass
    full = ActivationOptions(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    plan = plan_memory(
        recipe(*no_budget), qcfg, dp=2, device_gib=48, activations=full, distributed_optimizer=True
    )
    assert plan.problems() == []


@pytest.mark.parametrize("tp, dp, max_rows", [(1, 1, 0), (2, 2, 0), (2, 1, 12)])
def test_builtin_generator_kv_cache_in_the_plan(tp, dp, max_rows):
    """The plan's KV cache == the bytes ``KVCache.allocate`` takes for the generator's slots and rows."""
    qcfg = QwenConfig.from_file(R1)
    cfg = load_config(
        TrainConfig, EXP3,
        [f"parallel.tensor_parallel={tp}", "model.dtype=bf16", f"rollout.decode.max_batch_rows={max_rows}"],
    )  # fmt: skip
    kv, logits = builtin_decode_bytes(cfg, qcfg, dp)
    rows = 12 // dp * 6  # open-rs: 12 prompts x 6 per step, split over DP
    slots = max_rows or rows
    with torch.device("meta"):
        cache = KVCache.allocate(28, slots, 2 // tp, 512 + 3584, 128, torch.bfloat16, torch.device("meta"))
    assert kv == cache.nbytes()
    padded_vocab = {1: 151936, 2: 152064}[tp]  # Megatron pads to a multiple of 128 x TP
    assert logits == 3 * slots * padded_vocab // tp * 4
    plan = plan_memory(cfg, qcfg, dp=dp, device_gib=48)
    assert plan.generator_rollout_bytes == kv + logits and plan.generator_train_bytes == 0
    if (tp, dp) == (1, 1):  # 72 rows x 4096 positions of 28 KiB: 7.9 GiB
        assert kv / GiB == pytest.approx(72 * 4096 * 28672 / GiB)


def test_builtin_rollout_that_does_not_fit_names_max_batch_rows():
    qcfg = QwenConfig.from_file(R1)
    cfg = load_config(TrainConfig, EXP3, ["parallel.tensor_parallel=1", "model.dtype=bf16"])
    plan = plan_memory(cfg, qcfg, dp=1, device_gib=10)
    assert any("ROLLOUT needs" in p and "rollout.decode.max_batch_rows" in p for p in plan.problems())


def test_model_info_train_config_exit_status(capsys):
    args = ["--train-config", str(EXP3), "--dp", "2", "--device-gib", "48", "rollout.backend=vllm"]
    assert model_info.main(args) == 0
    assert "| fits | yes |" in capsys.readouterr().out
    assert (
        model_info.main([*args, "batching.train_max_tokens=32768", "batching.logprob_max_tokens=32768"]) == 1
    )
    assert "batching.train_max_tokens" in capsys.readouterr().out
