"""Shared-prefix (Prefix Grouper) training forward == the unpacked one (run under torchrun).

On a tiny random GQA Qwen2, groups with prompts of different lengths and completions of different
lengths (EOS-terminated short ones included), at this TP layout:
- custom RoPE positions: ``positions = arange(S)`` is bit-identical to the plain forward; other
  positions take effect; the hook is gone after the call;
- per-token logprobs and entropy of the packed micro-batches == the unpacked ones (policy and the
  reference model, as the LOGPROBS phase computes them);
- GRPO loss, metrics and every gradient (gathered over TP) of ``accumulate_policy_grads`` ==;
- negative controls: packed offsets as RoPE positions, or completions that see each other, break
  the logprobs (the comparisons above can fail).
"""

from __future__ import annotations

import torch
from common import Results, megatron_from_hf, tiny_hf_model

import engine.batching.logprobs as trainer_mod  # where the packed forward's layout and mask are used
from engine.batching.logprobs import completion_logprobs
from engine.batching.micro_batches import build_micro_batches
from engine.loss import LossConfig
from engine.trainer import accumulate_policy_grads
from models.qwen.config import QwenConfig
from models.qwen.model import (
    attention_mask,
    forward_logits,
    gather_hf_state_dict,
    rotary_freqs,
    unwrap,
)
from parallel.ddp import wrap_ddp

G, MB = 3, 6  # 4 groups of 3 completions, 2 groups per micro-batch -> 2 micro-batches
EOS, PAD = 2, 0
PROMPT_LENS = [3, 8, 5, 2]
COMP_LENS = [[1, 6, 3], [7, 2, 4], [1, 1, 5], [2, 7, 6]]
EOS_ENDED = {(0, 0), (0, 2), (1, 1), (2, 0), (2, 1), (3, 0)}  # (group, slot): short, EOS-terminated


def fixed_batch(vocab: int):
    g = torch.Generator().manual_seed(7)
    prompts, comps = [], []
    for k, plen in enumerate(PROMPT_LENS):
        p = torch.randint(3, vocab, (plen,), generator=g).tolist()
        for j, clen in enumerate(COMP_LENS[k]):
            c = torch.randint(3, vocab, (clen,), generator=g).tolist()
            if (k, j) in EOS_ENDED:
                c[-1] = EOS
            prompts.append(p)
            comps.append(c)
    adv = torch.randn(len(comps), generator=g)
    return prompts, comps, adv


def masked_max_abs(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float(((a.double() - b.double()).abs() * mask).max())


def check_rope(res: Results, model: torch.nn.Module, V: int) -> None:
    rope = unwrap(model).rotary_pos_emb
    worst = 0
    for interleaved in (False, True):  # both layouts of the halves, with and without interpolation
        for factor in (None, 2.0):
            saved = rope.rotary_interleaved, rope.seq_len_interpolation_factor
            rope.rotary_interleaved, rope.seq_len_interpolation_factor = interleaved, factor
            try:
                same = torch.equal(rotary_freqs(rope, torch.arange(37)), rope.get_emb(37))
            finally:
                rope.rotary_interleaved, rope.seq_len_interpolation_factor = saved
            worst += not same
    res.record("rope/freqs_equal_get_emb", worst == 0, mismatches=worst)

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, V, (3, 11), generator=g)
    pad = torch.ones_like(ids, dtype=torch.bool)
    pad[0, :4] = False  # left padding, as in the unpacked micro-batches
    pad[2, :1] = False
    dev = next(model.parameters()).device  # also runs on one GPU (torchrun --nproc_per_node 1)
    ids, pad = ids.to(dev), pad.to(dev)
    with torch.no_grad():
        plain = forward_logits(model, ids, pad)
        custom = forward_logits(model, ids, attn_mask=attention_mask(pad), positions=torch.arange(11))
        reversed_ = forward_logits(model, ids, pad, positions=torch.arange(11).flip(0))
        after = forward_logits(model, ids, pad)
    res.record("rope/arange_equals_plain", torch.equal(plain, custom))
    diff = float((plain - reversed_).abs().max())
    res.record("rope/positions_take_effect", diff > 1e-3, max_abs=diff)
    res.record("rope/hook_scoped", torch.equal(plain, after) and not rope._forward_hooks)


