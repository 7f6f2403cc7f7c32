"""GRPO training pass and built-in generator vs single-rank HF references (run under torchrun).

- Gradient of the GRPO loss (clipping, k3 KL, token-mean per micro-batch averaged over micro-batches
  and DP) at this TP x DP layout == the single-rank HF gradient on the same global batch, same
  micro-batch partition.
- Built-in generator: greedy == HF generate; sampled tokens' logprobs == trainer logprobs; seeded
  determinism; TP ranks in lock step; top_k=1 == greedy.
"""

from __future__ import annotations

import torch
from common import Results, megatron_from_hf, tiny_hf_model, trainer_logprob_error

from engine.batching.micro_batches import build_micro_batch
from engine.loss import LossConfig, grpo_loss
from engine.rollout.base import SamplingConfig
from engine.rollout.megatron_generator import MegatronGenerator
from engine.trainer import accumulate_policy_grads
from models.qwen.config import QwenConfig
from models.qwen.model import gather_hf_state_dict
from parallel.collectives import gather_tp_shards
from parallel.ddp import wrap_ddp
from parallel.distributed import dp_rank, dp_size

N_PROMPTS, G, MB = 4, 2, 2  # 8 completions, micro-batches of 2 -> 4 global micro-batches
EOS, PAD = 2, 0


