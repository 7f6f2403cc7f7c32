"""The CPU shims' allocator setting (``parallel.cpu_compat`` point 6): a decode-like step at the real
vocabulary (LM head + sampler over [24, 151936] logits) re-faults its pages every step under glibc's
dynamic thresholds, and does not with the fixed ones."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

WORKLOAD = """
import resource, sys, torch
torch.set_num_threads(1)
from engine.rollout.base import SamplingConfig
from engine.rollout.sampling import sample_next
from parallel.cpu_compat import apply_cpu_compat
if sys.argv[1] == "shim":
    assert apply_cpu_compat()
w, h, rows = torch.randn(151936, 64), torch.randn(24, 64), torch.arange(24)
def step(t):
    logits = torch.nn.functional.linear(h, w)
    return sample_next(logits, SamplingConfig(temperature=1.0), 0, rows, rows * 0 + t).tokens
step(0)
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for t in range(20):
    step(t)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def page_faults(mode: str, **env: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    out = subprocess.run(
        [sys.executable, "-c", WORKLOAD, mode], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(torch.cuda.is_available() or not sys.platform.startswith("linux"), reason="glibc, CPU")
def test_fixed_malloc_thresholds_stop_per_step_page_faults():
    default, shim = page_faults("default"), page_faults("shim")
    # 20 steps x ~4 buffers of ~15 MB = ~75k pages if every buffer were fresh
    assert default > 20_000 and shim * 5 < default, (default, shim)


def test_user_malloc_settings_win(monkeypatch):
    from parallel.cpu_compat import fix_malloc_thresholds

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000")
    assert fix_malloc_thresholds() is False