def check_logprobs(res: Results, models: dict[str, torch.nn.Module], V: int) -> None:
    prompts, comps, _ = fixed_batch(V)
    plain = build_micro_batches(prompts, comps, MB, PAD, G)
    packed = build_micro_batches(prompts, comps, MB, PAD, G, shared_prefix=True)
    same_layout = len(plain) == len(packed) and all(
        a.rows == b.rows and torch.equal(a.completion_mask, b.completion_mask)
        for a, b in zip(plain, packed, strict=False)
    )
    res.record(
        "sp/same_rows_and_mask",
        same_layout and all(b.input_ids.shape[0] == MB // G for b in packed),
        packed_shapes=[list(b.input_ids.shape) for b in packed],
        plain_shapes=[list(a.input_ids.shape) for a in plain],
    )
    with torch.no_grad():
        for name, model in models.items():
            worst_lp = worst_ent = 0.0
            for a, b in zip(plain, packed, strict=True):
                lp_a, ent_a = completion_logprobs(model, a, V, with_entropy=True)
                lp_b, ent_b = completion_logprobs(model, b, V, with_entropy=True)
                m = a.completion_mask
                worst_lp = max(worst_lp, masked_max_abs(lp_a, lp_b, m))
                worst_ent = max(worst_ent, masked_max_abs(ent_a, ent_b, m))
            res.record(f"sp/logprobs_{name}", worst_lp <= 1e-5, max_abs=worst_lp)
            res.record(f"sp/entropy_{name}", worst_ent <= 1e-5, max_abs=worst_ent)

    # Negative controls: each breaks one ingredient of the packed forward; the logprobs must move.
    model = models["policy"]

    def packed_diff() -> float:
        with torch.no_grad():
            return max(
                masked_max_abs(completion_logprobs(model, a, V)[0], completion_logprobs(model, b, V)[0], a.completion_mask)
                for a, b in zip(plain, packed, strict=True)
            )  # fmt: skip

    layout, tree = trainer_mod.shared_prefix_layout, trainer_mod.prefix_tree_segments
    try:
        trainer_mod.shared_prefix_layout = lambda P, G_, C: (
            torch.arange(P + G_ * C),
            *layout(P, G_, C)[1:],
        )
        bad_pos = packed_diff()
        trainer_mod.shared_prefix_layout = layout
        # No branches: one causal sequence per row, so each completion slot sees the slots before it.
        trainer_mod.prefix_tree_segments = lambda pad, segments: (torch.where(pad, 0, -1), None)
        bad_mask = packed_diff()
    finally:
        trainer_mod.shared_prefix_layout, trainer_mod.prefix_tree_segments = layout, tree
    res.record("sp/control_packed_offsets_differ", bad_pos > 1e-3, max_abs=bad_pos)
    res.record("sp/control_slots_see_each_other_differ", bad_mask > 1e-3, max_abs=bad_mask)


def check_grads(res: Results, hf, ref_model: torch.nn.Module, cfg: QwenConfig) -> None:
    V = cfg.vocab_size
    loss_cfg = LossConfig(
        beta=0.04, kl_estimator="k3", clip_eps_low=0.2, clip_eps_high=0.28, num_iterations=2
    )
    prompts, comps, adv = fixed_batch(V)
    ddp = wrap_ddp(megatron_from_hf(hf, cfg))

    def run(shared: bool) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        # What train_step does: micro-batches, ref/old logprobs (LOGPROBS), then the TRAIN pass.
        mbs = build_micro_batches(prompts, comps, MB, PAD, G, shared_prefix=shared)
        noise = torch.Generator().manual_seed(5)
        with torch.no_grad():
            ref_lp = [completion_logprobs(ref_model, mb, V)[0] for mb in mbs]
            old_lp = [
                completion_logprobs(ddp, mb, V)[0]
                + 0.3 * torch.randn(mb.completion_mask.shape, generator=noise)
                for mb in mbs
            ]
        for i, mb in enumerate(mbs):
            mb.advantages, mb.ref_logprobs, mb.old_logprobs = adv[mb.rows], ref_lp[i], old_lp[i]
        ddp.zero_grad_buffer()
        sums = accumulate_policy_grads(ddp, mbs, loss_cfg, V)
        ddp.finish_grad_sync()
        return sums, {k: v.clone() for k, v in gather_hf_state_dict(ddp, cfg, grads=True).items()}

    plain_m, plain_g = run(False)
    packed_m, packed_g = run(True)
    worst, where = 0.0, ""
    for name, want in plain_g.items():
        e = float((packed_g[name] - want).abs().max() / want.abs().max().clamp_min(1e-12))
        if e > worst:
            worst, where = e, name
    nonzero = all(float(g.abs().max()) > 0 for g in plain_g.values())
    res.record("grpo/grads", worst <= 1e-5 and nonzero, worst_rel=worst, worst_tensor=where, nonzero=nonzero)
    rel = abs(packed_m["loss"] - plain_m["loss"]) / max(abs(plain_m["loss"]), 1e-12)
    res.record("grpo/loss", rel <= 1e-6, packed=packed_m["loss"], plain=plain_m["loss"], rel=rel)
    others = {k: abs(packed_m[k] - plain_m[k]) for k in plain_m if k != "loss"}
    res.record("grpo/metrics", max(others.values()) <= 1e-5, **others)
    res.record("grpo/clipping_active", plain_m["clip_frac"] > 0.05, clip_frac=plain_m["clip_frac"])


def main() -> None:
    res = Results.start()
    hf = tiny_hf_model("gqa_untied_v300")
    cfg = QwenConfig.from_hf_dict(hf.config.to_dict())
    policy = megatron_from_hf(hf, cfg)
    ref = megatron_from_hf(tiny_hf_model("gqa_untied_v300", seed=5), cfg)  # a different reference: a live KL
    res.run("rope/arange_equals_plain", check_rope, res, policy, cfg.vocab_size)
    res.run("sp/logprobs_policy", check_logprobs, res, {"policy": policy, "ref": ref}, cfg.vocab_size)
    res.run("grpo/grads", check_grads, res, hf, ref, cfg)
    res.finish()


if __name__ == "__main__":
    main()
