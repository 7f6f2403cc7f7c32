"""End to end: `make demo`'s job (`tools/train_grpo.py` on the built-in demo, TP2 x DP2 on 4 CPU ranks)
clearly learns.

The 55 held-out problems are evaluated greedily through the evaluation path before and after training
(TensorBoard tag ``eval/demo_exact/pass@1``): from chance (a random 17-token policy) to >= 80%. The
training-time exact-answer rate must rise too, and the run prints the before/after table.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from engine.evaluation import eval_progress_table

EXACT = "reward/demo_exact/mean"  # metric names are reward names (a dotted path: the function)
EVAL = "eval/demo_exact/pass@1"
STEPS = 120  # configs/demo_cpu.yaml's max_steps
THRESHOLD = 0.8  # held-out exact-answer rate after training (chance ~0.06)


@pytest.mark.e2e
def test_demo_learns(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
        "tools/train_grpo.py", "--config", "configs/demo_cpu.yaml", f"logging.dir={tmp_path}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"step {STEPS}/{STEPS}" in proc.stdout  # progress line per step
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    evals = {e.step: e.value for e in ea.Scalars(EVAL)}
    assert sorted(evals) == [0, STEPS]
    assert evals[0] < 0.2, f"held-out exact rate before training {evals[0]:.3f} is not near chance"
    assert evals[STEPS] >= THRESHOLD, f"held-out exact rate {evals[0]:.3f} -> {evals[STEPS]:.3f}"
    assert f"| {EVAL} | {100 * evals[0]:.1f} | {100 * evals[STEPS]:.1f} |" in proc.stderr  # the table
    exact = [e.value for e in ea.Scalars(EXACT)]
    assert len(exact) == STEPS
    assert sum(exact[-10:]) / 10 > sum(exact[:10]) / 10 + 0.3  # training-time exact rate rises
    for tag in (
        "loss/kl",
        "policy/entropy",
        "optim/grad_norm",
        "optim/lr",
        "perf/tokens_per_s",
        "completion/truncated_frac",
    ):
        assert len(ea.Scalars(tag)) == STEPS, tag
    # No known library warning reaches the console (engine.known_warnings), once per rank or at all.
    assert "Transformer Engine and Apex are not installed" not in proc.stderr
    assert "Apex is not installed" not in proc.stderr


def test_eval_progress_table():
    evals = {
        0: {"eval/a/pass@1": 0.05, "eval/a/avg@k": 0.05, "eval/mean/pass@1": 0.05, "eval/failed": 0.0},
        120: {"eval/a/pass@1": 0.945, "eval/a/avg@k": 0.9, "eval/mean/pass@1": 0.945, "eval/failed": 0.0},
    }
    assert eval_progress_table(evals).splitlines() == [
        "| eval | step 0 | step 120 |",
        "|---|---|---|",
        "| eval/a/pass@1 | 5.0 | 94.5 |",
    ]
    evals[60] = {"eval/a/pass@1": 0.5, "eval/b/pass@1": 0.1, "eval/mean/pass@1": 0.3}
    evals[120]["eval/b/pass@1"] = 0.2
    evals[0]["eval/b/pass@1"] = 0.0
    rows = eval_progress_table(evals).splitlines()[2:]
    assert rows == [
        "| eval/a/pass@1 | 5.0 | 94.5 |",
        "| eval/mean/pass@1 | 5.0 | 94.5 |",
        "| eval/b/pass@1 | 0.0 | 20.0 |",
    ]
