"""Packing, token budgets, chunked logprobs and the batching-independent objective (under torchrun).

On a tiny random GQA Qwen2 (vocab 300: padded columns on the last TP shard), at this TP x DP layout:
- chunked vocab-parallel logprobs and entropy == Megatron's vocab-parallel CE on full logits
  (``token_logprobs`` / ``token_entropy``), values and gradients (hidden states and LM-head weight),
  at T = 1 and T = 0.7, with chunks that split the tokens unevenly;
- ``completion_logprobs`` of unpacked, packed and token-budget micro-batches == full-logits logprobs
  of the plain forward (today's path);
- negative control: a packing mask that lets a sequence see its neighbour changes the logprobs;
- the gradients (all parameters, gathered over TP, averaged over DP) of one GRPO step for every
  ``loss.loss_agg``, at several physical batchings (unpacked logical micro-batches, packed, budgets
  that split and that merge logical micro-batches, a budget that leaves one DP rank an empty
  micro-batch) == the gradient of an independent float64 formula of the objective on HF's model;
  the loss metric == the formula's value.
"""

from __future__ import annotations

import torch
from common import Results, megatron_from_hf, tiny_hf_model
from megatron.core import tensor_parallel

from engine.batching.logprobs import (
    chunked_logprobs,
    completion_logprobs,
    output_weight,
    token_entropy,
    token_logprobs,
)
from engine.batching.micro_batches import build_micro_batches
from engine.batching.normalisation import assign_loss_slices
from engine.loss import LossConfig
from engine.trainer import accumulate_policy_grads
from models.qwen.config import QwenConfig
from models.qwen.model import forward_logits, gather_hf_state_dict
from parallel.collectives import all_reduce, all_reduce_dp
from parallel.ddp import wrap_ddp
from parallel.distributed import dp_rank, dp_size

