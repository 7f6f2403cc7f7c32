"""Tests for engine.advantages and engine.loss against independent float64 references.

The references below are written token by token in plain Python / numpy (float64)
with hand-derived gradients; they never call engine code.
"""

from __future__ import annotations

import dataclasses
import math
import statistics

import numpy as np
import pytest
import torch

from engine.advantages import group_advantages
from engine.loss import LossConfig, grpo_loss, masked_mean
from engine.train_config import AdvantageConfig

TOL = 1e-6

# ---------------------------------------------------------------------------
# Independent float64 references
# ---------------------------------------------------------------------------


def ref_advantages(rewards, G, scale_by_std=True, baseline="mean", eps=1e-4):
    rewards = [float(x) for x in rewards]
    out = []
    for start in range(0, len(rewards), G):
        grp = rewards[start : start + G]
        if G == 1 or max(grp) == min(grp):
            out.extend([0.0] * G)
            continue
        mean = sum(grp) / G
        std = statistics.stdev(grp)  # unbiased (n - 1)
        for i, r in enumerate(grp):
            if baseline == "mean":
                a = r - mean
            else:
                others = grp[:i] + grp[i + 1 :]
                a = r - sum(others) / len(others)
            if scale_by_std:
                a = a / (std + eps)
            out.append(a)
    return np.array(out, dtype=np.float64)


def ref_grpo(logp, old, ref, rollout, adv, mask, cfg):
    """Return (loss, dloss/dlogp [B, T], metrics) computed token by token."""
    logp = np.asarray(logp, dtype=np.float64)
    B, T = logp.shape
    old = logp if old is None else np.asarray(old, dtype=np.float64)
    lo, hi = 1.0 - cfg["clip_eps_low"], 1.0 + cfg["clip_eps_high"]
    beta, est, clamp = cfg["beta"], cfg["kl_estimator"], cfg["kl_clamp"]
    c_dual, cap, agg = cfg["dual_clip_c"], cfg["tis_cap"], cfg["loss_agg"]

    tok_val = np.zeros((B, T))
    tok_pg = np.zeros((B, T))
    tok_grad = np.zeros((B, T))
    n_valid = 0
    kl_sum = clip_n = dual_n = ratio_sum = tis_sum = 0.0
    for b in range(B):
        A = float(adv[b])
        for t in range(T):
            if not mask[b][t]:
                continue
            n_valid += 1
            r = math.exp(logp[b, t] - old[b, t])
            ratio_sum += r
            rc = min(max(r, lo), hi)
            unclipped, clipped = -A * r, -A * rc
            if clipped > unclipped:
                val, d = clipped, 0.0
                clip_n += 1
            else:
                val, d = unclipped, -A * r
            if c_dual is not None and A < 0 and val > -A * c_dual:
                val, d = -A * c_dual, 0.0
                dual_n += 1
            if cap is not None:
                w = min(math.exp(old[b, t] - rollout[b, t]), cap)
                tis_sum += w
                val, d = val * w, d * w
            tok_pg[b, t] = val
            k = dk = 0.0
            if ref is not None:
                lr, dlr = ref[b][t] - logp[b, t], -1.0
                if clamp is not None and abs(lr) > clamp:
                    lr, dlr = math.copysign(clamp, lr), 0.0
                if est == "k1":
                    k, dk = -lr, -dlr
                elif est == "k2":
                    k, dk = 0.5 * lr * lr, lr * dlr
                else:
                    k, dk = math.exp(lr) - lr - 1.0, (math.exp(lr) - 1.0) * dlr
                    if clamp is not None and k > 10.0:
                        k, dk = 10.0, 0.0
                kl_sum += k
                if cfg.get("kl_bias_correction"):  # k * r, d(k * r) = dk * r + k * r
                    k, dk = k * r, dk * r + k * r
            tok_val[b, t] = val + beta * k
            tok_grad[b, t] = d + beta * dk

    # Aggregation weight of each valid token.
    weight = np.zeros((B, T))
    lengths = [sum(1 for t in range(T) if mask[b][t]) for b in range(B)]
    n_seq = B if cfg.get("seq_mean_denominator") == "all" else sum(1 for n in lengths if n > 0)
    for b in range(B):
        for t in range(T):
            if not mask[b][t]:
                continue
            if agg == "token-mean":
                denom = cfg.get("loss_scale_tokens") or n_valid
                weight[b, t] = 1.0 / denom
            elif agg == "seq-mean-token-mean":
                weight[b, t] = 1.0 / (lengths[b] * n_seq)
            else:
                L = cfg["norm_length"] if cfg["norm_length"] is not None else T
                weight[b, t] = 1.0 / (L * n_seq)
    nv = max(n_valid, 1)
    metrics = {
        "kl": kl_sum / nv,
        "clip_frac": clip_n / nv,
        "dual_clip_frac": dual_n / nv,
        "ratio_mean": ratio_sum / nv if n_valid else 0.0,
        "pg_loss": float((tok_pg * weight).sum()),
    }
    if cap is not None:
        metrics["tis_weight_mean"] = tis_sum / nv
    return float((tok_val * weight).sum()), tok_grad * weight, metrics


