#!/usr/bin/env bash
# GPU checks for a one-GPU machine, in one go (CI has no GPU; see docs/benchmarks.md for results):
#   1. tests/test_gpu.py: bf16/fp32 logits vs HF, NCCL collectives, Megatron optimizer state round trip,
#      GRPO resume on GPU;
#   2. tools/profile_throughput.py on the full 1.5B config (random weights, TP1, bf16, open-rs exp3
#      settings with shorter completions), summary table copied to $OUT.
# Wheels in .whl/ (megatron-core and other pure-Python deps the machine lacks) are installed first
# into /tmp/site. Usage: OUT=dir bash tools/gpu_checks.sh [max_completion_length]
set -u
OUT=${OUT:-runs/gpu_checks}
MAXLEN=${1:-512}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, megatron.core as m, transformers as t; print('torch', torch.__version__, \
'megatron-core', m.__version__, 'transformers', t.__version__)"
    python3 -c "import transformer_engine" 2>/dev/null && echo "transformer-engine: yes" || echo "transformer-engine: no"
} 2>&1 | tee "$OUT/machine.txt"

echo "== tests/test_gpu.py"
timeout 180 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log" | tail -40

echo "== 1.5B profile (TP1, bf16, max completion $MAXLEN)"
timeout 230 python3 -m torch.distributed.run --standalone --nproc_per_node 1 tools/profile_throughput.py \
    --config configs/open_rs_exp3.yaml --steps 2 --warmup 1 --profile-steps 0 \
    parallel.tensor_parallel=1 data.path=assets/data/deepscaler_style_aime_math.jsonl \
    data.answer_column=answer rollout.max_completion_length="$MAXLEN" logging.log_completions=0 \
    logging.dir=/tmp/prof15b >"$OUT/profile_1p5b.log" 2>&1
echo "profile exit $?"
cp /tmp/prof15b/profile/summary.md "$OUT/profile_1p5b_summary.md" 2>/dev/null && cat "$OUT/profile_1p5b_summary.md" \
    || tail -30 "$OUT/profile_1p5b.log"
