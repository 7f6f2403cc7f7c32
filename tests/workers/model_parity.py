"""Megatron Qwen2 vs HF transformers at the launch's TP x DP layout (run under torchrun).

Checks, per tiny variant: logits, per-token logprobs of continuations, and the gradient of a scalar
loss for every weight (DDP-averaged over DP, gathered over TP) against HF on the same global batch.
At TP=2 also: the real 1.5B config builds on the meta device with the expected per-rank shapes.
"""

from __future__ import annotations

import os

import torch
from common import TINY_VARIANTS, Results, tiny_hf_model

from engine.batching.logprobs import gather_vocab, token_logprobs
from models.qwen.config import QwenConfig
from models.qwen.hf_mapping import mcore_shard_shape, rules, state_dict_reader
from models.qwen.model import build_model, forward_logits, gather_hf_state_dict, load_hf_weights
from parallel.ddp import wrap_ddp
from parallel.distributed import dp_rank, dp_size, init_distributed, tp_size

LOGIT_TOL = 1e-5  # fp32, absolute
GRAD_TOL = 1e-5  # relative to the largest reference gradient of each tensor


def global_batch(vocab: int, B: int = 4, S: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(3, vocab, (B, S), generator=g)
    pad = torch.ones(B, S, dtype=torch.bool)
    for b in range(B):  # left padding of 0..3 tokens
        pad[b, : b % 4] = False
    ids[~pad] = 0
    return ids, pad


def check_variant(res: Results, variant: str) -> None:
    hf = tiny_hf_model(variant)
    cfg = QwenConfig.from_hf_dict(hf.config.to_dict())
    V = cfg.vocab_size
    model = build_model(cfg)
    load_hf_weights(model, cfg, state_dict_reader(hf.state_dict(), cfg))
    ddp = wrap_ddp(model)

    ids, pad = global_batch(V)
    B = ids.shape[0]
    per = B // dp_size()
    mine = slice(dp_rank() * per, (dp_rank() + 1) * per)
    w = torch.randn(ids.shape, generator=torch.Generator().manual_seed(7))  # loss weights
    tok_mask = pad[:, 1:] & pad[:, :-1]
    n_tokens = tok_mask.sum()

    # HF reference on the whole global batch.
    hf.zero_grad()
    ref_logits = hf(input_ids=ids, attention_mask=pad.long()).logits
    ref_lp = torch.log_softmax(ref_logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    ref_loss = -(w[:, 1:] * ref_lp * tok_mask).sum() / n_tokens
    ref_loss.backward()

    # Megatron on this DP rank's slice.
    ddp.zero_grad_buffer()
    logits = forward_logits(ddp, ids[mine], pad[mine])
    full = gather_vocab(logits, V)
    err = (full - ref_logits[mine])[pad[mine]].abs().max()
    res.record(f"{variant}/logits", err <= LOGIT_TOL, max_abs=err, tol=LOGIT_TOL)
    res.record(
        f"{variant}/padded_vocab_shape",
        logits.shape[-1] * tp_size() == cfg.padded_vocab_size(tp_size()),
        got=logits.shape[-1],
    )

    lp = token_logprobs(logits[:, :-1], ids[mine][:, 1:], V)
    m = tok_mask[mine]
    err = (lp - ref_lp[mine])[m].abs().max()
    res.record(f"{variant}/logprobs", err <= LOGIT_TOL, max_abs=err, tol=LOGIT_TOL)

    # Loss normalised by the global token count; DDP averages over DP, so scale by dp_size.
    loss = -(w[mine][:, 1:] * lp * m).sum() / n_tokens * dp_size()
    loss.backward()
    ddp.finish_grad_sync()
    grads = gather_hf_state_dict(ddp, cfg, grads=True)
    ref_grads = {n: p.grad for n, p in hf.named_parameters()}
    if cfg.tie_word_embeddings:
        ref_grads.pop("lm_head.weight", None)
    worst, worst_name = 0.0, ""
    for name, ref in ref_grads.items():
        got = grads[name]
        e = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        if e > worst:
            worst, worst_name = e, name
    res.record(
        f"{variant}/grads",
        worst <= GRAD_TOL and set(grads) == set(ref_grads),
        worst_rel=worst,
        worst_tensor=worst_name,
        tol=GRAD_TOL,
        n_tensors=len(ref_grads),
    )
    # The weights gathered back to HF layout are exactly the HF weights (mapping round trip).
    back = gather_hf_state_dict(ddp, cfg)
    exact = all(torch.equal(back[n], p) for n, p in hf.state_dict().items() if n in back)
    res.record(f"{variant}/weights_roundtrip", exact and set(back) == set(ref_grads))


def check_full_size_meta(res: Results) -> None:
    cfg = QwenConfig.from_file(
        os.path.join(os.path.dirname(__file__), "../../configs/models/deepseek-r1-distill-qwen-1.5b.json")
    )
    with torch.device("meta"):
        model = build_model(cfg, params_dtype=torch.bfloat16, perform_initialization=False)
    params = dict(model.named_parameters())
    tp = tp_size()
    bad = []
    for rule in rules(cfg):
        want = mcore_shard_shape(cfg, rule, tp)
        got = tuple(params.pop(rule.mcore).shape)
        if got != want:
            bad.append((rule.mcore, got, want))
    n_local = sum(p.numel() for p in dict(model.named_parameters()).values())
    res.record(
        "full_1.5b/meta_shapes", not bad and not params, mismatches=bad[:5], leftover=sorted(params)[:5]
    )
    res.record("full_1.5b/is_meta", all(p.is_meta for p in model.parameters()), params_per_rank=n_local)


def main() -> None:
    res = Results()
    tp = int(res.extra[res.extra.index("--tp") + 1]) if "--tp" in res.extra else 1
    init_distributed(tp=tp, seed=1234)
    torch.set_num_threads(1)
    for variant in TINY_VARIANTS:
        res.run(f"{variant}/logits", check_variant, res, variant)
    if tp == 2:
        res.run("full_1.5b/meta_shapes", check_full_size_meta, res)
    res.finish()


if __name__ == "__main__":
    main()