N_PROMPTS, G, MB = 4, 3, 4  # 12 completions; logical micro-batches of 4 (they straddle groups)
EOS, PAD = 2, 0
BETA, EPS_LOW, EPS_HIGH = 0.04, 0.2, 0.28
AGGS = ("token-mean", "token-mean-global", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def fixed_batch(vocab: int):
    g = torch.Generator().manual_seed(21)
    prompts, comps = [], []
    for _ in range(N_PROMPTS):
        p = torch.randint(3, vocab, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
        for j in range(G):
            n = int(torch.randint(1, 12, (1,), generator=g))
            c = torch.randint(3, vocab, (n,), generator=g).tolist()
            if j == 1:
                c[-1] = EOS
            prompts.append(p)
            comps.append(c)
    comps[5] = comps[5][:1]  # a one-token completion
    adv = torch.randn(len(comps), generator=g)
    noise = [0.3 * torch.randn(len(c), generator=g) for c in comps]  # old = logp + noise: clipping live
    return prompts, comps, adv, noise


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


# ---- 1. chunked logprobs == full logits --------------------------------------------------------------
def check_chunked(res: Results, model, V: int) -> None:
    g = torch.Generator().manual_seed(4)
    w = output_weight(model)
    H = w.shape[1]
    N = 23
    targets = torch.randint(0, V, (N,), generator=g)
    targets[0] = V - 1  # the last real column (on the last shard at TP2)
    gout = torch.randn(N, generator=g)
    for T in (1.0, 0.7):
        hidden = torch.randn(N, H, generator=g)
        h1 = hidden.clone().requires_grad_(True)
        w.grad = None
        logits = torch.nn.functional.linear(tensor_parallel.copy_to_tensor_model_parallel_region(h1), w)
        want = token_logprobs(logits, targets, V, T)
        want_ent = token_entropy(logits.detach(), V, T)
        (want * gout).sum().backward()
        gh_want, gw_want = h1.grad.clone(), w.grad.clone()
        for chunk in (5, 64):
            h2 = hidden.clone().requires_grad_(True)
            w.grad = None
            got, ent = chunked_logprobs(h2, w, targets, V, T, chunk_tokens=chunk, with_entropy=True)
            (got * gout).sum().backward()
            tag = f"T{T}_c{chunk}"
            res.record("chunked/logprobs", rel(got, want) <= 1e-6, **{f"{tag}_rel": rel(got, want)})
            res.record("chunked/entropy", rel(ent, want_ent) <= 1e-6, **{f"{tag}_rel": rel(ent, want_ent)})
            res.record("chunked/grad_hidden", rel(h2.grad, gh_want) <= 1e-6, **{tag: rel(h2.grad, gh_want)})
            res.record("chunked/grad_weight", rel(w.grad, gw_want) <= 1e-6, **{tag: rel(w.grad, gw_want)})
    w.grad = None


# ---- 2. completion logprobs of every layout == today's full-logits path -----------------------------
def full_logits_logprobs(model, prompt: list[int], comp: list[int], V: int) -> torch.Tensor:
    ids = torch.tensor([prompt + comp])
    logits = forward_logits(model, ids, torch.ones_like(ids, dtype=torch.bool))
    return token_logprobs(logits[:, len(prompt) - 1 : -1], ids[:, len(prompt) :], V)[0]


def check_layouts(res: Results, model, V: int) -> None:
    prompts, comps, _, _ = fixed_batch(V)
    with torch.no_grad():
        want = [full_logits_logprobs(model, p, c, V) for p, c in zip(prompts, comps, strict=True)]
        layouts = {
            "unpacked": build_micro_batches(prompts, comps, MB, PAD, G),
            "packed": build_micro_batches(prompts, comps, MB, PAD, G, pack_sequences=True),
            "budget": build_micro_batches(prompts, comps, MB, PAD, G, pack_sequences=True, max_tokens=21),
        }
        for name, mbs in layouts.items():
            worst = 0.0
            for mb in mbs:
                lp, _ = completion_logprobs(model, mb, V, chunk_tokens=7)
                rows = (
                    mb.rows
                    if isinstance(mb.rows, list)
                    else range(mb.rows.start, mb.rows.start + lp.shape[0])
                )
                for j, i in enumerate(rows):
                    worst = max(worst, float((lp[j, : len(comps[i])] - want[i]).abs().max()))
            res.record(f"layout/{name}_logprobs", worst <= 1e-5, max_abs=worst, micro_batches=len(mbs))
        # Negative control: one segment for the whole packed row (sequences see their neighbours).
        worst = 0.0
        for mb in layouts["packed"]:
            mb.packed.segment_ids = torch.zeros_like(mb.packed.segment_ids)
            lp, _ = completion_logprobs(model, mb, V)
            for j, i in enumerate(mb.rows):
                worst = max(worst, float((lp[j, : len(comps[i])] - want[i]).abs().max()))
        res.record("layout/control_neighbours_visible_differ", worst > 1e-3, max_abs=worst)


# ---- 3. the objective, whatever the batching, == an independent float64 formula -----------------------
def reference_grads(hf, ref_hf, prompts, comps, adv, noise, agg: str, dp: int):
    """float64 HF: the step's objective over all ranks' rows, averaged over DP (Megatron DDP)."""
    hf64, ref64 = hf.double(), ref_hf.double()
    hf64.zero_grad()
    per_tok = []
    for p, c, a, nz in zip(prompts, comps, adv, noise, strict=True):
        ids = torch.tensor([p + c])
        lp = torch.log_softmax(hf64(input_ids=ids).logits[0, len(p) - 1 : -1], -1).gather(
            -1, ids[0, len(p) :, None]
        )[:, 0]
        with torch.no_grad():
            rl = torch.log_softmax(ref64(input_ids=ids).logits[0, len(p) - 1 : -1], -1).gather(
                -1, ids[0, len(p) :, None]
            )[:, 0]
        old = lp.detach() + nz.double()
        r = torch.exp(lp - old)
        a = float(a)
        pg = torch.maximum(-a * r, -a * r.clamp(1 - EPS_LOW, 1 + EPS_HIGH))
        log_r = rl - lp
        kl = torch.exp(log_r) - log_r - 1
        per_tok.append(pg + BETA * kl)
    n = len(comps)
    per_rank = n // dp
    objective = 0.0
    if agg == "token-mean-global":
        objective = sum(t.sum() for t in per_tok) / sum(len(t) for t in per_tok)
    else:
        for r in range(dp):
            rows = list(range(r * per_rank, (r + 1) * per_rank))
            groups = [rows[s : s + MB] for s in range(0, per_rank, MB)]
            for g in groups:
                if agg == "token-mean":
                    val = sum(per_tok[i].sum() for i in g) / sum(len(per_tok[i]) for i in g)
                elif agg == "seq-mean-token-mean":
                    val = sum(per_tok[i].mean() for i in g) / len(g)
                else:  # Dr. GRPO: constant = the logical micro-batch's longest completion
                    L = max(len(comps[i]) for i in g)
                    val = sum(per_tok[i].sum() / L for i in g) / len(g)
                objective = objective + val / len(groups) / dp
    objective.backward()
    grads = {k: p.grad.detach().clone() for k, p in hf64.named_parameters()}
    hf.float(), ref_hf.float()
    return float(objective), grads


def check_objective(res: Results, hf, ref_hf, cfg: QwenConfig) -> None:
    V = cfg.vocab_size
    prompts, comps, adv, noise = fixed_batch(V)
    n, dp = len(comps), dp_size()
    lo, hi = dp_rank() * n // dp, (dp_rank() + 1) * n // dp
    my_p, my_c, my_adv, my_noise = prompts[lo:hi], comps[lo:hi], adv[lo:hi], noise[lo:hi]
    policy = wrap_ddp(megatron_from_hf(hf, cfg))
    ref_model = megatron_from_hf(ref_hf, cfg)
    lengths = [len(p) + len(c) for p, c in zip(my_p, my_c, strict=True)]
    longest = int(all_reduce(torch.tensor([max(lengths)]), torch.distributed.ReduceOp.MAX)[0])
    agree = lambda k: int(all_reduce_dp(torch.tensor([k]), torch.distributed.ReduceOp.MAX)[0])  # noqa: E731
    batchings = {
        "unpacked": dict(),
        "packed": dict(pack_sequences=True),
        "budget_split": dict(pack_sequences=True, max_tokens=longest),
        "budget_merge": dict(pack_sequences=True, max_tokens=10_000),
        # more micro-batches than sequences (as when another DP rank needs more): empty ones run too
        "budget_empty": dict(pack_sequences=True, max_tokens=10_000, agree=lambda k: len(my_c) + 1),
    }
    empty_seen = 0
    worst_same: dict[str, tuple[float, str]] = {}
    for agg in AGGS:
        loss_cfg = LossConfig(
            beta=BETA, kl_clamp=None, clip_eps_low=EPS_LOW, clip_eps_high=EPS_HIGH, loss_agg=agg
        )
        want_obj, want = reference_grads(hf, ref_hf, prompts, comps, adv, noise, agg, dp)
        first = None
        for name, kw in batchings.items():
            mbs = build_micro_batches(my_p, my_c, MB, PAD, G, **{"agree": agree, **kw})
            empty_seen += sum(not mb.completion_mask.shape[0] for mb in mbs)
            counts = all_reduce(torch.tensor([len(mbs)]), torch.distributed.ReduceOp.MAX)
            same_count = int(counts[0]) == len(mbs)
            for mb in mbs:
                rows = (
                    mb.rows
                    if isinstance(mb.rows, list)
                    else list(range(mb.rows.start, mb.rows.start + mb.completion_mask.shape[0]))
                )
                C = mb.completion_mask.shape[1]
                mb.advantages = my_adv[rows]
                with torch.no_grad():
                    if rows:
                        mb.ref_logprobs = completion_logprobs(ref_model, mb, V, chunk_tokens=5)[0]
                        lp = completion_logprobs(policy, mb, V)[0]
                        nz = torch.stack(
                            [torch.nn.functional.pad(my_noise[i], (0, C - len(my_noise[i]))) for i in rows]
                        )
                        mb.old_logprobs = lp + nz
            assign_loss_slices(
                mbs, agg, MB, global_tokens=lambda x: float(all_reduce_dp(torch.tensor([x], dtype=torch.float64))[0]),
                dp=dp,
            )  # fmt: skip
            policy.zero_grad_buffer()
            sums = accumulate_policy_grads(policy, mbs, loss_cfg, V, chunk_tokens=6)
            policy.finish_grad_sync()
            got = gather_hf_state_dict(policy, cfg, grads=True)
            worst, where = 0.0, ""
            for k, g in want.items():
                e = rel(got[k], g)
                if e > worst:
                    worst, where = e, k
            loss = float(all_reduce_dp(torch.tensor([sums["loss"]], dtype=torch.float64))[0]) / dp
            tag = f"{agg}/{name}"
            res.record("objective/grads", worst <= 1e-5 and same_count, **{tag: worst, f"{tag}_at": where})
            # The same step under other physical batchings: the same gradient. Token budgets vs one packed
            # micro-batch per logical one: 1e-6. Unpacked rows vs packed: the left padding shifts RoPE
            # positions (exact in real arithmetic, not in fp32 cos/sin), so 5e-6.
            got = {k: g.clone() for k, g in got.items()}
            if name == "unpacked":
                first = got
                continue
            if name == "packed":
                same, where = max((rel(got[k], first[k]), k) for k in first)
                res.record("objective/grads_unpacked_equal_packed", same <= 5e-6, **{agg: [same, where]})
                first = got
                continue
            same, where = max((rel(got[k], first[k]), k) for k in first)
            worst_same[tag] = (same, where)
            res.record("objective/grads_same_across_batchings", same <= 1e-6, worst=worst_same)
            res.record(
                "objective/loss",
                abs(loss - want_obj) <= 1e-6 * max(1.0, abs(want_obj)),
                **{tag: [loss, want_obj]},
            )
    res.record("objective/empty_micro_batch_ran", empty_seen > 0, empty=empty_seen)


def main() -> None:
    res = Results.start()
    hf = tiny_hf_model("gqa_untied_v300")
    ref_hf = tiny_hf_model("gqa_untied_v300", seed=5)
    cfg = QwenConfig.from_hf_dict(hf.config.to_dict())
    model = megatron_from_hf(hf, cfg)
    res.run("chunked/logprobs", check_chunked, res, model, cfg.vocab_size)
    res.run("layout/unpacked_logprobs", check_layouts, res, model, cfg.vocab_size)
    res.run("objective/grads", check_objective, res, hf, ref_hf, cfg)
    res.finish()


if __name__ == "__main__":
    main()
