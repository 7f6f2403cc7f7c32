"""The vLLM backend for real on CPU at Megatron TP2 (run under torchrun, 2 ranks, one engine each).

A tiny Qwen2 with head_dim 32 (vLLM's CPU attention needs >= 32), vocab 300 (padded to 512 in
Megatron: the padding must be stripped on the way to vLLM). Checks, in order:
  stale_before_sync        generate before any sync raises (the engine starts with dummy weights)
  sync_v0                  TP2 shards -> HF -> engine, several buckets, versions recorded both sides
  greedy_vs_hf             n greedy completions per prompt, equal to HF greedy; T=1 logprobs vs HF
  sampled_n_per_prompt     n samples per prompt, grouped; distinct across prompts; reproducible
  same_on_tp_ranks         both TP ranks return the whole replica's completions, identical
  logprobs_vs_trainer      vLLM sampling logprobs (T=0.7) vs engine.trainer.completion_logprobs
  eval_sampling_top_p      evaluation's top_p 0.95 without logprobs: not refused, tokens in HF's nucleus
  truncation_refused       top_p < 1 refused (renormalised logprobs), over-long request refused
  sync_after_update        an optimizer-like update of the Megatron shards, synced: vLLM matches the
                           new trainer logprobs and not the old; stale versions raise
  sync_failure             a load failing on one rank raises on both (no hang), leaves no valid
                           weights; the next sync recovers
  sleep_wake_sequence      the PhaseScheduler's sleep/wake/sync calls reach vLLM in order
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from common import Results, megatron_from_hf, tiny_hf_model

import engine.rollout.vllm_generator as vg
from engine.batching.logprobs import completion_logprobs
from engine.batching.micro_batches import build_micro_batch
from engine.phases import Phase, PhaseScheduler, TrainerOffload
from engine.rollout.base import SamplingConfig
from engine.weight_sync import WeightSyncError
from models.qwen.config import QwenConfig
from parallel.distributed import init_distributed

LP_TOL = 1e-5  # fp32, absolute, per token
EOS = 2
PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [200, 201, 202, 203, 204, 205, 206], [42]]


class Recorder:
    """Delegates to the vllm.LLM and records the engine calls whose order matters."""

    RECORDED = ("sleep", "wake_up", "collective_rpc", "reset_prefix_cache", "generate")

    def __init__(self, llm) -> None:
        self._llm = llm
        self.calls: list[str] = []

    def __getattr__(self, name):
        attr = getattr(self._llm, name)
        if name not in self.RECORDED:
            return attr

        def call(*args, **kwargs):
            if name == "sleep":
                self.calls.append(f"sleep(level={kwargs.get('level')})")
            elif name == "wake_up":
                self.calls.append(f"wake_up({kwargs.get('tags')})")
            elif name == "collective_rpc":
                self.calls.append(f"collective_rpc({args[0]})")
            else:
                self.calls.append(name)
            return attr(*args, **kwargs)

        return call


def hf_greedy(hf, prompt: list[int], max_new: int) -> tuple[list[int], list[float]]:
    ids, lps = list(prompt), []
    for _ in range(max_new):
        logits = hf(torch.tensor([ids])).logits[0, -1].float()
        tok = int(logits.argmax())
        lps.append(float(torch.log_softmax(logits, -1)[tok]))
        ids.append(tok)
        if tok == EOS:
            break
    return ids[len(prompt) :], lps


def hf_logprobs(hf, prompts: list[list[int]], completions: list[list[int]], T: float) -> list[list[float]]:
    out = []
    for p, c in zip(prompts, completions, strict=True):
        ids = torch.tensor([p + c])
        logits = hf(ids).logits[0, len(p) - 1 : -1].float() / T
        out.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None])[:, 0].tolist())
    return out


def trainer_logprobs(
    model, prompts, out, V: int, T: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(trainer logprobs, vLLM logprobs, mask), [N, C], for the rollout ``out``."""
    n = len(out.completion_ids)
    mb = build_micro_batch(prompts, out.completion_ids, slice(0, n), pad_id=0)
    lp, _ = completion_logprobs(model, mb, V, T)
    vl = torch.zeros_like(lp)
    for i, row in enumerate(out.logprobs):
        vl[i, : len(row)] = torch.tensor(row)
    return lp, vl, mb.completion_mask


