"""Sequence packing, token-budget micro-batches, the logical-batch loss normalisation and chunked
vocab-parallel logprobs (the multi-rank checks run in tests/workers/batching_worker.py at TP1, TP2 and
TP2 x DP2)."""

from __future__ import annotations

import pytest
from conftest import check, per_layout

from engine.batching.micro_batches import (
    balanced_bins,
    build_micro_batches,
    build_packed_sequences,
    first_fit_decreasing,
    score_positions,
    token_budget_bins,
)
from engine.batching.normalisation import assign_loss_slices, fit
from engine.train_config import BatchingConfig

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 2), "tp2dp2": (4, 2)}
CHECKS = [
    "chunked/logprobs",
    "chunked/entropy",
    "chunked/grad_hidden",
    "chunked/grad_weight",
    "layout/unpacked_logprobs",
    "layout/packed_logprobs",
    "layout/budget_logprobs",
    "layout/control_neighbours_visible_differ",
    "objective/grads",
    "objective/grads_same_across_batchings",
    "objective/grads_unpacked_equal_packed",
    "objective/loss",
    "objective/empty_micro_batch_ran",
]


@pytest.fixture(scope="module")
def results(session_tmp):
    return per_layout("batching_worker.py", session_tmp, LAYOUTS)


@pytest.mark.multi_rank
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", CHECKS)
def test_batching_multi_rank(results, layout, name):
    check(results(layout), name)


# ---- token budgets --------------------------------------------------------------------------------
LENGTHS = [4096, 900, 3000, 1200, 2500, 700, 4000, 800, 1500, 3300, 600, 2048]


