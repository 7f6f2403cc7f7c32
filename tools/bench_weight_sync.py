"""Weight-sync time and bytes, Megatron TP shards -> co-located vLLM engine (engine.rollout.vllm_generator).

    torchrun --standalone --nproc_per_node 2 tools/bench_weight_sync.py --tp 2 [--out FILE]  (tables go to docs/benchmarks.md)
    torchrun ... tools/bench_weight_sync.py --tp 2 --config configs/models/deepseek-r1-distill-qwen-1.5b.json \\
        --dtype bfloat16 --bucket-mb 64 512 2048       # the real 1.5B shape, random init (GPU or CPU)

Every rank builds its engine (TP=1, dummy weights) and a randomly initialised Megatron model, then
times ``VLLMGenerator.sync_weights`` for each bucket size (one warm-up, then ``--repeats``; median
and min reported), and separately the TP gather + HF mapping alone (the same stream, consumed by
nothing), so the engine's share of the time shows. Bytes are the HF tensors handed to the engine,
in the engine dtype. The default model is a tiny Qwen2 (head_dim 32, as vLLM's CPU attention needs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.rollout.vllm_generator import VLLMConfig, VLLMGenerator  # noqa: E402
from engine.weight_sync import HFWeightStream  # noqa: E402
from models.qwen.config import QwenConfig, parse_dtype  # noqa: E402
from models.qwen.model import build_model  # noqa: E402
from parallel.distributed import init_distributed  # noqa: E402
from tools.machine import describe_machine  # noqa: E402

TINY = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 300, "hidden_size": 128,
    "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "torch_dtype": "float32",
}  # fmt: skip


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="HF config.json or model dir (default: a tiny Qwen2)")
    p.add_argument("--tp", type=int, default=int(os.environ.get("WORLD_SIZE", "1")))
    p.add_argument(
        "--dtype", default=None, help="engine and trainer dtype (default: float32 on CPU, bfloat16 on GPU)"
    )
    p.add_argument("--bucket-mb", type=float, nargs="+", default=[0.05, 1.0, 512.0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-model-len", type=int, default=256)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    p.add_argument("--out", help="write the markdown table here (rank 0)")
    p.add_argument("--json", help="write the raw rows here (rank 0)")
    a = p.parse_args()

    init_distributed(tp=a.tp, seed=0)
    dtype = a.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    qcfg = QwenConfig.from_file(a.config) if a.config else QwenConfig.from_hf_dict(TINY)
    name = Path(a.config).stem if a.config else "tiny Qwen2 (h128, 2 layers, V300)"
    t0 = time.perf_counter()
    model = build_model(qcfg, parse_dtype(dtype)).eval()
    build_model_s = time.perf_counter() - t0
    vcfg = VLLMConfig(
        dtype=dtype, max_model_len=a.max_model_len, gpu_memory_utilization=a.gpu_memory_utilization,
        enable_sleep_mode=False, enforce_eager=True,
    )  # fmt: skip
    gen = VLLMGenerator(qcfg, [qcfg.eos_token_id or 0], vcfg)

    rows = []
    version = 0
    for mb in a.bucket_mb:
        gen.cfg.bucket_mb = mb

        def sync():
            nonlocal version
            version += 1
            gen.sync_weights(model, version)

        def gather_only(mb=mb):
            stream = HFWeightStream(model, qcfg, int(mb * 2**20), gen.engine_dtype)
            for _ in stream:
                pass

        t_sync = timed(sync, a.repeats)
        st = dict(gen.stats)
        t_gather = timed(gather_only, a.repeats)
        rows.append(
            {
                "bucket_mb": mb,
                "buckets": int(st["vllm/sync_buckets"]),
                "bytes": int(st["vllm/sync_bytes"]),
                "sync_s_median": statistics.median(t_sync),
                "sync_s_min": min(t_sync),
                "gather_s_median": statistics.median(t_gather),
                "gbps": st["vllm/sync_bytes"] / statistics.median(t_sync) / 1e9,
            }
        )

    if dist.get_rank() == 0:
        head = (
            f"Weight sync, Megatron TP{a.tp} -> one TP=1 vLLM engine per rank ({dist.get_world_size()} ranks), "
            f"{name}, {dtype}, {describe_machine()}, vllm {__import__('vllm').__version__}, torch {torch.__version__}; "
            f"median of {a.repeats} after a warm-up (engine build {gen.stats['vllm/build_s']:.1f} s, "
            f"model build {build_model_s:.1f} s)."
        )
        lines = [
            head,
            "",
            "| bucket MB | buckets | MB sent per rank | sync s (median) | sync s (min) | gather+map only s | GB/s |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['bucket_mb']:g} | {r['buckets']} | {r['bytes'] / 2**20:.2f} | {r['sync_s_median']:.4f} | "
                f"{r['sync_s_min']:.4f} | {r['gather_s_median']:.4f} | {r['gbps']:.3f} |"
            )
        text = "\n".join(lines)
        print(text)
        if a.out:
            Path(a.out).write_text(text + "\n")
        if a.json:
            Path(a.json).write_text(json.dumps({"head": head, "rows": rows}, indent=1))
    gen.close()
    dist.barrier()


if __name__ == "__main__":
    main()