def expect_raise(exc_type, fn, *args, **kwargs) -> str | None:
    """The error message if ``fn`` raised ``exc_type``, else None."""
    try:
        fn(*args, **kwargs)
    except exc_type as e:
        return str(e)
    return None


@torch.no_grad()
def perturb(model, step: float = 2e-2) -> None:
    """One optimizer-like update (sign of a random gradient) of every Megatron shard; replicated
    parameters get the same update on both TP ranks, sharded ones their own."""
    tp_rank = dist.get_rank()  # TP2 x DP1: global rank == TP rank
    for i, (_, p) in enumerate(sorted(model.named_parameters(), key=lambda kv: kv[0])):
        sharded = getattr(p, "tensor_model_parallel", False)
        g = torch.Generator().manual_seed(1000 + i + (97 * tp_rank if sharded else 0))
        p.add_(-step * torch.randn(p.shape, generator=g).sign().to(p.dtype))


def main() -> None:
    res = Results()
    init_distributed(tp=2, seed=1234)
    rank = dist.get_rank()
    hf = tiny_hf_model("gqa_untied_v300", hidden_size=128)  # 4 heads -> head_dim 32
    cfg = QwenConfig.from_hf_dict(hf.config.to_dict())
    V = cfg.vocab_size
    model = megatron_from_hf(hf, cfg)
    model.eval()

    vcfg = vg.VLLMConfig(
        dtype="float32", max_model_len=128, bucket_mb=0.05, enable_sleep_mode=True, sleep_level=2, seed=0
    )
    t0 = time.perf_counter()
    gen = vg.VLLMGenerator(cfg, [EOS], vcfg)
    res.record("build", gen.engine_dtype == torch.float32, build_s=time.perf_counter() - t0)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=12, seed=3)
    sampled = SamplingConfig(temperature=0.7, max_new_tokens=16, seed=11)

    def stale_before_sync():
        msg = expect_raise(vg.StaleWeightsError, gen.generate, PROMPTS, 1, greedy)
        res.record("stale_before_sync", msg is not None, msg=msg)

    def sync_v0():
        gen.sync_weights(model, 0)
        st = gen.stats
        label = gen.llm.llm_engine.get_weight_version()
        res.record(
            "sync_v0",
            gen.weight_version == 0 and label == "0" and st["vllm/sync_buckets"] > 3,
            label=label, **{k: v for k, v in st.items() if k.startswith("vllm/sync")},
        )  # fmt: skip

    def greedy_vs_hf():
        n = 2
        out = gen.generate(PROMPTS, n, greedy)
        ok = len(out.completion_ids) == len(PROMPTS) * n and out.weight_version == 0
        worst, mism = 0.0, []
        for i, p in enumerate(PROMPTS):
            want, want_lp = hf_greedy(hf, p, greedy.max_new_tokens)
            for j in range(n):
                got = out.completion_ids[i * n + j]
                if got != want:
                    mism.append((i, j, got, want))
                else:
                    d = max(abs(a - b) for a, b in zip(out.logprobs[i * n + j], want_lp, strict=True))
                    worst = max(worst, d)
                fin = out.finished[i * n + j]
                ok &= fin == (want[-1] == EOS)
        res.record("greedy_vs_hf", ok and not mism and worst <= LP_TOL, mismatches=mism[:3], lp_max_abs=worst)

    def sampled_n_per_prompt():
        n = 3
        out = gen.generate(PROMPTS, n, SamplingConfig(temperature=1.0, max_new_tokens=16, seed=5))
        again = gen.generate(PROMPTS, n, SamplingConfig(temperature=1.0, max_new_tokens=16, seed=5))
        other = gen.generate(PROMPTS, n, SamplingConfig(temperature=1.0, max_new_tokens=16, seed=6))
        c = out.completion_ids
        groups_ok = len(c) == len(PROMPTS) * n and all(len(x) >= 1 for x in c)
        distinct_in_group = all(
            len({tuple(x) for x in c[i * n : (i + 1) * n]}) > 1 for i in range(len(PROMPTS))
        )
        # The first sample of every prompt must not share the same noise (one seed for all prompts did).
        firsts = [tuple(c[i * n][:8]) for i in range(len(PROMPTS))]
        res.record(
            "sampled_n_per_prompt",
            groups_ok and distinct_in_group and len(set(firsts)) == len(firsts)
            and again.completion_ids == c and other.completion_ids != c
            and all(len(lp) == len(x) for lp, x in zip(out.logprobs, c, strict=True)),
            n=len(c), gen_tokens=out.stats["gen_tokens"],
        )  # fmt: skip
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (out.completion_ids, out.logprobs, out.finished))
        res.record("same_on_tp_ranks", all(p == parts[0] for p in parts))

    def logprobs_vs_trainer(name: str, version: int) -> tuple[float, list[list[int]], object]:
        out = gen.generate(PROMPTS, 3, sampled, weight_version=version)
        prompts = [p for p in PROMPTS for _ in range(3)]
        lp, vl, mask = trainer_logprobs(model, prompts, out, V, sampled.temperature)
        d = (lp - vl).abs()[mask]
        err = float(d.max())
        res.record(
            name, err <= LP_TOL and out.weight_version == version,
            max_abs=err, mean_abs=float(d.mean()), tokens=int(mask.sum()), tol=LP_TOL,
        )  # fmt: skip
        return err, prompts, out

    def eval_sampling_top_p():
        """Evaluation's sampling (T=0.6, top_p=0.95) needs no logprobs: not refused, none returned,
        reproducible, and every token inside HF's 0.95 nucleus at T=0.6."""
        ev = SamplingConfig(temperature=0.6, top_p=0.95, max_new_tokens=12, seed=7, logprobs=False)
        n = 3
        out = gen.generate(PROMPTS, n, ev)
        again = gen.generate(PROMPTS, n, ev)
        outside, tokens = 0, 0
        for i, p in enumerate(PROMPTS):
            for c in out.completion_ids[i * n : (i + 1) * n]:
                probs = torch.softmax(hf(torch.tensor([p + c])).logits[0, len(p) - 1 : -1].double() / 0.6, -1)
                for t, tok in enumerate(c):
                    above = float(probs[t][probs[t] > probs[t, tok]].sum())
                    outside += above >= 0.95 + 1e-6
                    tokens += 1
        res.record(
            "eval_sampling_top_p",
            outside == 0 and tokens > 0 and again.completion_ids == out.completion_ids
            and all(lp == [] for lp in out.logprobs) and "vllm/logprobs_renormalized" not in out.stats,
            tokens=tokens, outside_nucleus=outside,
        )  # fmt: skip

    def truncation_refused():
        m1 = expect_raise(ValueError, gen.generate, PROMPTS, 2, SamplingConfig(temperature=0.7, top_p=0.9))
        m2 = expect_raise(ValueError, gen.generate, PROMPTS, 1, SamplingConfig(max_new_tokens=125))
        res.record("truncation_refused", m1 is not None and m2 is not None, top_p=m1, too_long=m2)

    def sync_after_update():
        perturb(model)
        m_stale = expect_raise(vg.StaleWeightsError, gen.generate, PROMPTS, 1, sampled, weight_version=1)
        gen.sync_weights(model, 1)
        m_old = expect_raise(vg.StaleWeightsError, gen.generate, PROMPTS, 1, sampled, weight_version=0)
        err, prompts, out = logprobs_vs_trainer("sync_after_update/new_logprobs", 1)
        old = hf_logprobs(hf, prompts, out.completion_ids, sampled.temperature)  # the pre-update weights
        d_old = max(
            abs(a - b) for r, o in zip(out.logprobs, old, strict=True) for a, b in zip(r, o, strict=True)
        )
        res.record(
            "sync_after_update",
            m_stale is not None and m_old is not None and gen.weight_version == 1
            and gen.llm.llm_engine.get_weight_version() == "1" and d_old > 1e-2,
            vs_old_max_abs=d_old, vs_new_max_abs=err, sync_s=gen.stats["vllm/sync_s"],
        )  # fmt: skip

    def sync_failure():
        real = vg._engine_load_weights

        def bogus_on_rank1(llm, weights):
            def it():
                for k, (name, t) in enumerate(weights):
                    yield ("model.layers.0.mlp.no_such_proj.weight" if k == 7 else name), t

            return real(llm, it() if rank == 1 else weights)

        vg._engine_load_weights = bogus_on_rank1
        try:
            msg = expect_raise(WeightSyncError, gen.sync_weights, model, 2)
        finally:
            vg._engine_load_weights = real
        m_gen = expect_raise(vg.StaleWeightsError, gen.generate, PROMPTS, 1, sampled)
        # Rank 1 names its own error; rank 0 learns of it through the agreement, with no hang.
        own = msg is not None and ("rank 1:" in msg if rank == 1 else "a TP peer" in msg)
        res.record(
            "sync_failure", own and gen.weight_version is None and m_gen is not None,
            msg=msg, generate_msg=m_gen,
        )  # fmt: skip
        res.run("sync_failure/recovered", gen.sync_weights, model, 2)
        logprobs_vs_trainer("sync_failure/recovered", 2)

    def sleep_wake_sequence():
        rec = Recorder(gen.llm)
        gen.llm = rec
        phases = PhaseScheduler(gen, TrainerOffload(None, None, enabled=False))
        asleep_msg = None
        for step in range(2):  # a step: rollout, sleep at reward, ..., sync v+1 with the split wake
            version = 3 + step
            with phases.phase(Phase.ROLLOUT):
                gen.generate(PROMPTS, 2, sampled)
            with phases.phase(Phase.REWARD):
                asleep_msg = expect_raise(vg.StaleWeightsError, gen.generate, PROMPTS, 1, sampled)
            with phases.phase(Phase.LOGPROBS):
                pass
            with phases.phase(Phase.TRAIN):
                perturb(model, 1e-3)
            with phases.phase(Phase.SYNC):
                phases.sync(model, version)
        with phases.phase(Phase.ROLLOUT):
            logprobs_vs_trainer("sleep_wake_sequence/logprobs_after", 4)
        one_step = [
            "generate", "sleep(level=2)", "wake_up(['weights'])", "collective_rpc(reload_weights)",
            "reset_prefix_cache", "wake_up(['kv_cache'])",
        ]  # fmt: skip
        want = one_step * 2 + ["generate"]
        ok = rec.calls == want and asleep_msg is not None
        # Level 2 drops the weights: waking without a sync must not generate from them.
        gen.sleep()
        gen.wake_up()
        m_discarded = expect_raise(vg.StaleWeightsError, gen.generate, PROMPTS, 1, sampled)
        res.record(
            "sleep_wake_sequence", ok and m_discarded is not None,
            calls=rec.calls, want=want, phase_calls=phases.calls, discarded_msg=m_discarded,
        )  # fmt: skip
        gen.llm = rec._llm

    res.run("stale_before_sync", stale_before_sync)
    res.run("sync_v0", sync_v0)
    res.run("greedy_vs_hf", greedy_vs_hf)
    res.run("sampled_n_per_prompt", sampled_n_per_prompt)
    res.run("logprobs_vs_trainer", logprobs_vs_trainer, "logprobs_vs_trainer", 0)
    res.run("eval_sampling_top_p", eval_sampling_top_p)
    res.run("truncation_refused", truncation_refused)
    res.run("sync_after_update", sync_after_update)
    res.run("sync_failure", sync_failure)
    res.run("sleep_wake_sequence", sleep_wake_sequence)
    gen.close()
    res.finish()


if __name__ == "__main__":
    main()
