"""Built-in generator under torchrun (TP1 / TP2): continuous batching vs static batching and HF.

- sampler/tp_equals_full_vocab: sampling from vocab-parallel shards (reductions over TP) draws the
  same tokens, with the same logprobs, as sampling from the full vocab (greedy, T=1, top-k, top-p).
- gen/continuous_equals_static: one prompt at a time through n slots (queue, compaction, host reads
  every 3 steps) == all rows at once, token for token; many EOS ids so rows finish at different steps.
- gen/continuous_greedy_equals_hf: greedy under that schedule == HF generate per prompt.
- gen/continuous_logprobs_match_trainer: sampled logprobs == the trainer's ``completion_logprobs``.
- gen/bucketed_steps_equal_eager: the CUDA-graph schedule run uncaptured (``cuda_graphs=True`` on CPU:
  rows padded to buckets, attention spans rounded up, a queue) == eager static batching, token for
  token; several (rows, span) shapes are used and each is "captured" once, then replayed.
- gen/non_finite_names_step: a NaN reached at a known decode step raises, naming that step.
- gen/prompt_longer_than_context: a clear ValueError naming the prompt and the context.
"""

from __future__ import annotations

import torch
from common import Results, megatron_from_hf, tiny_hf_model, trainer_logprob_error

from engine.rollout.base import DecodeConfig, SamplingConfig
from engine.rollout.megatron_generator import MegatronGenerator
from engine.rollout.sampling import VocabShard, sample_next, vocab_shard
from models.qwen.config import QwenConfig
from parallel.collectives import gather_tp_shards

PAD = 0
EOS = list(range(2, 32))  # ~10% of the 300-token vocab: rows stop at different steps


