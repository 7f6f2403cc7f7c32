"""Built-in Megatron generator vs HF ``generate`` on the same tiny Qwen2, CPU, one process.

    python tools/bench_generate.py [--batch 16] [--prompt-len 32] [--new-tokens 64] [--out docs/benchmarks.md]

Both sample (T=1) with a KV cache over the same left-padded batch; tokens/s counts generated tokens.
Each side runs once to warm up, then ``--repeats`` times; the median is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.rollout.base import SamplingConfig
from engine.rollout.megatron_generator import MegatronGenerator  # noqa: E402
from models.qwen.config import QwenConfig  # noqa: E402
from models.qwen.hf_mapping import state_dict_reader  # noqa: E402
from models.qwen.model import build_model, load_hf_weights  # noqa: E402
from parallel.distributed import init_distributed  # noqa: E402
from tools.machine import describe_machine  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=str, default="")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hcfg = Qwen2Config(
        vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(hcfg).float().eval()
    init_distributed(1)
    cfg = QwenConfig.from_hf_dict(hcfg.to_dict())
    model = build_model(cfg)
    load_hf_weights(model, cfg, state_dict_reader(hf.state_dict(), cfg))
    EOS = -1  # never stop early: both sides generate exactly --new-tokens
    gen = MegatronGenerator(model, cfg.vocab_size, [EOS], pad_token_id=0)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 1024, (a.prompt_len,), generator=g).tolist() for _ in range(a.batch)]
    ids = torch.tensor(prompts)

    def run_ours() -> float:
        t = time.perf_counter()
        gen.generate(prompts, 1, SamplingConfig(temperature=1.0, max_new_tokens=a.new_tokens, seed=0))
        return time.perf_counter() - t

    def run_hf() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            hf.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, pad_token_id=0,
            )  # fmt: skip
        return time.perf_counter() - t

    rows = []
    for name, fn in [
        ("mcore-grpo MegatronGenerator (static KV cache)", run_ours),
        ("HF transformers generate", run_hf),
    ]:
        fn()
        times = [fn() for _ in range(a.repeats)]
        med = statistics.median(times)
        rows.append((name, med, a.batch * a.new_tokens / med))
    ratio = rows[0][2] / rows[1][2]
    table = [
        f"Machine: {describe_machine()}, {a.threads} threads, torch {torch.__version__}. Tiny Qwen2 (hidden 256, 4 layers, "
        f"8 heads / 2 KV, vocab 1024), batch {a.batch}, prompt {a.prompt_len}, {a.new_tokens} new tokens, T=1, fp32.",
        "",
        "| generator | median s | tokens/s |",
        "|---|---|---|",
        *[f"| {n} | {s:.3f} | {tps:.0f} |" for n, s, tps in rows],
        "",
        f"Ours / HF tokens/s: **{ratio:.2f}x**",
    ]
    text = "\n".join(table)
    print(text)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            "## Built-in generator vs HF generate (CPU)\n\n`python tools/bench_generate.py`\n\n" + text + "\n"
        )


if __name__ == "__main__":
    main()