def cfg_dict(cfg: LossConfig, **extra):
    d = dict(cfg.__dict__)
    d.update(extra)
    return d


# ---------------------------------------------------------------------------
# Random inputs
# ---------------------------------------------------------------------------

B, T = 6, 9
LENGTHS = [9, 5, 0, 1, 7, 3]  # row 2 is all padding


def make_inputs(seed=0, old_spread=0.4, ref_spread=0.5, rollout_spread=0.6):
    g = np.random.default_rng(seed)
    mask = np.zeros((B, T), dtype=bool)
    for b, n in enumerate(LENGTHS):
        mask[b, :n] = True
    logp = -np.abs(g.normal(1.0, 0.8, (B, T)))
    old = logp + g.normal(0.0, old_spread, (B, T))
    ref = logp + g.normal(0.0, ref_spread, (B, T))
    rollout = old + g.normal(0.0, rollout_spread, (B, T))
    adv = g.normal(0.0, 1.0, B)
    adv[1] = -abs(adv[1]) - 0.5  # ensure both signs
    adv[0] = abs(adv[0]) + 0.5
    # Garbage at padded positions must never leak into loss or gradient.
    logp[~mask] = -1e4
    old[~mask] = np.nan
    ref[~mask] = np.inf
    rollout[~mask] = np.nan
    return {
        "logp": logp,
        "old": old,
        "ref": ref,
        "rollout": rollout,
        "adv": adv,
        "mask": mask,
    }


def run_engine(inp, cfg, *, use_old=True, use_ref=True, use_rollout=False, **kw):
    logp = torch.tensor(inp["logp"], dtype=torch.float64, requires_grad=True)

    def t(x):
        return torch.tensor(x, dtype=torch.float64)

    loss, metrics = grpo_loss(
        logp,
        t(inp["old"]) if use_old else None,
        t(inp["ref"]) if use_ref else None,
        t(inp["adv"]),
        torch.tensor(inp["mask"]),
        cfg,
        rollout_logprobs=t(inp["rollout"]) if use_rollout else None,
        **kw,
    )
    loss.backward()
    return loss, logp.grad, metrics


def check_against_ref(inp, cfg, *, use_old=True, use_ref=True, use_rollout=False, **kw):
    loss, grad, metrics = run_engine(
        inp, cfg, use_old=use_old, use_ref=use_ref, use_rollout=use_rollout, **kw
    )
    r_loss, r_grad, r_metrics = ref_grpo(
        inp["logp"],
        inp["old"] if use_old else None,
        inp["ref"] if use_ref else None,
        inp["rollout"] if use_rollout else None,
        inp["adv"],
        inp["mask"],
        cfg_dict(cfg, **kw),
    )
    assert torch.isfinite(loss)
    assert torch.isfinite(grad).all()
    assert loss.item() == pytest.approx(r_loss, abs=TOL, rel=TOL)
    np.testing.assert_allclose(grad.numpy(), r_grad, atol=TOL, rtol=TOL)
    assert (grad.numpy()[~inp["mask"]] == 0).all()
    for k, v in r_metrics.items():
        if k == "kl" and not use_ref:
            continue
        assert metrics[k].item() == pytest.approx(v, abs=TOL, rel=TOL), k
        assert not metrics[k].requires_grad
    return loss, grad, metrics