def fixed_batch(vocab: int):
    g = torch.Generator().manual_seed(99)
    prompts = [
        torch.randint(3, vocab, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
        for _ in range(N_PROMPTS)
    ]
    rows = [p for p in prompts for _ in range(G)]
    comps = [
        torch.randint(3, vocab, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        for _ in rows
    ]
    comps[1].append(EOS)
    adv = torch.randn(len(rows), generator=g)
    return rows, comps, adv


def hf_completion_logprobs(hf, mb) -> torch.Tensor:
    logits = hf(input_ids=mb.input_ids, attention_mask=mb.attn.long()).logits[:, mb.P - 1 : -1]
    return torch.log_softmax(logits.float(), -1).gather(-1, mb.input_ids[:, mb.P :, None])[..., 0]


def check_grads(res: Results) -> None:
    hf = tiny_hf_model("gqa_untied_v300")
    ref_hf = tiny_hf_model("gqa_untied_v300", seed=5)  # a different "reference policy" for a live KL
    cfg = QwenConfig.from_hf_dict(hf.config.to_dict())
    V = cfg.vocab_size
    loss_cfg = LossConfig(
        beta=0.04, kl_estimator="k3", clip_eps_low=0.2, clip_eps_high=0.28, num_iterations=2
    )
    rows, comps, adv = fixed_batch(V)
    n = len(rows)

    # Single-rank HF reference over the 4 global micro-batches.
    gmbs = [
        build_micro_batch(rows[s : s + MB], comps[s : s + MB], slice(s, s + MB), PAD) for s in range(0, n, MB)
    ]
    noise = torch.Generator().manual_seed(3)
    with torch.no_grad():
        ref_lp = [hf_completion_logprobs(ref_hf, mb) for mb in gmbs]
        old_lp = [
            hf_completion_logprobs(hf, mb) + 0.3 * torch.randn(mb.completion_mask.shape, generator=noise)
            for mb in gmbs
        ]
    hf.zero_grad()
    ref_losses = []
    clip = 0.0
    for i, mb in enumerate(gmbs):
        loss, m = grpo_loss(
            hf_completion_logprobs(hf, mb), old_lp[i], ref_lp[i], adv[mb.rows], mb.completion_mask, loss_cfg
        )
        (loss / len(gmbs)).backward()
        ref_losses.append(float(loss))
        clip += float(m["clip_frac"]) / len(gmbs)

    # Megatron at this layout: this DP rank's contiguous half, same micro-batch partition.
    ddp = wrap_ddp(megatron_from_hf(hf, cfg))
    per = n // dp_size()
    lo = dp_rank() * per
    mine = range(lo // MB, (lo + per) // MB)  # global micro-batch indices of this rank
    lmbs = [
        build_micro_batch(rows[s : s + MB], comps[s : s + MB], slice(s - lo, s - lo + MB), PAD)
        for s in range(lo, lo + per, MB)
    ]
    for mb, i in zip(lmbs, mine, strict=True):
        mb.advantages, mb.ref_logprobs, mb.old_logprobs = adv[lo : lo + per][mb.rows], ref_lp[i], old_lp[i]
    ddp.zero_grad_buffer()
    sums = accumulate_policy_grads(ddp, lmbs, loss_cfg, V)
    ddp.finish_grad_sync()
    grads = gather_hf_state_dict(ddp, cfg, grads=True)
    worst, where = 0.0, ""
    for name, p in hf.named_parameters():
        e = float((grads[name] - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-12))
        if e > worst:
            worst, where = e, name
    res.record("grpo/grads", worst <= 1e-5, worst_rel=worst, worst_tensor=where)
    local_ref = sum(ref_losses[i] for i in mine) / len(mine)
    res.record(
        "grpo/loss",
        abs(sums["loss"] - local_ref) <= 1e-5 * max(1.0, abs(local_ref)),
        got=sums["loss"],
        want=local_ref,
    )
    res.record("grpo/clipping_active", clip > 0.05, clip_frac=clip)


def check_generator(res: Results) -> None:
    hf = tiny_hf_model("gqa_untied_v300")
    cfg = QwenConfig.from_hf_dict(hf.config.to_dict())
    model = megatron_from_hf(hf, cfg)
    gen = MegatronGenerator(model, cfg.vocab_size, [EOS], PAD)
    rows, _, _ = fixed_batch(cfg.vocab_size)
    prompts = rows[::G]

    greedy = gen.generate(prompts, 1, SamplingConfig(temperature=0.0, max_new_tokens=8))
    ok = True
    for p, got in zip(prompts, greedy.completion_ids, strict=True):
        with torch.no_grad():
            want = hf.generate(
                torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=EOS, pad_token_id=PAD
            )
        ok &= got == want[0, len(p) :].tolist()
    res.record("gen/greedy_equals_hf", ok)
    topk1 = gen.generate(prompts, 1, SamplingConfig(temperature=1.0, top_k=1, max_new_tokens=8, seed=1))
    res.record("gen/top_k1_equals_greedy", topk1.completion_ids == greedy.completion_ids)
    tiny_p = gen.generate(prompts, 1, SamplingConfig(temperature=1.0, top_p=1e-6, max_new_tokens=8, seed=1))
    res.record("gen/top_p_tiny_equals_greedy", tiny_p.completion_ids == greedy.completion_ids)
    # n > 1 prefills each prompt once and copies its KV cache to the n rows: greedy rows must equal n=1.
    fan = gen.generate(prompts, 3, SamplingConfig(temperature=0.0, max_new_tokens=8))
    same = fan.completion_ids == [c for c in greedy.completion_ids for _ in range(3)]
    lp_err = max(
        abs(x - y)
        for got, want in zip(fan.logprobs, [lp for lp in greedy.logprobs for _ in range(3)], strict=True)
        for x, y in zip(got, want, strict=True)
    )
    res.record("gen/shared_prefill_equals_single", same and lp_err <= 1e-5, max_abs=lp_err)

    s = SamplingConfig(temperature=0.7, max_new_tokens=8, seed=11)
    a = gen.generate(prompts, 3, s)
    b = gen.generate(prompts, 3, s)
    res.record("gen/seeded_deterministic", a.completion_ids == b.completion_ids and a.logprobs == b.logprobs)
    lengths = torch.tensor([len(c) for c in a.completion_ids] + [0] * (32 - len(a.completion_ids)))
    same_tp = all(torch.equal(t, lengths) for t in gather_tp_shards(lengths))
    res.record("gen/tp_lock_step", same_tp)
    res.record(
        "gen/eos_or_truncated",
        all((c[-1] == EOS) == f for c, f in zip(a.completion_ids, a.finished, strict=True))
        and all(len(c) == 8 for c, f in zip(a.completion_ids, a.finished, strict=True) if not f),
    )
    # Sampling logprobs (temperature-scaled) == the trainer's logprobs at the same temperature.
    worst = trainer_logprob_error(model, cfg.vocab_size, prompts, a, 3, 0.7, PAD)
    res.record("gen/logprobs_match_trainer", worst <= 1e-5, max_abs=worst)


def main() -> None:
    res = Results.start()
    res.run("grpo/grads", check_grads, res)
    res.run("gen/greedy_equals_hf", check_generator, res)
    res.finish()


if __name__ == "__main__":
    main()
