"""Profiling: the FLOPs formula (hand counts), peak/MFU helpers, and tools/profile_throughput.py end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from engine.flops import flops_per_token, matmul_params, measure_peak_flops, mfu
from models.qwen.config import QwenConfig
from models.qwen.memory import param_count

TINY = REPO / "configs/models/tiny-demo.json"
REAL = REPO / "configs/models/deepseek-r1-distill-qwen-1.5b.json"


def test_flops_tiny_hand_count():
    cfg = QwenConfig.from_file(TINY)  # h=128, f=256, L=2, 4 heads x 32, 2 KV heads, V=32
    per_layer = 128 * 128 + 2 * (128 * 64) + 128 * 128 + 3 * (128 * 256)  # q, k+v, o, gate/up/down
    assert per_layer == 147_456
    n_mm = 2 * per_layer + 128 * 32  # + LM head
    assert matmul_params(cfg) == n_mm == 299_008
    attn = 2 * 2 * 2 * 10 * (4 * 32)  # 2 (QK, PV) x 2 FLOPs x L x s x n_q*d at s=10
    assert flops_per_token(cfg, 10, training=False) == 2 * n_mm + attn == 608_256
    assert flops_per_token(cfg, 10, training=True) == 3 * 608_256
    assert flops_per_token(cfg, 0, training=False) == 2 * n_mm
    with pytest.raises(ValueError):
        flops_per_token(cfg, -1, training=False)


def test_flops_r1_distill_1p5b():
    cfg = QwenConfig.from_file(REAL)
    # 28 x (1536*(1536+2*256) + 1536*1536 + 3*1536*8960) + 1536*151936
    assert matmul_params(cfg) == 1_543_569_408
    fwd = flops_per_token(cfg, 0, training=False)
    assert 0.8 < fwd / (2 * param_count(cfg)) < 1.0  # ~2 x 1.78e9: the embedding lookup is free
    assert 3.0e9 < fwd < 3.6e9
    # at 4k context attention adds 4 * L * s * n_q*d = 7.05e8 FLOPs/token
    assert flops_per_token(cfg, 4096, training=False) - fwd == 4 * 28 * 4096 * 1536
    assert flops_per_token(cfg, 4096, training=True) == 3 * flops_per_token(cfg, 4096, training=False)


def test_peak_and_mfu():
    peak = measure_peak_flops(n=256, repeats=2)
    assert math.isfinite(peak) and peak > 1e8  # any CPU does > 0.1 GFLOP/s
    assert mfu(2e12, 2.0, 4e12) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        mfu(1.0, 0.0, 1.0)


def _run(cmd: list[str], tmp: Path, timeout: int = 300) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    for k in (
        "MASTER_ADDR",
        "MASTER_PORT",
    ):  # set by an in-process trainer of an earlier test: its port is taken
        env.pop(k, None)
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    (tmp / "log.txt").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]


def _check_summary(s: dict) -> None:
    for k, v in s.items():
        if isinstance(v, (int, float)):
            assert math.isfinite(v) and v >= 0, (k, v)
    if s["gen_tokens"]:
        assert s["gen_tokens_per_s"] == pytest.approx(s["gen_tokens"] / s["rollout_s_total"], rel=1e-9)
    if s["train_s_total"]:
        assert s["train_tokens_per_s"] == pytest.approx(s["train_tokens"] / s["train_s_total"], rel=1e-9)
    assert s["flops_per_token_fwd"] > 0 and s["flops_per_token_train"] == pytest.approx(
        3 * s["flops_per_token_fwd"]
    )
    assert s["wall_s_per_step"] > 0 and s["achieved_tflops"] > 0 and s["mfu"] > 0
    assert s["peak_mem_max_bytes"] > 0


@pytest.mark.e2e
def test_profile_throughput_tp2_dp2(tmp_path):
    """The demo config at TP2 x DP2 on 4 CPU ranks: summary table, profiler trace and TB scalars."""
    logdir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
        "tools/profile_throughput.py", "--config", "configs/demo_cpu.yaml", "--steps", "2", "--warmup", "1",
        "--profile-steps", "1", "--peak-tflops", "0.1", "rollout.num_generations=16", f"logging.dir={logdir}",
    ]  # fmt: skip
    _run(cmd, tmp_path)
    out = logdir / "profile"
    s = json.loads((out / "summary.json").read_text())
    _check_summary(s)
    assert (s["tp"], s["dp"], s["world_size"], s["steps"], s["mode"]) == (2, 2, 4, 2, "all")
    assert s["rows"] == 2 * 16 * 16  # 2 steps x 16 prompts x G=16, over both DP replicas
    assert 0 < s["gen_tokens"] <= s["rows"] * 2  # max_completion_length 2
    assert s["train_tokens"] > s["gen_tokens"]  # + prompts
    assert s["rollout_s_per_step"] > 0 and s["train_s_per_step"] > 0
    assert s["peak_source"] == "given" and s["peak_tflops_per_device"] == pytest.approx(0.1)
    assert s["mfu"] == pytest.approx(s["achieved_tflops"] / 0.1, rel=1e-9)

    table = (out / "summary.md").read_text()
    for row in (
        "| phase s/step |",
        "| generation tokens/s |",
        "| training tokens/s |",
        "| MFU |",
        "| peak memory |",
    ):
        assert row in table

    traces = list((out / "trace").glob("*.pt.trace.json"))
    assert len(traces) == 1, list((out / "trace").iterdir())
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any(e.get("name") == "grpo_step" for e in events)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"profile/mfu", "profile/gen_tokens_per_s", "profile/train_tokens_per_s", "perf/wall_s"} <= tags
    assert len(acc.Scalars("perf/wall_s")) == 1 + 2 + 1  # warm-up, measured, profiled


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["train", "generate"])
def test_profile_throughput_modes_single_rank(tmp_path, mode):
    logdir = tmp_path / "run"
    cmd = [
        sys.executable, "tools/profile_throughput.py", "--config", "configs/demo_cpu.yaml", "--mode", mode,
        "--steps", "2", "--warmup", "1", "--profile-steps", "0", "--peak-tflops", "0.1",
        "parallel.tensor_parallel=1", "rollout.num_generations=16", f"logging.dir={logdir}",
    ]  # fmt: skip
    _run(cmd, tmp_path)
    s = json.loads((logdir / "profile" / "summary.json").read_text())
    _check_summary(s)
    assert s["mode"] == mode and s["world_size"] == 1
    if mode == "train":
        assert s["rollout_s_total"] == 0 and s["gen_tokens"] == 0 and s["train_s_total"] > 0
        assert s["rows"] == 2 * 16 * 16 and s["train_tokens"] >= 6 * s["rows"]  # "<bos>a+b=" + >= 1 token
    else:
        assert s["train_s_total"] == 0 and s["gen_tokens"] > 0 and s["achieved_tflops_train"] == 0
    assert not (logdir / "profile" / "trace").exists()


@pytest.mark.e2e
def test_profile_throughput_synthetic_train_same_loss_at_any_batching(tmp_path):
    """--mode train without a rollout: synthetic rows (no EOS), through the phase scheduler and the
    trainer's own phase methods, plain single process and under torchrun. The same global batch gives
    the same first-step loss, KL (the reference logprobs land on their rows) and logprobs, unpacked
    at DP1 as packed in token budgets (different for the logprob and training passes) at DP2."""
    common = [
        "--mode", "train", "--synthetic-completions", "8", "--synthetic-prompt-length", "5", "--steps", "1",
        "--warmup", "0", "--profile-steps", "0", "--peak-tflops", "0.1", "parallel.tensor_parallel=1",
        "loss.beta=0.04", "batching.micro_batch_size=64", "rollout.num_generations=16",
    ]  # fmt: skip
    runs = {
        "plain": [sys.executable, "tools/profile_throughput.py"],
        "packed_dp2": [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "tools/profile_throughput.py", "batching.pack_sequences=true", "batching.train_max_tokens=150",
            "batching.logprob_max_tokens=400",
        ],
    }  # fmt: skip
    out = {}
    for name, cmd in runs.items():
        logdir = tmp_path / name
        _run([*cmd, "--config", "configs/demo_cpu.yaml", *common, f"logging.dir={logdir}"], tmp_path)
        out[name] = s = json.loads((logdir / "profile" / "summary.json").read_text())
        _check_summary(s)
        assert s["mode"] == "train" and s["rollout_s_total"] == 0 and s["gen_tokens"] == 0
        assert s["rows"] == 16 * 16 and s["train_tokens"] == s["rows"] * (5 + 8)  # exactly the synthetic rows
        assert s["logprobs_s_total"] > 0 and s["train_s_total"] > 0
    assert out["packed_dp2"]["world_size"] == 2 and out["packed_dp2"]["dp"] == 2
    a, b = out["plain"]["last_step_loss"], out["packed_dp2"]["last_step_loss"]
    assert abs(a["loss/kl"]) < 1e-7 and abs(b["loss/kl"]) < 1e-7  # policy == reference at step 1
    for k in ("loss/loss", "loss/pg_loss", "loss/logp_diff", "loss/entropy"):
        assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), k