# ---------------------------------------------------------------------------
# Loss tests
# ---------------------------------------------------------------------------


def test_reference_gradient_matches_finite_differences():
    """Sanity-check the hand-derived reference gradient itself."""
    inp = make_inputs(seed=7)
    cfg = cfg_dict(LossConfig(beta=0.3, kl_estimator="k3", dual_clip_c=2.0, tis_cap=1.5))
    _, grad, _ = ref_grpo(
        inp["logp"],
        inp["old"],
        inp["ref"],
        inp["rollout"],
        inp["adv"],
        inp["mask"],
        cfg,
    )
    h = 1e-6
    for b, t in zip(*np.nonzero(inp["mask"]), strict=False):
        plus, minus = inp["logp"].copy(), inp["logp"].copy()
        plus[b, t] += h
        minus[b, t] -= h
        args = (inp["old"], inp["ref"], inp["rollout"], inp["adv"], inp["mask"], cfg)
        fd = (ref_grpo(plus, *args)[0] - ref_grpo(minus, *args)[0]) / (2 * h)
        assert fd == pytest.approx(grad[b, t], abs=1e-6)


@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_matches_reference_estimators_and_aggregations(kl_estimator, loss_agg):
    inp = make_inputs(seed=1)
    cfg = LossConfig(beta=0.2, kl_estimator=kl_estimator, loss_agg=loss_agg)
    _, _, metrics = check_against_ref(inp, cfg)
    assert metrics["clip_frac"] > 0
    assert metrics["kl"] != 0


@pytest.mark.parametrize("norm_length", [None, 16])
def test_seq_mean_token_sum_norm_length(norm_length):
    inp = make_inputs(seed=2)
    cfg = LossConfig(loss_agg="seq-mean-token-sum-norm", norm_length=norm_length)
    check_against_ref(inp, cfg)


def test_asymmetric_clip_active_both_sides():
    inp = make_inputs(seed=3, old_spread=0.6)
    cfg = LossConfig(beta=0.05, clip_eps_low=0.1, clip_eps_high=0.4)
    _, _, metrics = check_against_ref(inp, cfg)
    assert metrics["clip_frac"] > 0
    # Both branches of the clip must actually have fired on this data.
    ratio = np.exp(inp["logp"] - inp["old"])
    sign = np.sign(inp["adv"])[:, None]
    m = inp["mask"]
    assert ((ratio > 1.4) & (sign > 0) & m).any()
    assert ((ratio < 0.9) & (sign < 0) & m).any()
    # Asymmetry matters: the symmetric loss differs.
    sym, _, _ = run_engine(inp, LossConfig(beta=0.05, clip_eps_low=0.1, clip_eps_high=0.1))
    asym, _, _ = run_engine(inp, cfg)
    assert abs(sym.item() - asym.item()) > 1e-6


def test_dual_clip_active():
    inp = make_inputs(seed=4, old_spread=1.2)
    cfg = LossConfig(beta=0.04, dual_clip_c=1.5)
    _, _, metrics = check_against_ref(inp, cfg)
    assert metrics["dual_clip_frac"] > 0
    no_dual, _, _ = run_engine(inp, LossConfig(beta=0.04))
    with_dual, _, _ = run_engine(inp, cfg)
    assert with_dual.item() < no_dual.item()


def test_tis_active():
    inp = make_inputs(seed=5, rollout_spread=0.8)
    cfg = LossConfig(beta=0.04, tis_cap=1.3)
    _, _, metrics = check_against_ref(inp, cfg, use_rollout=True)
    w = np.exp(inp["old"] - inp["rollout"])[inp["mask"]]
    assert (w > 1.3).any() and (w < 1.0).any()
    assert "tis_weight_mean" in metrics
    assert metrics["tis_weight_mean"] <= 1.3


def test_tis_with_dual_clip_and_seq_mean():
    inp = make_inputs(seed=6, old_spread=1.0)
    cfg = LossConfig(
        beta=0.1,
        kl_estimator="k2",
        dual_clip_c=2.0,
        tis_cap=2.0,
        clip_eps_high=0.28,
        loss_agg="seq-mean-token-mean",
    )
    check_against_ref(inp, cfg, use_rollout=True)


