"""The memory plan's activation figure vs the bytes autograd actually saves (under torchrun).

For packed micro-batches of several shapes through ``completion_logprobs`` (decoder + chunked LM head),
at this TP layout, with and without sequence parallelism and activation recomputation: the bytes of
every distinct tensor storage saved for backward (``torch.autograd.graph.saved_tensors_hooks``;
parameters excluded) vs ``models.qwen.memory.activation_estimate(...).saved_bytes``.
"""

from __future__ import annotations

import torch
from common import Results, tiny_hf_config

from engine.batching.logprobs import completion_logprobs
from engine.batching.micro_batches import build_packed_sequences
from models.qwen.config import ActivationOptions, QwenConfig
from models.qwen.memory import activation_estimate
from models.qwen.model import build_model

# name -> (sequences as (prompt, completion) lengths, activation options)
SHAPES = {
    "2x(20+130)": ([(20, 130), (20, 130)], ActivationOptions()),
    "4x(50+200)": ([(50, 200)] * 4, ActivationOptions()),
    "1x(8+600)": ([(8, 600)], ActivationOptions()),
    "3x(30+170)_selective": ([(30, 170)] * 3, ActivationOptions(recompute_granularity="selective")),
    "3x(30+170)_full": (
        [(30, 170)] * 3,
        ActivationOptions(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    ),
    "3x(30+170)_sequence_parallel": ([(30, 170)] * 3, ActivationOptions(sequence_parallel=True)),
}


def saved_bytes(model, mb, V: int) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp, _ = completion_logprobs(model, mb, V, chunk_tokens=64)
    lp.sum().backward()  # the graph is sound (and frees what it saved)
    return sum(seen.values())


def check(res: Results, tp: int) -> None:
    hf = tiny_hf_config(
        "gqa_untied_v300", hidden_size=128, intermediate_size=320, max_position_embeddings=2048
    )
    cfg = QwenConfig.from_hf_dict(hf.to_dict())
    g = torch.Generator().manual_seed(0)
    for name, (seqs, opts) in SHAPES.items():
        if opts.sequence_parallel and tp == 1:
            continue
        model = build_model(cfg, activations=opts)
        prompts = [torch.randint(3, cfg.vocab_size, (p,), generator=g).tolist() for p, _ in seqs]
        comps = [torch.randint(3, cfg.vocab_size, (c,), generator=g).tolist() for _, c in seqs]
        mb = build_packed_sequences(prompts, comps, list(range(len(seqs))))
        got = saved_bytes(model, mb, cfg.vocab_size)
        tokens = sum(p + c for p, c in seqs)
        plan = activation_estimate(
            cfg, tokens, tp, torch.float32, 64, scored=sum(c for _, c in seqs), activations=opts
        )
        ratio = plan.saved_bytes / got
        res.record(
            "plan/saved_within_25pct", abs(ratio - 1) <= 0.25, **{name: [plan.saved_bytes, got, ratio]}
        )
        res.record(f"plan/{name}", abs(ratio - 1) <= 0.25, plan=plan.saved_bytes, measured=got, ratio=ratio)


def main() -> None:
    res = Results.start()
    res.run("plan/saved_within_25pct", check, res, res.tp)
    res.finish()


if __name__ == "__main__":
    main()
