"""Shared fixtures: tiny Qwen2 configs and a launcher that runs worker scripts under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORKERS = REPO / "tests" / "workers"
R1_TOKENIZER = REPO / "assets" / "tokenizers" / "deepseek-r1-distill-qwen-1.5b"


def torchrun(script: str, nproc: int, out_dir: Path, *args: str, timeout: int = 600) -> dict:
    """Run ``tests/workers/<script>`` on ``nproc`` CPU ranks (gloo); return rank 0's JSON results.

    Workers write ``results.json`` into ``out_dir`` as {check_name: {"ok": bool, ...}}. Grouping
    many checks per launch keeps the ~6 s per-process import cost down.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(WORKERS / script), "--out", str(out_dir), *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout[-8000:] + proc.stderr[-8000:]
    (out_dir / "log.txt").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"torchrun {script} x{nproc} failed:\n{log}"
    return json.loads((out_dir / "results.json").read_text())


def per_layout(script: str, out_dir: Path, layouts: dict[str, tuple[int, int]]):
    """A getter ``layout -> results`` that launches ``script`` once per layout (nproc, tp), cached."""
    cache: dict[str, dict] = {}

    def get(layout: str) -> dict:
        if layout not in cache:
            nproc, tp = layouts[layout]
            cache[layout] = torchrun(
                script, nproc, out_dir / f"{Path(script).stem}_{layout}", "--tp", str(tp)
            )
        return cache[layout]

    return get


def check(results: dict, name: str) -> None:
    assert name in results, f"check {name!r} did not run; ran: {sorted(results)}"
    r = results[name]
    assert r["ok"], f"{name}: {r}"


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dist")


SLOW_MARKS = ("multi_rank", "e2e", "gpu")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test not marked multi_rank / e2e / gpu is a unit test (``make test-fast``: ``-m unit``)."""
    for item in items:
        if not any(item.get_closest_marker(m) for m in SLOW_MARKS):
            item.add_marker(pytest.mark.unit)


@pytest.fixture(autouse=True)
def _no_rendezvous_env_leak():
    """A test that initialises torch.distributed in this process (single rank) sets MASTER_ADDR/PORT
    in os.environ and keeps that port's store open; CLI subprocesses of later tests would inherit the
    port and fail with EADDRINUSE. Restore both after every test."""
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