def check_sampler(res: Results) -> None:
    V, padded = 300, 512  # the last shard holds vocab padding at TP2
    g = torch.Generator().manual_seed(4)
    full = torch.randn(16, padded, generator=g) * 2
    shard = vocab_shard(V, padded // torch.distributed.get_world_size())
    local = full[:, shard.start : shard.start + padded // torch.distributed.get_world_size()]
    rows, steps = torch.arange(16), torch.arange(16) % 4
    ok, worst = True, 0.0
    for s in [
        SamplingConfig(temperature=0.0),
        SamplingConfig(temperature=1.0, seed=3),
        SamplingConfig(temperature=0.6, top_k=5, seed=4),
        SamplingConfig(temperature=1.0, top_p=0.5, seed=5),
    ]:
        got = sample_next(local, s, s.seed, rows, steps, shard)
        want = sample_next(full[:, :V], s, s.seed, rows, steps, VocabShard(0, V))
        ok &= torch.equal(got.tokens, want.tokens)
        worst = max(worst, float((got.logprobs - want.logprobs).abs().max()))
    res.record("sampler/tp_equals_full_vocab", ok and worst <= 1e-6, max_abs=worst)


def max_logprob_diff(a, b) -> float:
    """max |logprob| difference between two outputs' common token positions."""
    return max(
        abs(x - y)
        for la, lb in zip(a.logprobs, b.logprobs, strict=True)
        for x, y in zip(la, lb, strict=False)
    )


def check_generator(res: Results) -> None:
    hf = tiny_hf_model("gqa_untied_v300")
    cfg = QwenConfig.from_hf_dict(hf.config.to_dict())
    model = megatron_from_hf(hf, cfg)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(32, 300, (int(L),), generator=g).tolist() for L in (3, 9, 5, 12, 7)]
    n = 3
    static = MegatronGenerator(model, cfg.vocab_size, EOS, PAD)
    queued = MegatronGenerator(model, cfg.vocab_size, EOS, PAD, DecodeConfig(max_batch_rows=n, sync_every=3))
    s = SamplingConfig(temperature=1.0, max_new_tokens=24, seed=21)
    a, b = static.generate(prompts, n, s), queued.generate(prompts, n, s)
    lp_diff = max_logprob_diff(a, b)
    res.record(
        "gen/continuous_equals_static",
        a.completion_ids == b.completion_ids and a.finished == b.finished and lp_diff <= 1e-5,
        max_abs=lp_diff,
    )
    lengths = sorted({len(c) for c in b.completion_ids})
    res.record("gen/rows_finish_at_different_steps", len(lengths) >= 4 and any(b.finished), lengths=lengths)
    err = trainer_logprob_error(model, cfg.vocab_size, prompts, b, n, 1.0, PAD)
    res.record("gen/continuous_logprobs_match_trainer", err <= 1e-5, max_abs=err)
    toks = torch.tensor([t for c in b.completion_ids for t in c] + [len(c) for c in b.completion_ids])
    res.record("gen/continuous_tp_lock_step", all(torch.equal(t, toks) for t in gather_tp_shards(toks)))

    # 8 slots: buckets 1, 2, 4, 8 (so vacated slots get padded back in); a 5-position span bucket; rows leave and prompts queue.
    graphs = DecodeConfig(max_batch_rows=8, sync_every=3, cuda_graphs=True, span_bucket=5)
    c = MegatronGenerator(model, cfg.vocab_size, EOS, PAD, graphs).generate(prompts, n, s)
    lp_diff = max_logprob_diff(a, c)
    shapes, replays = int(c.stats["decode_graphs"]), int(c.stats["decode_graph_replays"])
    res.record(
        "gen/bucketed_steps_equal_eager",
        a.completion_ids == c.completion_ids and a.finished == c.finished and lp_diff <= 1e-5
        and shapes >= 4 and replays > shapes,
        max_abs=lp_diff, shapes=shapes, replays=replays,
    )  # fmt: skip

    greedy = MegatronGenerator(model, cfg.vocab_size, EOS, PAD, DecodeConfig(max_batch_rows=2, sync_every=2))
    out = greedy.generate(prompts, 1, SamplingConfig(temperature=0.0, max_new_tokens=10))
    ok = True
    for p, got in zip(prompts, out.completion_ids, strict=True):
        with torch.no_grad():
            want = hf.generate(
                torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=EOS, pad_token_id=PAD
            )[0, len(p) :].tolist()
        ok &= got == want
    res.record("gen/continuous_greedy_equals_hf", ok)

    # NaN at a known step: the embedding row of the greedy token produced at completion index k (and not
    # before, nor in the prompt) feeds decode step k + 1.
    nan_gen = MegatronGenerator(model, cfg.vocab_size, [], PAD, DecodeConfig(sync_every=4))
    for p0 in prompts:
        clean = nan_gen.generate([p0], 1, SamplingConfig(temperature=0.0, max_new_tokens=10)).completion_ids[
            0
        ]
        k = next((i for i in range(1, len(clean) - 1) if clean[i] not in p0 + clean[:i]), None)
        if k is not None:
            break
    else:
        raise AssertionError("no prompt's greedy completion has a fresh token to poison")
    emb = model.embedding.word_embeddings.weight
    shard = vocab_shard(cfg.vocab_size, emb.shape[0])
    saved = emb.detach().clone()
    if shard.start <= clean[k] < shard.start + emb.shape[0]:
        with torch.no_grad():
            emb[clean[k] - shard.start] = float("nan")
    try:
        nan_gen.generate([p0], 1, SamplingConfig(temperature=0.0, max_new_tokens=10))
        msg = "no error"
    except FloatingPointError as e:
        msg = str(e)
    finally:
        with torch.no_grad():
            emb.copy_(saved)
    res.record("gen/non_finite_names_step", f"decode step {k + 1} " in msg, message=msg, k=k)

    try:
        static.generate([prompts[0], [40] * 250], 1, SamplingConfig(max_new_tokens=10))
        msg = "no error"
    except ValueError as e:
        msg = str(e)
    res.record(
        "gen/prompt_longer_than_context",
        "prompt 1 has 250 tokens" in msg and "context 256" in msg,
        message=msg,
    )


def main() -> None:
    res = Results.start()
    res.run("sampler/tp_equals_full_vocab", check_sampler, res)
    res.run("gen/continuous_equals_static", check_generator, res)
    res.finish()


if __name__ == "__main__":
    main()
