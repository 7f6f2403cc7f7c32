"""Training-pass throughput and peak memory at recipe shapes, for this checkout or an older one.

    python tools/bench_recipe_scale.py --rows 1 --prompt 512 --completion 3584 [--repo DIR] \
        [--pack] [--train-max-tokens N] [--chunk N] [--threads 2] [--json OUT]
    torchrun --nproc_per_node 2 tools/bench_recipe_scale.py --tp 2 ...

One GRPO training pass the way the trainer runs it, on synthetic rows (random tokens, no EOS) with the
narrow real-vocab Qwen2 (configs/models/narrow-real-vocab.json: hidden 256, 2 layers, vocab 151,936),
fp32: micro-batches (``build_micro_batches``), the reference pass (``completion_logprobs`` under
no_grad, beta > 0) and the policy pass (``accumulate_policy_grads``: logprobs, GRPO loss, backward
into Megatron DDP's buffers); no optimizer step. ``--repo DIR`` imports the engine from another tree
(e.g. ``git archive 38907b0 | tar -x -C /tmp/old``: the path before packing and chunked logprobs), so
both are measured by the same script; the options that tree lacks are refused. Peak memory = max RSS
(``ru_maxrss``) of the process, the max over ranks.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=str(HERE), help="the checkout whose engine is measured")
    p.add_argument("--model", default=str(HERE / "configs/models/narrow-real-vocab.json"))
    p.add_argument("--rows", type=int, default=1, help="completions (one logical micro-batch)")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--completion", type=int, default=3584)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch threads per rank")
    p.add_argument("--pack", action="store_true", help="batching.pack_sequences")
    p.add_argument("--train-max-tokens", type=int, default=None)
    p.add_argument("--chunk", type=int, default=None, help="batching.logprob_chunk_tokens")
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--json", default=None, help="append the result as one JSON line")
    a = p.parse_args()
    sys.path.insert(0, a.repo)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(a.threads)
    from engine.batching.logprobs import completion_logprobs
    from engine.batching.micro_batches import build_micro_batches
    from engine.loss import LossConfig
    from engine.trainer import accumulate_policy_grads
    from models.qwen.config import QwenConfig
    from models.qwen.model import build_model
    from parallel.ddp import wrap_ddp
    from parallel.distributed import init_distributed

    init_distributed(tp=a.tp, seed=1)
    rank = dist.get_rank() if dist.is_initialized() else 0
    qcfg = QwenConfig.from_file(a.model)
    V = qcfg.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, V - 1, (a.prompt,), generator=g).tolist()
    rows = [prompt] * a.rows
    comps = [torch.randint(3, V - 1, (a.completion,), generator=g).tolist() for _ in range(a.rows)]
    adv = torch.randn(a.rows, generator=g)
    kw, lp_kw = {}, {}
    params = inspect.signature(build_micro_batches).parameters
    if a.pack or a.train_max_tokens:
        if "pack_sequences" not in params:
            raise SystemExit(f"{a.repo}: build_micro_batches has no packing (pack_sequences)")
        kw = {"pack_sequences": True, "max_tokens": a.train_max_tokens}
    if a.chunk is not None:
        if "chunk_tokens" not in inspect.signature(completion_logprobs).parameters:
            raise SystemExit(f"{a.repo}: completion_logprobs has no chunk_tokens")
        lp_kw = {"chunk_tokens": a.chunk}
    model = wrap_ddp(build_model(qcfg))
    ref = build_model(qcfg, perform_initialization=False)
    ref.load_state_dict(model.module.state_dict())
    ref.eval().requires_grad_(False)
    loss_cfg = LossConfig(beta=a.beta)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        mbs = build_micro_batches(rows, comps, a.rows, 0, a.rows, **kw)
        for mb in mbs:
            r = (
                mb.rows
                if isinstance(mb.rows, list)
                else list(range(mb.rows.start, mb.rows.start + len(mb.completion_mask)))
            )
            mb.advantages = adv[r]
            if a.beta > 0 and r:
                with torch.no_grad():
                    mb.ref_logprobs = completion_logprobs(ref, mb, V, **lp_kw)[0]
        t1 = time.perf_counter()
        model.zero_grad_buffer()
        accumulate_policy_grads(model, mbs, loss_cfg, V, **({"chunk_tokens": a.chunk} if lp_kw else {}))
        model.finish_grad_sync()
        t2 = time.perf_counter()
        times.append((t1 - t0, t2 - t1))
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20])
    if dist.is_initialized():
        dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    ref_s, train_s = min(t[0] for t in times), min(t[1] for t in times)
    tokens = a.rows * (a.prompt + a.completion)
    out = {
        "repo": a.repo, "rows": a.rows, "prompt": a.prompt, "completion": a.completion, "tp": a.tp,
        "threads": a.threads, "pack": bool(kw), "train_max_tokens": a.train_max_tokens, "chunk": a.chunk,
        "beta": a.beta, "ref_s": ref_s, "train_s": train_s, "train_tokens_per_s": tokens / train_s,
        "tokens_per_s_incl_ref": tokens / (ref_s + train_s), "peak_rss_gib": float(rss[0]),
        "rss_before_gib": rss0, "loadavg_1m": os.getloadavg()[0],
    }  # fmt: skip
    if rank == 0:
        print(json.dumps(out), flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(out) + "\n")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