def test_beta_zero_without_reference():
    inp = make_inputs(seed=8)
    cfg = LossConfig(beta=0.0)
    _, _, metrics = check_against_ref(inp, cfg, use_ref=False)
    assert metrics["kl"].item() == 0.0
    assert "tis_weight_mean" not in metrics


@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("kl_clamp", [20.0, 2.0, None])
def test_kl_clamps(kl_estimator, kl_clamp):
    inp = make_inputs(seed=9)
    m = inp["mask"]
    inp["ref"][m] = inp["logp"][m] + np.resize([25.0, -25.0, 3.0, -3.0, 0.5, -0.1], m.sum())
    cfg = LossConfig(beta=0.5, kl_estimator=kl_estimator, kl_clamp=kl_clamp)
    check_against_ref(inp, cfg)


@pytest.mark.parametrize("exp", [1, 2, 3])
@pytest.mark.parametrize("log_r, k3, grad", [(3.0, 16.09, -19.1), (5.0, 142.4, -147.4)])
def test_open_rs_configs_give_trls_unclamped_k3(exp, log_r, k3, grad):
    """TRL 69ad852e has no clamp: k3 at log(pi_ref / pi) = 3 / 5 is 16.09 / 142.4 with d/dlogp -19.1 / -147.4;
    the open-rs configs resolve to that (a clamp at 20 gives 10 and gradient 0)."""
    from pathlib import Path

    from engine.config import load_config
    from engine.train_config import TrainConfig

    cfg = load_config(
        TrainConfig, Path(__file__).resolve().parents[1] / f"configs/open_rs_exp{exp}.yaml"
    ).loss
    assert cfg.kl_clamp is None and cfg.kl_bias_correction is False
    exact_k3, exact_grad = math.exp(log_r) - log_r - 1.0, -(math.exp(log_r) - 1.0)  # float64 reference
    assert (exact_k3, exact_grad) == (pytest.approx(k3, abs=0.02), pytest.approx(grad, abs=0.05))
    logp = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
    ref = torch.full((1, 1), log_r, dtype=torch.float64)
    loss, metrics = grpo_loss(logp, None, ref, torch.zeros(1, dtype=torch.float64), torch.ones(1, 1), cfg)
    loss.backward()
    assert metrics["kl"].item() == pytest.approx(exact_k3, rel=1e-12)
    assert loss.item() == pytest.approx(cfg.beta * exact_k3, rel=1e-12)
    assert logp.grad.item() == pytest.approx(cfg.beta * exact_grad, rel=1e-12)
    clamped = LossConfig(beta=cfg.beta, kl_clamp=20.0)
    logp.grad = None
    grpo_loss(logp, None, ref, torch.zeros(1, dtype=torch.float64), torch.ones(1, 1), clamped)[0].backward()
    assert logp.grad.item() == 0.0  # the clamp the open-rs configs must not have


