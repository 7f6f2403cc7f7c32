#!/usr/bin/env bash
# GPU checks for a one-GPU machine, in one go (CI has no GPU; see docs/benchmarks.md for results):
#   1. tests/test_gpu.py: bf16/fp32 logits vs HF, NCCL collectives, Megatron optimizer state round trip,
#      GRPO resume on GPU;
#   2. tools/profile_throughput.py on the full 1.5B config (random weights, TP1, bf16, open-rs exp3
#      settings with shorter completions), summary table copied to $OUT;
#   3. rollout speed (tools/bench_generate.py): the 1.5B, random weights, bf16, TP1, 6 prompts x 6,
#      512-token prompts, 3584 new tokens, eager decode then CUDA-graph decode, with the fraction of
#      the 4.3 TB/s memory-bandwidth bound; JSON + table to $OUT.
# REHEARSE=1 (CPU): steps 1 and 3 on a tiny model and short rows, step 2 skipped (what CI's machine can do).
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

if [ "${REHEARSE:-0}" = 1 ]; then
    BENCH=(--config configs/models/narrow-real-vocab.json --dtype fp32 --prompts 2 --generations 3
           --prompt-len 16 --new-tokens 24)
else
    BENCH=(--config configs/models/deepseek-r1-distill-qwen-1.5b.json --dtype bf16 --prompts 6
           --generations 6 --prompt-len 512 --new-tokens 3584)
fi
for mode in eager graphs; do
    echo "== rollout speed, built-in, $mode decode: ${BENCH[*]}"
    extra=(); [ "$mode" = graphs ] && extra=(--cuda-graphs)
    timeout 240 python3 tools/bench_generate.py "${BENCH[@]}" --ignore-eos --backends builtin --repeats 1 \
        --bandwidth-tbps 4.3 "${extra[@]}" --json "$OUT/rollout_$mode.json" 2>&1 | tee "$OUT/rollout_$mode.log" \
        | tail -4
done
[ "${REHEARSE:-0}" = 1 ] && exit 0

echo "== 1.5B profile (TP1, bf16, max completion $MAXLEN)"
timeout 230 python3 -m torch.distributed.run --standalone --nproc_per_node 1 tools/profile_throughput.py \
    --config configs/open_rs_exp3.yaml --steps 2 --warmup 1 --profile-steps 0 \
    parallel.tensor_parallel=1 data.path=assets/data/deepscaler_style_aime_math.jsonl \
    data.answer_column=answer rollout.max_completion_length="$MAXLEN" logging.log_completions=0 \
    logging.dir=/tmp/prof15b >"$OUT/profile_1p5b.log" 2>&1
echo "profile exit $?"
cp /tmp/prof15b/profile/summary.md "$OUT/profile_1p5b_summary.md" 2>/dev/null && cat "$OUT/profile_1p5b_summary.md" \
    || tail -30 "$OUT/profile_1p5b.log"
