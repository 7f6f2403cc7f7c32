"""Attention memory and time of the decoder on one long row: Megatron's DotProductAttention vs the
project's SDPAttention (explicit mask, or segments), with and without activation recomputation.

Each configuration runs in its own process (peak RSS only grows): forward_hidden of one row of
``--tokens`` tokens (TP=1, fp32) + a scalar loss on the hidden states + backward. Reported: bytes of
the distinct storages autograd saved for backward in the forward (``saved_tensors_hooks``), the
process's peak RSS, and the forward + backward time. The LM head is not run (logits are measured by
the logprob benchmarks). Default shape: the narrow real-vocab Qwen2 of the recipe-scale issue.

    python tools/bench_attention.py [--tokens 4096] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NARROW_REAL_VOCAB = dict(
    architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936, hidden_size=256,
    intermediate_size=768, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=32768, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
)  # fmt: skip
CONFIGS = {  # name -> (core attention, mask form, recompute)
    "megatron_dot_product (old)": ("megatron", "mask", None),
    "sdpa_explicit_mask": ("sdpa", "mask", None),
    "sdpa_segments": ("sdpa", "segments", None),
    "sdpa_segments_recompute_core_attn": ("sdpa", "segments", "selective"),
    "sdpa_segments_recompute_full": ("sdpa", "segments", "full"),
}


def run_one(name: str, tokens: int, threads: int) -> dict:
    import torch
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    import models.qwen.model as qm
    from models.qwen.config import ActivationOptions, QwenConfig
    from parallel.distributed import init_distributed

    torch.set_num_threads(threads)
    core, form, recompute = CONFIGS[name]
    init_distributed(tp=1, seed=1)
    cfg = QwenConfig.from_hf_dict(NARROW_REAL_VOCAB)
    acts = {
        None: ActivationOptions(),
        "selective": ActivationOptions(recompute_granularity="selective"),
        "full": ActivationOptions(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        ),
    }[recompute]
    if core == "megatron":  # the spec before this module existed
        spec_fn = qm.layer_spec

        def old_spec(use_te=None):
            spec = spec_fn(use_te)
            spec.submodules.self_attention.submodules.core_attention = DotProductAttention
            return spec

        qm.layer_spec = old_spec
    model = qm.build_model(cfg, activations=acts)
    model.train()
    ids = torch.randint(3, cfg.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    kw = {"segment_ids": torch.zeros(1, tokens, dtype=torch.long)}
    if form == "mask":
        kw = {"attn_mask": qm.attention_mask(torch.ones(1, tokens, dtype=torch.bool))}
    storages: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):  # activations only: parameters saved by their own ops are not counted
        st = t.untyped_storage()
        if st.data_ptr() not in weights:
            storages[st.data_ptr()] = st.nbytes()
        return t

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = qm.forward_hidden(model, ids, None, **kw)
    t1 = time.perf_counter()
    hidden.square().mean().backward()
    t2 = time.perf_counter()
    return {
        "config": name,
        "saved_MiB": sum(storages.values()) / 2**20,
        "peak_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_before_GiB": rss0 / 2**20,
        "fwd_s": t1 - t0,
        "fwd_bwd_s": t2 - t0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", help=argparse.SUPPRESS)  # child process: one configuration
    a = p.parse_args()
    if a.only:
        print(json.dumps(run_one(a.only, a.tokens, a.threads)))
        return
    from tools.machine import describe_machine

    print(f"machine: {describe_machine()}; one row of {a.tokens} tokens, TP=1 fp32, {a.threads} threads")
    print("| attention | saved for backward (MiB) | peak RSS (GiB) | fwd (s) | fwd+bwd (s) |")
    print("|---|---|---|---|---|")
    for name in CONFIGS:
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), CUDA_VISIBLE_DEVICES="")
        cmd = [
            sys.executable,
            __file__,
            "--only",
            name,
            "--tokens",
            str(a.tokens),
            "--threads",
            str(a.threads),
        ]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode:
            print(f"| {name} | failed: {out.stderr.strip().splitlines()[-1]} | | | |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"| {name} | {r['saved_MiB']:.0f} | {r['peak_rss_GiB']:.2f} | {r['fwd_s']:.2f} | {r['fwd_bwd_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