@pytest.mark.parametrize("use_old", [False, True])
@pytest.mark.parametrize("kl_estimator, kl_clamp", [("k3", None), ("k3", 20.0), ("k1", None), ("k2", 2.0)])
def test_kl_bias_correction(use_old, kl_estimator, kl_clamp):
    """TRL 1.16 use_bias_correction_kl: KL_t x r_t (with grad) against the float64 formula."""
    inp = make_inputs(seed=12)
    cfg = LossConfig(beta=0.3, kl_estimator=kl_estimator, kl_clamp=kl_clamp, kl_bias_correction=True)
    loss, grad, _ = check_against_ref(inp, cfg, use_old=use_old)
    plain_loss, plain_grad, _ = run_engine(
        inp, dataclasses.replace(cfg, kl_bias_correction=False), use_old=use_old
    )
    if not use_old:  # on-policy r = exp(logp - logp.detach()): same value, gradient + beta * KL_t * w_t
        assert loss.item() == pytest.approx(plain_loss.item(), rel=1e-12, abs=1e-12)
        m = inp["mask"]
        logp = np.where(m, inp["logp"], 0.0)
        ref = np.where(m, inp["ref"], 0.0)
        log_r = ref - logp
        if kl_clamp is not None:
            log_r = np.clip(log_r, -kl_clamp, kl_clamp)
        k = {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": np.exp(log_r) - log_r - 1.0}[kl_estimator]
        if kl_clamp is not None and kl_estimator == "k3":
            k = np.minimum(k, 10.0)
        w = np.where(m, 1.0 / m.sum(), 0.0)  # token-mean weight
        np.testing.assert_allclose((grad - plain_grad).numpy(), 0.3 * k * w, atol=1e-12)
    else:
        assert loss.item() != pytest.approx(plain_loss.item())


@pytest.mark.parametrize("loss_agg", ["seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("denominator", ["nonempty", "all"])
def test_seq_mean_denominator(loss_agg, denominator):
    """Rows masked out entirely (mask_truncated_completions): "nonempty" leaves them out of the sequence mean,
    "all" (TRL 1.16 loss_type grpo / dr_grpo) counts them as 0."""
    inp = make_inputs(seed=13)
    inp["mask"][4] = False  # a truncated completion masked out, beside the all-padding row 2
    cfg = LossConfig(beta=0.1, loss_agg=loss_agg, seq_mean_denominator=denominator)
    loss, grad, _ = check_against_ref(inp, cfg)
    other, other_grad, _ = run_engine(
        inp, dataclasses.replace(cfg, seq_mean_denominator="all" if denominator == "nonempty" else "nonempty")
    )
    nonempty = int(inp["mask"].any(1).sum())  # 4 of B = 6 rows
    scale = B / nonempty if denominator == "nonempty" else nonempty / B
    assert loss.item() == pytest.approx(other.item() * scale, rel=1e-12)
    np.testing.assert_allclose(grad.numpy(), other_grad.numpy() * scale, rtol=1e-12, atol=1e-15)


def test_on_policy_plain_policy_gradient():
    inp = make_inputs(seed=10)
    cfg = LossConfig(beta=0.0)
    loss, grad, metrics = run_engine(inp, cfg, use_old=False, use_ref=False)
    m = inp["mask"]
    assert metrics["ratio_mean"].item() == 1.0
    assert metrics["clip_frac"].item() == 0.0
    # token-mean: d loss / d logp_{b,t} = -A_b / (total valid tokens)
    expected = np.where(m, -inp["adv"][:, None] / m.sum(), 0.0)
    np.testing.assert_allclose(grad.numpy(), expected, atol=1e-12)
    assert loss.item() == pytest.approx(-(inp["adv"] * m.sum(1)).sum() / m.sum(), abs=1e-12)
    # With KL: matches the reference with old = logp.
    check_against_ref(inp, LossConfig(beta=0.04), use_old=False)


def test_on_policy_equals_old_equal_to_logp():
    inp = make_inputs(seed=11)
    inp["old"] = inp["logp"].copy()
    cfg = LossConfig(beta=0.04)
    l1, g1, _ = run_engine(inp, cfg, use_old=False)
    l2, g2, _ = run_engine(inp, cfg, use_old=True)
    assert l1.item() == pytest.approx(l2.item(), abs=1e-12)
    torch.testing.assert_close(g1, g2, atol=1e-12, rtol=0)


def test_loss_scale_tokens_global_normalisation():
    inp = make_inputs(seed=12)
    cfg = LossConfig(beta=0.04)
    check_against_ref(inp, cfg, loss_scale_tokens=100)
    # Two micro-batches normalised by the global count sum to the full token mean.
    total = int(inp["mask"].sum())
    full, full_grad, _ = run_engine(inp, cfg)
    parts, grads = [], []
    for rows in (slice(0, 3), slice(3, 6)):
        sub = {k: v[rows] for k, v in inp.items()}
        loss, grad, _ = run_engine(sub, cfg, loss_scale_tokens=torch.tensor(float(total)))
        parts.append(loss.item())
        grads.append(grad)
    assert sum(parts) == pytest.approx(full.item(), abs=1e-12)
    torch.testing.assert_close(torch.cat(grads), full_grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_all_masked_batch_gives_zero_not_nan(loss_agg):
    inp = make_inputs(seed=13)
    inp["mask"][:] = False
    cfg = LossConfig(loss_agg=loss_agg, tis_cap=2.0, dual_clip_c=3.0)
    loss, grad, metrics = run_engine(inp, cfg, use_rollout=True)
    assert loss.item() == 0.0
    assert (grad == 0).all()
    for v in metrics.values():
        assert torch.isfinite(v)


def test_padding_garbage_and_float_mask():
    inp = make_inputs(seed=14)
    cfg = LossConfig(beta=0.04)
    l_bool, g_bool, _ = run_engine(inp, cfg)
    logp = torch.tensor(inp["logp"], requires_grad=True)
    loss, _ = grpo_loss(
        logp,
        torch.tensor(inp["old"]),
        torch.tensor(inp["ref"]),
        torch.tensor(inp["adv"]),
        torch.tensor(inp["mask"]).long(),
        cfg,
    )
    loss.backward()
    assert loss.item() == pytest.approx(l_bool.item(), abs=1e-12)
    torch.testing.assert_close(logp.grad, g_bool)


def test_low_precision_inputs_compute_in_float32():
    inp = make_inputs(seed=15)
    m = torch.tensor(inp["mask"])
    logp = torch.tensor(inp["logp"]).to(torch.bfloat16).requires_grad_(True)

    def bf(x):
        return torch.tensor(x).to(torch.bfloat16)

    loss, metrics = grpo_loss(logp, bf(inp["old"]), bf(inp["ref"]), bf(inp["adv"]), m, LossConfig())
    assert loss.dtype == torch.float32
    loss.backward()
    assert logp.grad.dtype == torch.bfloat16
    assert torch.isfinite(logp.grad.float()).all()
    assert all(torch.isfinite(v) for v in metrics.values())


def test_grpo_loss_argument_errors():
    inp = make_inputs(seed=16)
    logp = torch.tensor(inp["logp"])
    adv, mask = torch.tensor(inp["adv"]), torch.tensor(inp["mask"])
    ref = torch.tensor(inp["ref"])
    with pytest.raises(ValueError, match="ref_logprobs is required"):
        grpo_loss(logp, None, None, adv, mask, LossConfig(beta=0.04))
    with pytest.raises(ValueError, match="rollout_logprobs is required"):
        grpo_loss(logp, None, ref, adv, mask, LossConfig(tis_cap=2.0))
    with pytest.raises(ValueError, match="mask must have shape"):
        grpo_loss(logp, None, ref, adv, mask[:, :-1], LossConfig())
    with pytest.raises(ValueError, match="advantages must have shape"):
        grpo_loss(logp, None, ref, adv[:-1], mask, LossConfig())
    with pytest.raises(ValueError, match="loss_scale_tokens"):
        grpo_loss(
            logp, None, ref, adv, mask, LossConfig(loss_agg="seq-mean-token-mean"),
            loss_scale_tokens=10,
        )  # fmt: skip


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    m = torch.tensor([[True, True, False], [False, False, False], [True, False, True]])
    assert masked_mean(x, m).item() == pytest.approx((1 + 2 + 7 + 9) / 4)
    torch.testing.assert_close(masked_mean(x, m, dim=1), torch.tensor([1.5, 0.0, 8.0]))
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0


# ---------------------------------------------------------------------------
# Config validation
# ---------------------------------------------------------------------------


def test_config_defaults_are_trl_open_rs():
    cfg = LossConfig()
    assert (cfg.beta, cfg.kl_estimator, cfg.loss_agg) == (0.04, "k3", "token-mean")
    assert (cfg.clip_eps_low, cfg.clip_eps_high, cfg.num_iterations) == (0.2, 0.2, 1)
    adv = AdvantageConfig()
    assert adv.scale_rewards is True and adv.baseline == "mean"


@pytest.mark.parametrize(
    "field, value, options",
    [
        ("kl_estimator", "k4", "['k1', 'k2', 'k3']"),
        ("loss_agg", "seq-mean", "seq-mean-token-sum-norm"),
        ("beta", -0.1, ">= 0"),
        ("kl_clamp", 0.0, "> 0"),
        ("clip_eps_low", 1.0, "[0, 1)"),
        ("clip_eps_high", -0.1, ">= 0"),
        ("dual_clip_c", 0.5, "> 1"),
        ("norm_length", 0, ">= 1"),
        ("tis_cap", 0.0, "> 0"),
        ("num_iterations", 0, ">= 1"),
        ("kl_bias_correction", "yes", "True or False"),
        ("seq_mean_denominator", "rows", "['nonempty', 'all']"),
    ],
)
def test_config_validation_messages(field, value, options):
    with pytest.raises(ValueError) as exc:
        LossConfig(**{field: value})
    msg = str(exc.value)
    assert field in msg and repr(value) in msg and options in msg


@pytest.mark.parametrize(
    "field, value, options",
    [("baseline", "median", "leave_one_out"), ("scale_rewards", "yes", "True or False")],
)
def test_advantage_config_validation_messages(field, value, options):
    with pytest.raises(ValueError) as exc:
        AdvantageConfig(**{field: value})
    msg = str(exc.value)
    assert field in msg and repr(value) in msg and options in msg


# ---------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------


def _rewards(seed=0, P=5, G=6):
    g = np.random.default_rng(seed)
    r = g.choice([0.0, 0.5, 1.0, 2.0], size=(P, G)) + g.normal(0, 0.1, (P, G))
    r[1] = 0.1  # an all-equal group (0.1 is not exact in binary)
    r[3] = 2.0
    return r.reshape(-1)


@pytest.mark.parametrize("baseline", ["mean", "leave_one_out"])
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_advantages_match_reference(baseline, scale_by_std):
    r = _rewards(seed=1)
    expected = ref_advantages(r, 6, scale_by_std=scale_by_std, baseline=baseline)
    got64 = group_advantages(torch.tensor(r), 6, scale_by_std=scale_by_std, baseline=baseline)
    assert got64.dtype == torch.float64
    np.testing.assert_allclose(got64.numpy(), expected, atol=1e-9, rtol=1e-9)
    got32 = group_advantages(
        torch.tensor(r, dtype=torch.float32),
        6,
        scale_by_std=scale_by_std,
        baseline=baseline,
    )
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), expected, atol=1e-5, rtol=1e-5)


def test_advantages_trl_formula_and_eps():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    a = group_advantages(r, 6)
    std = statistics.stdev([1.0, 0, 0, 1, 1, 0])
    expected = [(x - 0.5) / (std + 1e-4) for x in r.tolist()]
    np.testing.assert_allclose(a.numpy(), expected, rtol=1e-6)
    a2 = group_advantages(r, 6, eps=0.5)
    np.testing.assert_allclose(a2.numpy(), [(x - 0.5) / (std + 0.5) for x in r.tolist()], rtol=1e-6)


def test_leave_one_out_is_scaled_mean_centering():
    r = torch.tensor(_rewards(seed=2), dtype=torch.float64)
    loo = group_advantages(r, 6, baseline="leave_one_out", scale_by_std=False)
    drg = group_advantages(r, 6, scale_by_std=False)
    torch.testing.assert_close(loo, drg * 6 / 5)


@pytest.mark.parametrize("baseline", ["mean", "leave_one_out"])
@pytest.mark.parametrize("scale_by_std", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_constant_groups_exact_zero(baseline, scale_by_std, dtype):
    r = torch.tensor(_rewards(seed=3), dtype=dtype)
    a = group_advantages(r, 6, scale_by_std=scale_by_std, baseline=baseline, eps=0.0)
    assert a.dtype == dtype
    assert not torch.isnan(a).any()
    assert (a[6:12] == 0).all() and (a[18:24] == 0).all()
    assert (a[:6] != 0).any()


@pytest.mark.parametrize("baseline", ["mean", "leave_one_out"])
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_size_one_gives_zeros(baseline, scale_by_std):
    a = group_advantages(torch.tensor([0.3, 1.0, -2.0]), 1, scale_by_std=scale_by_std, baseline=baseline)
    assert (a == 0).all() and not torch.isnan(a).any()


def test_integer_rewards_return_float32():
    a = group_advantages(torch.tensor([0, 1, 1, 0]), 2)
    assert a.dtype == torch.float32
    np.testing.assert_allclose(a.numpy(), ref_advantages([0, 1, 1, 0], 2), rtol=1e-6)


def test_advantage_argument_errors():
    with pytest.raises(ValueError, match=r"N=7 is not divisible by group_size=3"):
        group_advantages(torch.zeros(7), 3)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(6), 0)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 3), 3)
    with pytest.raises(ValueError, match="baseline='median'"):
        group_advantages(torch.zeros(6), 3, baseline="median")
