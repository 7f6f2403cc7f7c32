"""tools/convert_checkpoint.py and models/qwen/checkpoint.py on tiny Qwen2 models (CPU, gloo).

Two worker launches hold most checks (one process; torchrun x2), then the real CLI in a
subprocess: killed mid-write, and rerun over the debris.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, WORKERS, check, torchrun
from workers.common import TINY_VARIANTS

SINGLE = (
    [
        f"{v}/single_tp{tp}/{what}"
        for v in TINY_VARIANTS
        for tp in (1, 2)
        for what in ("metadata", "roundtrip", "assets")
    ]
    + [f"{v}/single/logits" for v in TINY_VARIANTS]
    + [f"{v}/automodel" for v in TINY_VARIANTS]
    + ["bf16/metadata", "bf16/roundtrip", "cast_to_bf16/roundtrip", "bf16/verify_bf16_compute"]
    + ["bf16/verify_fp32_compute"]
    + ["cli/verify_good", "cli/verify_tampered", "cli/exists_refused_then_overwrite", "cli/bad_tp_exit2"]
    + [
        f"errors/{e}"
        for e in (
            "missing_tensor",
            "unexpected_tensor",
            "shape_mismatch",
            "wrong_architecture",
            "tp_does_not_fit",
            "corrupt_header",
            "no_safetensors",
            "output_exists",
            "output_exists_untouched",
            "overwrite_non_checkpoint",
            "non_checkpoint_untouched",
            "not_mcore_checkpoint",
            "checkpoint_model_mismatch",
        )
    ]
    + [f"interrupt/{e}" for e in ("mcore_save", "mcore_previous_intact", "hf_write", "hf_previous_intact")]
)
TP2 = [
    f"{v}/tp2/{what}"
    for v in TINY_VARIANTS
    for what in (
        "reads_own_shard",
        "metadata",
        "global_shapes",
        "roundtrip",
        "logits",
        "reshard_chain",
        "logits_from_tp1_layout",
    )
] + [
    f"{v}/tp2/{what}"
    for v in ("gqa_untied_v300", "gqa_tied_v512")
    for what in ("model_save_matches_converter", "model_save_bf16", "model_load_exact_padding_zero")
]


@pytest.fixture(scope="module")
def single(session_tmp):
    return torchrun("convert_worker.py", 1, session_tmp / "convert_single", "--tp", "1")


@pytest.fixture(scope="module")
def tp2(session_tmp):
    return torchrun("convert_worker.py", 2, session_tmp / "convert_tp2", "--tp", "2")


@pytest.mark.multi_rank
@pytest.mark.parametrize("name", SINGLE)
def test_single_process(single, name):
    check(single, name)


@pytest.mark.multi_rank
@pytest.mark.parametrize("name", TP2)
def test_torchrun_tp2(tp2, name):
    check(tp2, name)


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.e2e
def test_cli_killed_mid_write_then_rerun(single, session_tmp, tmp_path):
    """SIGKILL during mcore-to-hf --overwrite: the old output is intact, the partial one is only a
    ``.tmp-<pid>`` dir without config.json; a rerun cleans it up and replaces the output."""
    work = session_tmp / "convert_single" / "work" / "gqa_untied_v300"
    out = tmp_path / "hf_out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an older export
    (out / "model.safetensors").write_bytes(b"old")
    before = _snapshot(out)
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        CONVERT_STALL_MARKER=str(tmp_path / "stalled"),
    )
    args = [
        "mcore-to-hf",
        "--ckpt",
        str(work / "mc_tp2"),
        "--out",
        str(out),
        "--overwrite",
        "--max-shard-gb",
        "0.0002",
    ]
    proc = subprocess.Popen(
        [sys.executable, str(WORKERS / "convert_interrupt.py"), "--after", "6", "--", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while not (tmp_path / "stalled").exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "converter never reached the stall point"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _snapshot(out) == before
    partial = list(tmp_path.glob("hf_out.tmp-*"))
    assert len(partial) == 1 and not (partial[0] / "config.json").exists()
    assert any(partial[0].glob("*.safetensors"))

    # The real entry point, rerun over the debris: succeeds, removes the stale partial dir.
    rerun = subprocess.run(
        [sys.executable, "tools/convert_checkpoint.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not list(tmp_path.glob("hf_out.*"))
    assert (out / "model.safetensors.index.json").exists() and (out / "config.json").read_text() != "{}"
