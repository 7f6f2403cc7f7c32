"""Megatron Qwen2 vs HF transformers at the launch's TP x DP layout (run under torchrun).

Checks, per tiny variant: logits, per-token logprobs of continuations, and the gradient of a scalar
loss for every weight (DDP-averaged over DP, gathered over TP) against HF on the same global batch.
Packed rows (``forward_hidden`` with ``segment_ids``, and a shared prompt with ``branch_ids``) ==
each sequence forwarded alone by HF (logits and gradients), and a wrong packing (a sequence seeing
its neighbour) is far off. A config.json ``pad_token_id`` row gets HF's gradient (zero lookup
gradient). Activation recomputation (selective, full) gives the same gradients and saves fewer bytes.
At TP=2 also: the real 1.5B config builds on the meta device with the expected per-rank shapes.
``--sp``: everything with sequence parallelism.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from common import TINY_VARIANTS, Results, megatron_from_hf, tiny_hf_model

from engine.batching.logprobs import gather_vocab, token_logprobs
from models.qwen.config import ActivationOptions, QwenConfig
from models.qwen.hf_mapping import mcore_shard_shape, rules
from models.qwen.model import (
    build_model,
    forward_hidden,
    forward_logits,
    gather_hf_state_dict,
    output_logits,
)
from parallel.ddp import wrap_ddp
from parallel.distributed import dp_rank, dp_size, init_distributed, tp_size

LOGIT_TOL = 1e-5  # fp32, absolute
GRAD_TOL = 1e-5  # relative to the largest reference gradient of each tensor
RECOMPUTE_TOL = 1e-6
PAD_ID = 7  # the pad-token variant's pad_token_id (appears mid-sequence in its batch)


def global_batch(vocab: int, B: int = 4, S: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(3, vocab, (B, S), generator=g)
    pad = torch.ones(B, S, dtype=torch.bool)
    for b in range(B):  # left padding of 0..3 tokens
        pad[b, : b % 4] = False
    ids[~pad] = 0
    return ids, pad


def worst_grad_error(grads: dict, ref_grads: dict) -> tuple[float, str]:
    worst, worst_name = 0.0, ""
    for name, ref in ref_grads.items():
        e = float((grads[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        if e > worst:
            worst, worst_name = e, name
    return worst, worst_name


def hf_grads(hf, cfg: QwenConfig) -> dict[str, torch.Tensor]:
    ref = {n: p.grad for n, p in hf.named_parameters()}
    if cfg.tie_word_embeddings:
        ref.pop("lm_head.weight", None)
    return ref


def load(hf, cfg: QwenConfig, activations: ActivationOptions | None):
    return wrap_ddp(megatron_from_hf(hf, cfg, activations))


def check_variant(
    res: Results, variant: str, acts: ActivationOptions | None, prefix: str = "", **hf_kw
) -> None:
    hf = tiny_hf_model(variant, **hf_kw)
    cfg = QwenConfig.from_hf_dict(hf.config.to_dict())
    V = cfg.vocab_size
    ddp = load(hf, cfg, acts)
    name = prefix or variant

    ids, pad = global_batch(V)
    if "pad_token_id" in hf_kw:  # the pad token as an input mid-sequence (sampled mid-completion)
        ids[:, 6] = ids[:, 9] = hf_kw["pad_token_id"]
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
    res.record(f"{name}/logits", err <= LOGIT_TOL, max_abs=err, tol=LOGIT_TOL)
    res.record(
        f"{name}/padded_vocab_shape",
        logits.shape[-1] * tp_size() == cfg.padded_vocab_size(tp_size()),
        got=logits.shape[-1],
    )

    lp = token_logprobs(logits[:, :-1], ids[mine][:, 1:], V)
    m = tok_mask[mine]
    err = (lp - ref_lp[mine])[m].abs().max()
    res.record(f"{name}/logprobs", err <= LOGIT_TOL, max_abs=err, tol=LOGIT_TOL)

    # Loss normalised by the global token count; DDP averages over DP, so scale by dp_size.
    loss = -(w[mine][:, 1:] * lp * m).sum() / n_tokens * dp_size()
    loss.backward()
    ddp.finish_grad_sync()
    grads = gather_hf_state_dict(ddp, cfg, grads=True)
    ref_grads = hf_grads(hf, cfg)
    worst, worst_name = worst_grad_error(grads, ref_grads)
    res.record(
        f"{name}/grads",
        worst <= GRAD_TOL and set(grads) == set(ref_grads),
        worst_rel=worst,
        worst_tensor=worst_name,
        tol=GRAD_TOL,
        n_tensors=len(ref_grads),
    )
    if "pad_token_id" in hf_kw:
        # HF: the pad row's lookup gradient is zero; untied, the whole row's gradient is then zero
        # (tied, the LM head still trains it: the grads check above compares it with HF's).
        pid = hf_kw["pad_token_id"]
        row, ref_row = grads["model.embed_tokens.weight"][pid], ref_grads["model.embed_tokens.weight"][pid]
        looked_up = grads["model.embed_tokens.weight"][ids[:, 1]]  # rows that were looked up: non-zero
        frozen = (
            float(row.abs().max()) == 0.0 if not cfg.tie_word_embeddings else torch.allclose(row, ref_row)
        )
        res.record(
            f"{name}/pad_row_frozen",
            bool(frozen) and float(looked_up.abs().max()) > 0,
            pad_row_max=row.abs().max(),
            hf_pad_row_max=ref_row.abs().max(),
        )
    # The weights gathered back to HF layout are exactly the HF weights (mapping round trip).
    back = gather_hf_state_dict(ddp, cfg)
    exact = all(torch.equal(back[n], p) for n, p in hf.state_dict().items() if n in back)
    res.record(f"{name}/weights_roundtrip", exact and set(back) == set(ref_grads))


# ---- packed rows ---------------------------------------------------------------------------------
@dataclass
class PackedRow:
    """One packed row and, for each of its tokens, where HF sees it: (unrolled sequence, position)."""

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)
    branches: list[int] = field(default_factory=list)
    where: list[tuple[int, int]] = field(default_factory=list)  # (-1, -1) for padding


def packed_rows(vocab: int) -> tuple[list[PackedRow], list[list[int]]]:
    """Per DP rank, one packed row: two plain sequences, a prompt shared by two completions (Prefix
    Grouper), then padding. Returns all ranks' rows and the HF sequences they unroll to."""
    g = torch.Generator().manual_seed(11)

    def toks(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    rows, seqs = [], []
    for r in range(dp_size()):
        row = PackedRow()
        for seg, n in enumerate((5, 9 + r)):  # plain sequences: positions restart at 0
            s = toks(n)
            seqs.append(s)
            row.ids += s
            row.positions += list(range(n))
            row.segments += [seg] * n
            row.branches += [0] * n
            row.where += [(len(seqs) - 1, t) for t in range(n)]
        prompt, comps = toks(4), [toks(3), toks(5)]
        first = len(seqs)
        for c in comps:
            seqs.append(prompt + c)
        row.ids += prompt
        row.positions += list(range(4))
        row.segments += [2] * 4
        row.branches += [0] * 4
        row.where += [(first, t) for t in range(4)]  # the prompt's outputs: as in the first completion
        for j, c in enumerate(comps):
            row.ids += c
            row.positions += list(range(4, 4 + len(c)))
            row.segments += [2] * len(c)
            row.branches += [j + 1] * len(c)
            row.where += [(first + j, 4 + t) for t in range(len(c))]
        row.ids += [0] * 3  # padding: segment -1 (an odd row length: sequence parallelism pads it)
        row.positions += [0] * 3
        row.segments += [-1] * 3
        row.branches += [0] * 3
        row.where += [(-1, -1)] * 3
        rows.append(row)
    return rows, seqs


def check_packed(res: Results, variant: str, acts: ActivationOptions | None, name: str) -> None:
    hf = tiny_hf_model(variant)
    cfg = QwenConfig.from_hf_dict(hf.config.to_dict())
    V = cfg.vocab_size
    ddp = load(hf, cfg, acts)
    rows, seqs = packed_rows(V)
    g = torch.Generator().manual_seed(3)
    targets = [torch.randint(0, V, (len(r.ids),), generator=g) for r in rows]
    weights = [torch.randn(len(r.ids), generator=g) for r in rows]
    n_real = sum(sum(s >= 0 for s in r.segments) for r in rows)

    # HF: each unrolled sequence alone; the loss over every packed row's real tokens.
    hf.zero_grad()
    ref = [hf(input_ids=torch.tensor([s])).logits[0] for s in seqs]
    ref_loss = 0.0
    ref_rows = []
    for r, t, w in zip(rows, targets, weights, strict=True):
        real = [i for i, s in enumerate(r.segments) if s >= 0]
        lg = torch.stack([ref[r.where[i][0]][r.where[i][1]] for i in real])
        ref_rows.append(lg)
        ref_loss = ref_loss - (w[real] * torch.log_softmax(lg, -1).gather(-1, t[real, None])[:, 0]).sum()
    (ref_loss / n_real).backward()

    def ours(
        row: PackedRow, segments: list[int], branches: list[int] | None, per_row_positions: bool = False
    ):
        positions = torch.tensor(row.positions)
        hidden = forward_hidden(
            ddp,
            torch.tensor([row.ids]),
            positions[None] if per_row_positions else positions,
            segment_ids=torch.tensor([segments]),
            branch_ids=None if branches is None else torch.tensor([branches]),
        )
        real = torch.tensor([i for i, s in enumerate(row.segments) if s >= 0])
        return real, output_logits(ddp, hidden[:, 0].index_select(0, real))

    row, t, w = rows[dp_rank()], targets[dp_rank()], weights[dp_rank()]
    ddp.zero_grad_buffer()
    real, logits = ours(row, row.segments, row.branches)
    err = float((gather_vocab(logits, V) - ref_rows[dp_rank()]).abs().max())
    res.record(f"{name}/packed_logits", err <= LOGIT_TOL, max_abs=err, tol=LOGIT_TOL)
    lp = token_logprobs(logits, t[real], V)
    (-(w[real] * lp).sum() / n_real * dp_size()).backward()
    ddp.finish_grad_sync()
    worst, where = worst_grad_error(gather_hf_state_dict(ddp, cfg, grads=True), hf_grads(hf, cfg))
    res.record(f"{name}/packed_grads", worst <= GRAD_TOL, worst_rel=worst, worst_tensor=where, tol=GRAD_TOL)

    # Negative controls: the same comparison with a wrong packing must fail by far.
    with torch.no_grad():
        merged = [0 if s >= 0 else -1 for s in row.segments]  # every sequence sees its predecessors
        bad_docs = float(
            (gather_vocab(ours(row, merged, row.branches)[1], V) - ref_rows[dp_rank()]).abs().max()
        )
        bad_tree = float(
            (gather_vocab(ours(row, row.segments, None)[1], V) - ref_rows[dp_rank()]).abs().max()
        )
        per_row = float((ours(row, row.segments, row.branches, True)[1] - logits).abs().max())
    res.record(f"{name}/packed_positions_per_row", per_row <= 1e-6, max_abs=per_row)  # positions [1, T]
    res.record(f"{name}/packed_control_sees_neighbour", bad_docs > 1e-2, max_abs=bad_docs)
    res.record(f"{name}/packed_control_branches_see_each_other", bad_tree > 1e-2, max_abs=bad_tree)


# ---- activation recomputation --------------------------------------------------------------------
RECOMPUTE = {
    # core_attn alone saves ~nothing on SDPA (it keeps q, k, v, out and a log-sum-exp: O(S) already; the
    # recomputed call keeps q, k, v and RoPE's freqs instead): the MLP is where selective pays.
    "selective": ActivationOptions(recompute_granularity="selective", recompute_modules=("core_attn", "mlp")),
    "full_uniform": ActivationOptions(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full_block": ActivationOptions(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
}  # fmt: skip


def saved_bytes_and_grads(hf, cfg: QwenConfig, acts: ActivationOptions, sp: bool) -> tuple[int, dict]:
    """Bytes of the distinct activation storages autograd saves for backward in one packed-row forward,
    and the gradients (HF layout, gathered over TP)."""
    ddp = load(hf, cfg, ActivationOptions(sequence_parallel=sp, **{
        k: getattr(acts, k) for k in ("recompute_granularity", "recompute_method", "recompute_num_layers", "recompute_modules")
    }))  # fmt: skip
    ddp.train()
    g = torch.Generator().manual_seed(9)
    T = 64
    ids = torch.randint(3, cfg.vocab_size, (1, T), generator=g)
    seg = torch.tensor([[0] * 20 + [1] * 30 + [2] * 14])
    pos = torch.cat([torch.arange(20), torch.arange(30), torch.arange(14)])
    storages: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in ddp.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:  # activations: parameter storages are not counted
        st = t.untyped_storage()
        if st.data_ptr() not in weights:
            storages[st.data_ptr()] = st.nbytes()
        return t

    ddp.zero_grad_buffer()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = forward_hidden(ddp, ids, pos, segment_ids=seg)
    logits = output_logits(ddp, hidden[:, 0])
    lp = token_logprobs(logits[:-1], ids[0, 1:], cfg.vocab_size)
    (-(lp * torch.linspace(-1, 1, T - 1)).mean()).backward()
    ddp.finish_grad_sync()
    return sum(storages.values()), gather_hf_state_dict(ddp, cfg, grads=True)


def check_recompute(res: Results, sp: bool) -> None:
    hf = tiny_hf_model("gqa_untied_v300", num_hidden_layers=4)
    cfg = QwenConfig.from_hf_dict(hf.config.to_dict())
    base_bytes, base = saved_bytes_and_grads(hf, cfg, ActivationOptions(), sp)
    for name, acts in RECOMPUTE.items():
        got_bytes, grads = saved_bytes_and_grads(hf, cfg, acts, sp)
        worst, where = worst_grad_error(grads, base)
        res.record(f"recompute/{name}_grads", worst <= RECOMPUTE_TOL, worst_rel=worst, worst_tensor=where)
        res.record(
            f"recompute/{name}_saves_less", got_bytes < base_bytes, saved=got_bytes, without=base_bytes
        )


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
    sp = "--sp" in res.extra
    acts = ActivationOptions(sequence_parallel=sp)
    init_distributed(tp=tp, seed=1234)
    torch.set_num_threads(1)
    for variant in TINY_VARIANTS:
        res.run(f"{variant}/logits", check_variant, res, variant, acts)
        res.run(f"{variant}/packed_logits", check_packed, res, variant, acts, variant)
    for variant in ("gqa_untied_v300", "gqa_tied_v512"):  # HF freezes the padding_idx row's lookup
        name = f"pad_token_{variant}"
        res.run(f"{name}/logits", check_variant, res, variant, acts, name, pad_token_id=PAD_ID)
    res.run("recompute/selective_grads", check_recompute, res, sp)
    if tp == 2 and not sp:
        res.run("full_1.5b/meta_shapes", check_full_size_meta, res)
    res.finish()


if __name__ == "__main__":
    main()
