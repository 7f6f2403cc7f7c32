"""End to end: `tools/train_grpo.py` on the built-in demo at TP2 x DP2 (4 CPU ranks) learns.

The exact-answer rate starts near chance (a random 17-token policy: ~1/17) and must reach a
threshold several times chance within a short run. TensorBoard scalars are the evidence.
"""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

EXACT = "reward/tools.demo_task:demo_exact/mean"
STEPS = 160
THRESHOLD = 0.25  # mean exact-answer rate over the last 20 steps (chance ~0.06)


def test_demo_reward_rises(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
        "tools/train_grpo.py", "--config", "configs/demo_cpu.yaml",
        f"max_steps={STEPS}", f"logging.dir={tmp_path}", "logging.log_completions=0",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"step {STEPS}/{STEPS}" in proc.stdout  # progress line per step
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    exact = [e.value for e in ea.Scalars(EXACT)]
    assert len(exact) == STEPS
    start, end = sum(exact[:10]) / 10, sum(exact[-20:]) / 20
    assert start < 0.15, f"start {start:.3f} is not near chance"
    assert end >= THRESHOLD, f"exact-answer rate {start:.3f} -> {end:.3f}, expected >= {THRESHOLD}"
    for tag in (
        "loss/kl",
        "policy/entropy",
        "optim/grad_norm",
        "optim/lr",
        "perf/tokens_per_s",
        "completion/truncated_frac",
    ):
        assert len(ea.Scalars(tag)) == STEPS, tag
