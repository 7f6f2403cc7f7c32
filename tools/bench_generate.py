"""Rollout speed: the built-in generator vs HF ``generate`` vs vLLM on one HF Qwen2 dir, one process.

    # a random Qwen2 at the real vocabulary (hidden 256, 4 layers, 4 heads / 2 KV, FFN 768, vocab 151,936)
    python tools/bench_generate.py --make-model /tmp/qwen_rv
    python tools/bench_generate.py --model /tmp/qwen_rv --prompts 4 --generations 6 --prompt-len 128 \\
        --new-tokens 256 --ignore-eos --backends builtin,hf,vllm --json out.json
    # long tail: completion lengths vary (geometric, mean ~ new-tokens / 4)
    python tools/bench_generate.py --model /tmp/qwen_rv ... --long-tail --backends builtin,hf

Every backend samples (T=1, no top-k/top-p) ``--generations`` completions of each of ``--prompts``
random prompts (token ids drawn from ``--seed``) in one call, in ``--dtype`` (fp32 by default).
``--ignore-eos``: every row runs ``--new-tokens``. ``--long-tail``: a random set of
``vocab * 4 / new-tokens`` token ids stops a row (EOS for every backend), so each step ends a row with
probability ~4 / new-tokens and lengths vary as in a real rollout; tokens then counts the tokens
actually generated. Each backend runs a short warm-up (8 new tokens), then ``--repeats`` full runs;
the best is reported. vLLM runs last (its in-process engine re-binds the process's threads) and
returns the sampled tokens' logprobs, as a GRPO rollout needs. ``--json`` writes
``[{"backend", "tokens", "seconds", "tokens_per_s", ...}, ...]``.

GPU, the recipe's model with random weights (no download; built-in only):

    python tools/bench_generate.py --config configs/models/deepseek-r1-distill-qwen-1.5b.json \
        --dtype bf16 --prompts 6 --generations 6 --prompt-len 512 --new-tokens 3584 --ignore-eos \
        --backends builtin --cuda-graphs --bandwidth-tbps 4.3

The built-in's row then also reports the memory-bandwidth bound: the bytes its decode steps must read
(every weight but the input embedding, per step; each row's cached K/V, per token:
``models.qwen.memory``) over ``--bandwidth-tbps``, as a fraction of the measured time (prefill
included, so a lower bound on the decode's own fraction).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.machine import describe_machine  # noqa: E402

REAL_VOCAB_SHAPE = dict(
    vocab_size=151936, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643,
)  # fmt: skip


def make_model(out_dir: str, seed: int = 0) -> None:
    """Save a random fp32 Qwen2ForCausalLM with ``REAL_VOCAB_SHAPE`` (safetensors, no tokenizer)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(**REAL_VOCAB_SHAPE, torch_dtype="float32")
    Qwen2ForCausalLM(cfg).float().save_pretrained(out_dir)
    print(f"wrote a random fp32 Qwen2 {REAL_VOCAB_SHAPE} to {out_dir}")