@pytest.mark.parametrize("budget", [4096, 6000, 9000, 50_000])
def test_budget_bins_cover_fit_and_balance(budget):
    ffd = first_fit_decreasing(LENGTHS, budget)
    bins = token_budget_bins(LENGTHS, budget)
    assert sorted(i for b in bins for i in b) == list(range(len(LENGTHS)))  # every sequence once
    loads = [sum(LENGTHS[i] for i in b) for b in bins]
    assert max(loads) <= budget
    assert len(bins) == len(ffd)  # the fewest bins first-fit-decreasing finds
    assert len(ffd) >= -(-sum(LENGTHS) // budget)  # never below the volume bound
    if len(bins) > 1:  # balanced: no bin exceeds another by more than the longest sequence it holds
        assert max(loads) - min(loads) <= max(LENGTHS)


def test_budget_bins_same_count_on_every_dp_rank():
    """Each rank computes its count, all-reduce MAX (here: the agree callback) -> as many bins each."""
    ranks = [LENGTHS[:6], LENGTHS[6:], [100, 200, 300, 150, 120, 90]]
    need = [len(first_fit_decreasing(r, 5000)) for r in ranks]
    k = max(need)
    assert len(set(need)) > 1  # the ranks really disagree before the reduction
    plans = [token_budget_bins(r, 5000, agree=lambda _k: k) for r in ranks]
    assert [len(p) for p in plans] == [k] * len(ranks)
    for r, p in zip(ranks, plans, strict=True):
        assert sorted(i for b in p for i in b) == list(range(len(r)))
        assert max(sum(r[i] for i in b) for b in p) <= 5000
    # more bins than sequences: the extra ones are empty (the rank still runs them), last
    p = token_budget_bins([5, 6], 100, agree=lambda _k: 4)
    assert p == [[0], [1], [], []]


def test_balanced_bins_fall_back_to_first_fit_when_balancing_breaks_the_budget():
    lengths = [6, 5, 4, 3, 2]  # LPT into 2 bins -> loads 10 / 10 (budget 10) fits; budget 11 too
    assert max(sum(lengths[i] for i in b) for b in balanced_bins(lengths, 2, 10)) <= 10
    lengths = [5, 4, 3, 3, 3]  # LPT: {5, 3, 3}=11 > 10; first-fit-decreasing {5,4}, {3,3,3} fits
    bins = balanced_bins(lengths, 2, 10)
    assert max(sum(lengths[i] for i in b) for b in bins) <= 10


def test_budget_smaller_than_a_sequence_names_the_length_and_the_key():
    with pytest.raises(ValueError) as e:
        token_budget_bins([100, 4096, 300], 4000, "batching.logprob_max_tokens")
    msg = str(e.value)
    assert "4096 tokens" in msg and "batching.logprob_max_tokens=4000" in msg
    prompts, comps = [[1, 2, 3]] * 2, [[4] * 10, [5] * 2]
    with pytest.raises(ValueError, match=r"sequence 0 has 13 tokens .* batching.train_max_tokens=12"):
        build_micro_batches(prompts, comps, 2, 0, 2, pack_sequences=True, max_tokens=12)


def test_config_errors():
    with pytest.raises(ValueError, match=r"batching.logprob_chunk_tokens=0 is invalid"):
        BatchingConfig(logprob_chunk_tokens=0)
    with pytest.raises(ValueError, match=r"batching.logprob_chunk_tokens=-5 is invalid"):
        BatchingConfig(logprob_chunk_tokens=-5)
    with pytest.raises(
        ValueError, match=r"batching.train_max_tokens=4096 needs batching.pack_sequences=true"
    ):
        BatchingConfig(train_max_tokens=4096)
    with pytest.raises(ValueError, match=r"batching.logprob_max_tokens=0 is invalid"):
        BatchingConfig(pack_sequences=True, logprob_max_tokens=0)
    with pytest.raises(ValueError, match=r"cannot be combined"):
        BatchingConfig(pack_sequences=True, shared_prefix=True, micro_batch_size=6)
    cfg = BatchingConfig(pack_sequences=True, train_max_tokens=8192, logprob_max_tokens=16384)
    assert (cfg.train_max_tokens, cfg.logprob_max_tokens, cfg.logprob_chunk_tokens) == (8192, 16384, 512)


# ---- packed layout ----------------------------------------------------------------------------------
def test_packed_layout_positions_segments_and_scored_positions():
    prompts = [[11, 12, 13], [21], [31, 32]]
    comps = [[14, 15], [22, 23, 24], [33]]
    mb = build_packed_sequences(prompts, comps, [4, 7, 9])
    lay = mb.packed
    assert mb.input_ids.tolist() == [[11, 12, 13, 14, 15, 21, 22, 23, 24, 31, 32, 33]]  # no padding
    assert lay.positions.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]  # restart per sequence
    assert lay.segment_ids.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2]]
    assert mb.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]
    sources, targets, slots = score_positions(mb)
    ids = mb.input_ids[0]
    assert ids[targets].tolist() == [14, 15, 22, 23, 24, 33]  # exactly the completion tokens
    assert (sources == targets - 1).all()
    seg = lay.segment_ids[0]
    assert (seg[sources] == seg[targets]).all()  # scored from its own sequence
    # LM-head rows = completion tokens only: the prompt positions before the last never score
    prompt_cols = {0, 1, 9}  # every prompt column except each prompt's last one
    assert not prompt_cols & set(sources.tolist())
    assert slots.tolist() == [0, 1, 3, 4, 5, 6]  # row * C + t in the [3, C=3] grid
    assert mb.rows == [4, 7, 9]


def test_score_positions_of_the_unpacked_layout_pick_the_same_tokens():
    prompts = [[11, 12, 13], [21], [31, 32]]
    comps = [[14, 15], [22, 23, 24], [33]]
    (plain,) = build_micro_batches(prompts, comps, 3, 0, 1)
    (packed,) = build_micro_batches(prompts, comps, 3, 0, 1, pack_sequences=True)
    tok = [mb.input_ids.reshape(-1)[score_positions(mb)[1]].tolist() for mb in (plain, packed)]
    assert tok[0] == tok[1]
    assert score_positions(plain)[2].tolist() == score_positions(packed)[2].tolist()


