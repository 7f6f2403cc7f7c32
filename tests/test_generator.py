"""Built-in generator: the sampler against exact softmax references, and (torchrun, TP1 / TP2) continuous
batching against static batching and HF generate, the TP-sharded sampler against the full-vocab one,
non-finite logits and prompt-length errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import check, per_layout

from engine.rollout.base import SamplingConfig
from engine.rollout.sampling import CDF_BLOCK, sample_next, uniforms

V = 2 * CDF_BLOCK + 188  # two full CDF blocks and a partial one


def draw(logits: torch.Tensor, sampling: SamplingConfig, draws: int, seed: int = 0) -> torch.Tensor:
    """``draws`` samples from the one row ``logits`` [V] (each draw its own output row)."""
    out = []
    for lo in range(0, draws, 8192):
        rows = torch.arange(lo, min(lo + 8192, draws))
        d = sample_next(logits.expand(len(rows), -1), sampling, seed, rows, torch.zeros_like(rows))
        out.append(d.tokens)
    return torch.cat(out)


def chi_square_ok(tokens: torch.Tensor, probs: torch.Tensor) -> tuple[bool, float, float]:
    """Pearson chi-square of token counts vs ``probs`` (float64) within 6 sigma of its df."""
    support = probs > 0
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    if counts[~support].sum() > 0:
        return False, math.inf, 0.0
    exp = probs[support] * len(tokens)
    chi2 = float(((counts[support] - exp) ** 2 / exp).sum())
    df = int(support.sum()) - 1
    return chi2 <= df + 6 * math.sqrt(2 * df), chi2, df


@pytest.fixture(scope="module")
def logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(V, generator=g) * 1.5


def test_sampling_frequencies_match_softmax(logits):
    s = SamplingConfig(temperature=0.8, seed=1)
    tokens = draw(logits, s, 400_000)
    ok, chi2, df = chi_square_ok(tokens, torch.softmax(logits.double() / 0.8, -1))
    assert ok, f"chi2 {chi2:.0f} for df {df}"


def test_top_k_support_and_frequencies(logits):
    s = SamplingConfig(temperature=1.0, top_k=7, seed=2)
    tokens = draw(logits, s, 100_000)
    top = logits.topk(7).indices
    probs = torch.zeros(V, dtype=torch.float64)
    probs[top] = torch.softmax(logits[top].double(), -1)
    ok, chi2, df = chi_square_ok(tokens, probs)
    assert ok, f"top-k: chi2 {chi2:.1f} for df {df} (or a token outside the top 7)"


def test_top_p_support_and_frequencies(logits):
    s = SamplingConfig(temperature=1.0, top_p=0.3, seed=3)
    tokens = draw(logits, s, 100_000)
    p = torch.softmax(logits.double(), -1)
    srt, idx = p.sort(descending=True)
    keep = idx[(srt.cumsum(0) - srt) <= 0.3]  # the smallest prefix reaching 0.3
    probs = torch.zeros(V, dtype=torch.float64)
    probs[keep] = p[keep] / p[keep].sum()
    ok, chi2, df = chi_square_ok(tokens, probs)
    assert ok, f"top-p: chi2 {chi2:.1f} for df {df} (or a token outside the nucleus of {len(keep)})"


def test_logprobs_and_greedy_exact():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, V, generator=g) * 3
    rows = torch.arange(6)
    for t in (0.7, 1.0):
        d = sample_next(x, SamplingConfig(temperature=t), 5, rows, rows)
        want = torch.log_softmax(x.double() / t, -1).gather(1, d.tokens[:, None])[:, 0]
        assert (d.logprobs.double() - want).abs().max() <= 1e-6
    d = sample_next(x, SamplingConfig(temperature=0.0), 5, rows, rows)
    assert torch.equal(d.tokens, x.argmax(-1))
    want = torch.log_softmax(x.double(), -1).max(-1).values  # greedy reports the T=1 logprob
    assert (d.logprobs.double() - want).abs().max() <= 1e-6


def test_draws_depend_on_seed_row_and_step_only():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, V, generator=g)
    rows, steps = torch.arange(12) * 5, torch.arange(12) % 3
    s = SamplingConfig(temperature=1.0)
    full = sample_next(x, s, 9, rows, steps).tokens
    part = sample_next(x[[3, 7]], s, 9, rows[[3, 7]], steps[[3, 7]]).tokens
    assert torch.equal(full[[3, 7]], part)
    other = sample_next(x, s, 10, rows, steps).tokens
    assert not torch.equal(full, other)
    u = uniforms(9, torch.arange(100_000), torch.zeros(100_000, dtype=torch.long))
    assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.005


def test_non_finite_rows_flagged_and_neg_inf_never_drawn():
    x = torch.zeros(4, V)
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    x[3, : V - 1] = float("-inf")  # only the last token is possible
    rows = torch.arange(4)
    d = sample_next(x, SamplingConfig(temperature=1.0), 0, rows, rows)
    assert d.finite.tolist() == [True, False, False, True]
    assert int(d.tokens[3]) == V - 1 and abs(float(d.logprobs[3])) < 1e-6


LAYOUTS = {"tp1": (1, 1), "tp2": (2, 2)}
WORKER_CHECKS = [
    "sampler/tp_equals_full_vocab",
    "gen/continuous_equals_static",
    "gen/continuous_greedy_equals_hf",
    "gen/continuous_logprobs_match_trainer",
    "gen/bucketed_steps_equal_eager",
    "gen/continuous_tp_lock_step",
    "gen/rows_finish_at_different_steps",
    "gen/non_finite_names_step",
    "gen/prompt_longer_than_context",
]


@pytest.fixture(scope="module")
def results(session_tmp):
    return per_layout("generator_worker.py", session_tmp, LAYOUTS)


@pytest.mark.multi_rank
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", WORKER_CHECKS)
def test_generator_worker(results, layout, name):
    check(results(layout), name)