def decode_read_bytes(
    qcfg, tp: int, dtype: torch.dtype, decode_steps: int, prompt_lens: list[int], lengths: list[int]
) -> float:
    """Bytes the decode steps of one ``generate`` must read on one rank: the weights once per step, and
    for each row's token k >= 2 (token 1 comes from the prefill) the K/V of its ``P + k - 1`` cached
    positions (the new token's own included): sum over k of (P + k - 1) = (n - 1) P + n (n - 1) / 2."""
    from models.qwen.memory import decode_weight_bytes, kv_bytes_per_token

    kv_positions = sum((n - 1) * P + n * (n - 1) // 2 for P, n in zip(prompt_lens, lengths, strict=True) if n)
    return decode_steps * decode_weight_bytes(qcfg, tp, dtype) + kv_positions * kv_bytes_per_token(
        qcfg, tp, dtype
    )


def timed(fn: Callable[[int], dict], new_tokens: int, repeats: int) -> dict:
    """The fastest of ``repeats`` runs of ``fn(new_tokens)`` (a dict with ``tokens``; ``seconds`` is
    added) after a short warm-up (same batch and prompts, 8 new tokens: allocations, kernels, caches)."""
    fn(min(8, new_tokens))
    best = None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        run = fn(new_tokens)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        run["seconds"] = time.perf_counter() - t
        if best is None or run["tokens"] / run["seconds"] > best["tokens"] / best["seconds"]:
            best = run
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--make-model", metavar="DIR", help="write a random real-vocab Qwen2 to DIR and exit")
    p.add_argument("--model", help="HF Qwen2 dir (config.json + safetensors)")
    p.add_argument("--config", help="HF config.json: the built-in on random weights (no --model needed)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--cuda-graphs", action="store_true", help="built-in: rollout.decode.cuda_graphs")
    p.add_argument("--sync-every", type=int, default=0, help="built-in: rollout.decode.sync_every")
    p.add_argument("--bandwidth-tbps", type=float, help="report the built-in's memory-bandwidth bound")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--generations", type=int, default=6)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--long-tail", action="store_true", help="stop rows at random (see above)")
    p.add_argument("--backends", default="builtin,hf,vllm")
    p.add_argument("--max-batch-rows", type=int, default=0, help="built-in decode slots (0 = all rows)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()
    if a.make_model:
        make_model(a.make_model, a.seed)
        return
    if bool(a.model) == bool(a.config):
        p.error("give --model HF_DIR (create one with --make-model DIR) or --config CONFIG_JSON")
    if a.ignore_eos and a.long_tail:
        p.error("--ignore-eos and --long-tail exclude each other")
    backends = a.backends.split(",")
    unknown = sorted(set(backends) - {"builtin", "hf", "vllm"})
    if unknown:
        p.error(f"--backends: unknown {unknown}; choose from builtin, hf, vllm")
    if a.config and backends != ["builtin"]:
        p.error("--config (random weights) runs --backends builtin only")
    torch.set_num_threads(a.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    hf_cfg = json.loads(Path(a.config or Path(a.model) / "config.json").read_text())
    V = hf_cfg["vocab_size"]
    g = torch.Generator().manual_seed(a.seed)
    prompts = [torch.randint(0, V, (a.prompt_len,), generator=g).tolist() for _ in range(a.prompts)]
    eos = hf_cfg.get("eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if a.long_tail:
        k = max(1, round(V * 4 / a.new_tokens))
        eos = torch.randperm(V, generator=g)[:k].tolist()
    stop = [] if a.ignore_eos else eos
    N, G = a.new_tokens, a.generations

    hf = None
    if a.model:
        from transformers import Qwen2ForCausalLM

        hf = Qwen2ForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation="sdpa").eval()
        if torch.cuda.is_available():
            hf = hf.cuda()
    runs: dict[str, Callable[[int], dict]] = {}
    if "builtin" in backends:
        from engine.rollout.base import DecodeConfig, SamplingConfig
        from engine.rollout.megatron_generator import MegatronGenerator
        from models.qwen.config import QwenConfig
        from models.qwen.hf_mapping import state_dict_reader
        from models.qwen.model import build_model, load_hf_weights
        from parallel.distributed import init_distributed

        init_distributed(1)
        qcfg = QwenConfig.from_hf_dict(hf_cfg)
        model = build_model(qcfg, dtype)
        if hf is not None:
            sd = {k: v.float().cpu() for k, v in hf.state_dict().items()}
            load_hf_weights(model, qcfg, state_dict_reader(sd, qcfg))
        decode = DecodeConfig(
            max_batch_rows=a.max_batch_rows, sync_every=a.sync_every, cuda_graphs=a.cuda_graphs
        )
        gen = MegatronGenerator(model, V, stop, 0, decode)
        seeds = iter(range(1 << 30))

        def run_builtin(new: int) -> dict:
            s = SamplingConfig(temperature=1.0, max_new_tokens=new, seed=next(seeds))
            out = gen.generate(prompts, G, s)
            lengths = [len(c) for c in out.completion_ids]
            run = {"tokens": sum(lengths), "decode_steps": int(out.stats["decode_steps"])}
            run["bytes_read"] = decode_read_bytes(
                qcfg, 1, dtype, run["decode_steps"], [a.prompt_len] * len(lengths), lengths
            )
            return run

        runs["builtin"] = run_builtin
    if "hf" in backends:
        ids = torch.tensor(prompts, device="cuda" if torch.cuda.is_available() else "cpu")

        def run_hf(new: int) -> dict:
            with torch.no_grad():
                out = hf.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                    top_k=0, top_p=1.0, num_return_sequences=G, max_new_tokens=new,
                    min_new_tokens=new if a.ignore_eos else 0, eos_token_id=stop or None, pad_token_id=0,
                )  # fmt: skip
            comp = out[:, a.prompt_len :].cpu()
            if not stop:
                return {"tokens": comp.numel()}
            hit = torch.isin(comp, torch.tensor(stop))
            first = torch.where(
                hit.any(1), hit.float().argmax(1) + 1, torch.full_like(hit[:, 0], new, dtype=torch.long)
            )
            return {"tokens": int(first.sum())}

        runs["hf"] = run_hf
    results = []
    for name in [b for b in ("builtin", "hf") if b in runs]:
        run = timed(runs[name], N, a.repeats)
        results.append({"backend": name, **run, "tokens_per_s": run["tokens"] / run["seconds"]})
        if a.bandwidth_tbps and "bytes_read" in run:
            bound = run["bytes_read"] / (a.bandwidth_tbps * 1e12)
            results[-1].update(bound_seconds=bound, bandwidth_fraction=bound / run["seconds"])
        print(json.dumps(results[-1]), flush=True)
    if "vllm" in backends:
        del hf
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM, SamplingParams

        llm = LLM(
            model=a.model, skip_tokenizer_init=True, dtype=str(dtype).removeprefix("torch."),
            enforce_eager=True, seed=a.seed,
            max_model_len=a.prompt_len + N, generation_config="vllm", kv_cache_memory_bytes=1 << 30,
        )  # fmt: skip
        seeds = iter(range(1 << 30))

        def run_vllm(new: int) -> dict:
            sp = SamplingParams(
                n=G, temperature=1.0, top_k=0, top_p=1.0, max_tokens=new, ignore_eos=a.ignore_eos,
                stop_token_ids=stop, logprobs=0, seed=next(seeds),
            )  # fmt: skip
            outs = llm.generate([{"prompt_token_ids": q} for q in prompts], sp, use_tqdm=False)
            return {"tokens": sum(len(c.token_ids) for o in outs for c in o.outputs)}

        run = timed(run_vllm, N, a.repeats)
        results.append({"backend": "vllm", **run, "tokens_per_s": run["tokens"] / run["seconds"]})
        print(json.dumps(results[-1]), flush=True)
    mode = "long tail" if a.long_tail else "ignore EOS" if a.ignore_eos else "EOS"
    print(
        f"\n{describe_machine()}, {a.threads} threads, torch {torch.__version__}; {a.prompts} prompts x {G}, "
        f"prompt {a.prompt_len}, up to {N} new tokens ({mode}), T=1, {a.dtype}, best of {a.repeats}"
        + (", built-in with CUDA graphs" if a.cuda_graphs else "")
        + "\n"
    )
    bw = f" | fraction of the {a.bandwidth_tbps} TB/s bound" if a.bandwidth_tbps else ""
    print(f"| backend | tokens | s | tokens/s{bw} |\n|---|---|---|---|" + ("---|" if bw else ""))
    for r in results:
        frac = f" | {r['bandwidth_fraction']:.1%}" if "bandwidth_fraction" in r else (" | -" if bw else "")
        print(f"| {r['backend']} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f}{frac} |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