def test_empty_packed_micro_batch():
    mb = build_packed_sequences([], [], [])
    assert mb.input_ids.shape == (1, 0) and mb.completion_mask.shape == (0, 1)
    assert all(t.numel() == 0 for t in score_positions(mb))


# ---- normalisation ----------------------------------------------------------------------------------
def _token_weights(mbs, agg: str) -> dict[tuple[int, int], float]:
    """Effective weight of each (row, t) token in the summed objective, as accumulate_policy_grads
    applies it: grpo_loss(slice) * loss_weight with the slice's denominators."""
    w = {}
    for mb in mbs:
        cm = mb.completion_mask
        for sl in mb.loss_slices:
            mask = fit(cm, sl.rows, sl.width, sl.whole)
            rows = [mb.rows[j] if isinstance(mb.rows, list) else mb.rows.start + j for j in sl.rows]
            seq_n = int((mask.sum(1) > 0).sum())
            for k, r in enumerate(rows):
                n_tok = int(mask[k].sum())
                for t in range(n_tok):
                    if agg in ("token-mean", "token-mean-global"):
                        v = 1.0 / sl.loss_scale_tokens
                    elif agg == "seq-mean-token-mean":
                        v = 1.0 / n_tok / seq_n
                    else:
                        v = 1.0 / sl.width / seq_n
                    w[(r, t)] = v * sl.loss_weight
    return w


@pytest.mark.parametrize(
    "agg", ["token-mean", "token-mean-global", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
)
@pytest.mark.parametrize("budget", [None, 9, 14, 1000])
def test_token_weights_follow_the_logical_micro_batches(agg, budget):
    """Whatever the physical bins, token (i, t) weighs what the logical definition says (float64)."""
    lens = [3, 1, 5, 2, 4, 2, 6]  # completion lengths; logical micro-batches of 3: {0,1,2} {3,4,5} {6}
    prompts = [[7, 7]] * len(lens)
    comps = [[9] * n for n in lens]
    mbs = build_micro_batches(prompts, comps, 3, 0, 1, pack_sequences=True, max_tokens=budget)
    for mb in mbs:  # row 4 is masked out of the loss (e.g. a truncated completion)
        if 4 in mb.rows:
            mb.completion_mask[mb.rows.index(4)] = False
    assign_loss_slices(mbs, agg, logical_size=3, global_tokens=lambda x: x, dp=1)
    got = _token_weights(mbs, agg)
    masks = {}
    for mb in mbs:
        for j, r in enumerate(mb.rows):
            masks[r] = mb.completion_mask[j]
    groups = [[0, 1, 2], [3, 4, 5], [6]]
    total = sum(int(masks[i].sum()) for i in range(len(lens)))
    want = {}
    for g in groups:
        n_tok = sum(int(masks[i].sum()) for i in g)
        live = [i for i in g if masks[i].any()]
        width = max(lens[i] for i in g)
        for i in g:
            for t in range(int(masks[i].sum())):
                if agg == "token-mean":
                    want[(i, t)] = 1.0 / n_tok / len(groups)
                elif agg == "token-mean-global":
                    want[(i, t)] = 1.0 / total
                elif agg == "seq-mean-token-mean":
                    want[(i, t)] = 1.0 / int(masks[i].sum()) / len(live) / len(groups)
                else:
                    want[(i, t)] = 1.0 / width / len(live) / len(groups)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-12), k


def test_global_token_mean_scales_by_dp():
    """token-mean-global: every rank divides by the DP total / dp (Megatron DDP averages over DP)."""
    mbs = build_micro_batches([[1]] * 4, [[2] * 3] * 4, 2, 0, 1, pack_sequences=True)
    assign_loss_slices(mbs, "token-mean-global", 2, global_tokens=lambda x: 3 * x, dp=3)
    assert all(
        sl.loss_scale_tokens == pytest.approx(12.0) and sl.loss_weight == 1.0
        for mb in mbs
        for sl in mb.loss_slices
    )
