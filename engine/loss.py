r"""GRPO policy loss: clipped surrogate, KL to a frozen reference, aggregation.

The objective (DeepSeekMath, Shao et al. 2024, eq. 3; TRL's ``GRPOTrainer``) for a
prompt ``q`` with a group of ``G`` sampled completions ``o_1..o_G``::

    J_GRPO(θ) = E_{q, {o_i} ~ π_θ_old} [ 1/G Σ_i 1/|o_i| Σ_t (
                    min( r_{i,t}(θ) Â_{i,t},
                         clip(r_{i,t}(θ), 1 - ε_low, 1 + ε_high) Â_{i,t} )
                    - β D_KL[π_θ || π_ref]_{i,t} ) ]

with

* ``r_{i,t}(θ) = π_θ(o_{i,t} | q, o_{i,<t}) / π_θ_old(o_{i,t} | q, o_{i,<t})``
  the importance ratio against the policy that produced the stored "old"
  logprobs (TRL ``coef_1``; ``ratio`` here);
* ``Â_{i,t} = Â_i`` the group-relative advantage of completion ``i``, the same for
  all its tokens (:func:`engine.advantages.group_advantages`);
* ``ε_low, ε_high`` the clip range (``clip_eps_low`` / ``clip_eps_high``; DAPO's
  "clip-higher" uses ``ε_high > ε_low``);
* ``β`` the KL coefficient (``beta``) and ``π_ref`` the frozen initial policy;
* ``D_KL`` the per-token KL estimate (Schulman's estimators) of
  ``log_r = log π_ref - log π_θ``:

  - ``k1 = -log_r = log π_θ - log π_ref``
  - ``k2 = ½ log_r²``
  - ``k3 = exp(log_r) - log_r - 1 = π_ref/π_θ - log(π_ref/π_θ) - 1``  (DeepSeekMath,
    TRL, verl ``low_var_kl``; unbiased and always ``>= 0``)

The loss minimised here is ``-J`` per token::

    pg_t   = max(-Â r_t, -Â clip(r_t, 1-ε_low, 1+ε_high))    # PPO pessimistic bound
    pg_t   = min(pg_t, -Â c)           if Â < 0 and dual_clip_c = c   (dual clip)
    pg_t   = w_t · pg_t,  w_t = min(exp(logp_old - logp_rollout), tis_cap)  (TIS, detached)
    loss_t = pg_t + β · KL_t · (r_t if kl_bias_correction else 1)

then aggregated over valid tokens (``loss_agg``):

* ``token-mean``: ``Σ_{b,t} loss_t m_t / Σ_{b,t} m_t`` over this micro-batch
  (TRL at the pinned commit and verl's default), or ``/ loss_scale_tokens`` when
  the trainer passes a global token count (across DP ranks and micro-batches);
* ``token-mean-global`` (DAPO; TRL 1.16's default ``loss_type="dapo"``; verl
  token-mean): one token count over the whole optimizer step's completions, across
  micro-batches and DP ranks: the trainer passes it as ``loss_scale_tokens``
  (``engine.batching.normalisation``); without it, this call is the whole step;
* ``seq-mean-token-mean``: ``mean_b( Σ_t loss_t m_t / Σ_t m_t )`` (the paper's
  ``1/G Σ_i 1/|o_i| Σ_t``);
* ``seq-mean-token-sum-norm``: ``mean_b( Σ_t loss_t m_t / L )`` with a constant
  ``L = norm_length`` (Dr. GRPO), by default the padded length ``T``.

The sequence mean ``mean_b`` (``seq_mean_denominator``):

* ``"nonempty"`` (default): over the rows that have at least one valid token. A row
  with no loss token (padding, or a truncated completion masked out by
  ``rollout.mask_truncated_completions``) is not in the mean: the objective is the
  paper's ``1/G Σ_i`` over the completions that enter the loss, and the loss scale
  does not shrink as more completions are masked. Never ``NaN``.
* ``"all"``: over all ``B`` rows; a fully masked row counts as ``0`` (TRL 1.16
  ``loss_type="grpo"`` and ``"dr_grpo"``, which divide by the batch size). Each kept
  completion then weighs ``1/B`` whatever the others do (5 of 12 truncated: the
  loss is 7/12 of ``"nonempty"``'s).

``"nonempty"`` is the default because a masked completion is data the recipe
chose not to learn from, not a zero-loss sample; ``"all"`` is there to reproduce
TRL 1.16. Without masked rows the two agree.

With ``num_iterations == 1`` and ``old_logprobs=None`` the ratio is
``exp(logp - logp.detach()) == 1``: the clip is inert and the gradient is the plain
policy gradient ``-Â ∇logp`` per token (TRL at ``num_iterations=1``).

Clamping (``kl_clamp``, following verl ``low_var_kl`` / NeMo-RL
``kl_input_clamp_value``): ``log_r`` is clamped to ``[-kl_clamp, kl_clamp]`` for
every estimator, and the k3 value is further clamped to ``[-10, 10]``.
``kl_clamp=None`` disables both (TRL: no clamp). A clamped token has zero KL
gradient: k3 reaches 10 at ``log_r ≈ 2.61``, so the tokens the reference finds
most likely relative to the policy stop being pulled back. The open-rs configs
therefore set ``kl_clamp: null``.

Bias-corrected KL (``kl_bias_correction``, TRL 1.16 ``use_bias_correction_kl``,
DeepSeek-V3.2): ``KL_t`` is multiplied by the importance ratio ``r_t =
exp(logp - logp_old)`` with its gradient. On-policy (``r_t = exp(logp -
logp.detach())``) the value is unchanged and the gradient gains ``β KL_t ∇logp``,
the score-function term of ``∇ E_{o~π_θ}[KL_t]`` that the plain estimate (samples
treated as fixed) leaves out. The ``kl`` metric stays the uncorrected estimate.
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.train_config import LossConfig

__all__ = ["KL_ESTIMATORS", "LossConfig", "grpo_loss", "kl_penalty", "masked_mean"]

KL_ESTIMATORS = ("k1", "k2", "k3")
K3_OUTPUT_CLAMP = 10.0


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """``Σ x·mask / Σ mask`` over ``dim`` (all elements when ``None``).

    Entries where the mask sums to zero give ``0`` (not ``NaN``); masked-out
    entries of ``x`` never reach the result, even if they are ``inf``/``NaN``.
    """
    m = mask.to(x.dtype)
    keep = m != 0
    xm = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)) * m
    if dim is None:
        num, den = xm.sum(), m.sum()
    else:
        num, den = xm.sum(dim=dim), m.sum(dim=dim)
    safe = torch.where(den != 0, den, torch.ones_like(den))
    return torch.where(den != 0, num / safe, torch.zeros_like(num))


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str, clamp: float | None) -> Tensor:
    """Per-token KL estimate of ``KL[π_θ || π_ref]`` from ``log_r = ref - logp``.

    ``k1 = -log_r``, ``k2 = ½ log_r²``, ``k3 = exp(log_r) - log_r - 1``. With
    ``clamp`` set, ``log_r`` is clamped to ``[-clamp, clamp]`` and k3's value to
    ``[-10, 10]`` (verl ``low_var_kl``).
    """
    log_r = ref_logprobs - logprobs
    if clamp is not None:
        log_r = log_r.clamp(-clamp, clamp)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r.square()
    if estimator == "k3":
        kl = torch.exp(log_r) - log_r - 1.0
        if clamp is not None:
            kl = kl.clamp(-K3_OUTPUT_CLAMP, K3_OUTPUT_CLAMP)
        return kl
    raise ValueError(f"kl_estimator={estimator!r} is invalid; valid options: {list(KL_ESTIMATORS)}")


def _check_bt(name: str, x: Tensor | None, shape: torch.Size) -> None:
    if x is not None and x.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} [B, T], got {tuple(x.shape)}")


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor | None,
    ref_logprobs: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    cfg: LossConfig,
    *,
    rollout_logprobs: Tensor | None = None,
    loss_scale_tokens: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss (``-J_GRPO``, see the module docstring) for one micro-batch.

    Args:
        logprobs: ``[B, T]`` current-policy token logprobs (with grad).
        old_logprobs: ``[B, T]`` logprobs of the policy before this batch's updates
            (``π_θ_old``), or ``None`` for on-policy (``logprobs.detach()``).
        ref_logprobs: ``[B, T]`` frozen reference logprobs; may be ``None`` when
            ``cfg.beta == 0``.
        advantages: ``[B]`` per-sequence advantages (treated as constants).
        mask: ``[B, T]`` bool or 0/1, valid completion tokens. Values of the other
            inputs at masked-out positions are ignored (may be garbage / inf).
        cfg: :class:`LossConfig`.
        rollout_logprobs: ``[B, T]`` logprobs reported by the rollout engine;
            required when ``cfg.tis_cap`` is set.
        loss_scale_tokens: ``token-mean`` only: denominator replacing this
            micro-batch's ``mask.sum()`` (e.g. the global token count of the step,
            so that summing over micro-batches and DP ranks gives the global
            token mean).

    Returns:
        ``(loss, metrics)``: scalar loss in ``promote(logprobs.dtype, float32)`` and
        detached scalar metrics ``kl`` (masked mean of the unscaled KL estimate,
        ``0`` when no reference is given), ``clip_frac``, ``dual_clip_frac``,
        ``ratio_mean``, ``pg_loss`` (the policy term aggregated like the loss) and,
        with TIS, ``tis_weight_mean``. Metric means are over this micro-batch's
        valid tokens.
    """
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be 2-D [B, T], got shape {tuple(logprobs.shape)}")
    shape = logprobs.shape
    B, T = shape
    _check_bt("old_logprobs", old_logprobs, shape)
    _check_bt("ref_logprobs", ref_logprobs, shape)
    _check_bt("rollout_logprobs", rollout_logprobs, shape)
    _check_bt("mask", mask, shape)
    if advantages.shape != (B,):
        raise ValueError(f"advantages must have shape ({B},) [B], got {tuple(advantages.shape)}")
    if cfg.beta != 0 and ref_logprobs is None:
        raise ValueError(f"ref_logprobs is required when LossConfig.beta={cfg.beta} != 0")
    if cfg.tis_cap is not None and rollout_logprobs is None:
        raise ValueError(f"rollout_logprobs is required when LossConfig.tis_cap={cfg.tis_cap} is set")
    if loss_scale_tokens is not None and cfg.loss_agg not in ("token-mean", "token-mean-global"):
        raise ValueError(
            "loss_scale_tokens is only meaningful for loss_agg='token-mean' or 'token-mean-global', "
            f"got loss_agg={cfg.loss_agg!r}"
        )

    dt = torch.promote_types(logprobs.dtype, torch.float32)
    keep = mask.bool() if mask.dtype != torch.bool else mask
    m = keep.to(dt)
    zero = torch.zeros((), dtype=dt, device=logprobs.device)

    def clean(x: Tensor) -> Tensor:
        # Padded positions may hold garbage; zero them before any exp/square.
        return torch.where(keep, x.to(dt), zero)

    logp = clean(logprobs)
    old = logp.detach() if old_logprobs is None else clean(old_logprobs).detach()
    adv = advantages.detach().to(dt).unsqueeze(1)  # [B, 1]

    # Clipped surrogate (pessimistic bound on -ratio*A).
    ratio = torch.exp(logp - old)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high)
    clipped = pg2 > pg1
    pg = torch.where(clipped, pg2, pg1)
    if cfg.dual_clip_c is not None:
        pg3 = -adv * cfg.dual_clip_c
        dual = (adv < 0) & (pg > pg3)
        pg = torch.where(dual, pg3.expand_as(pg), pg)
    else:
        dual = torch.zeros_like(keep)

    tis_w = None
    if cfg.tis_cap is not None:
        rollout = clean(rollout_logprobs).detach()
        tis_w = torch.exp(old - rollout).clamp(max=cfg.tis_cap).detach()
        pg = pg * tis_w

    if ref_logprobs is not None:
        kl = kl_penalty(logp, clean(ref_logprobs).detach(), cfg.kl_estimator, cfg.kl_clamp)
        kl = torch.where(keep, kl, zero)
    else:
        kl = None
    if kl is not None and cfg.beta != 0:
        kl_term = kl * ratio if cfg.kl_bias_correction else kl
        per_token = pg + cfg.beta * kl_term
    else:
        per_token = pg

    def aggregate(x: Tensor) -> Tensor:
        x = torch.where(keep, x, zero) * m
        if cfg.loss_agg in ("token-mean", "token-mean-global"):  # global: the caller passes the step's count
            if loss_scale_tokens is not None:
                return x.sum() / loss_scale_tokens
            return x.sum() / m.sum().clamp(min=1.0)
        tokens = m.sum(dim=1)
        if cfg.seq_mean_denominator == "all":
            nonempty = torch.ones_like(tokens)  # a fully masked row counts, as 0 (TRL 1.16)
        else:
            nonempty = (tokens > 0).to(dt)
        n_seq = nonempty.sum().clamp(min=1.0)
        if cfg.loss_agg == "seq-mean-token-mean":
            seq = x.sum(dim=1) / tokens.clamp(min=1.0)
        else:  # seq-mean-token-sum-norm
            seq = x.sum(dim=1) / float(cfg.norm_length if cfg.norm_length is not None else T)
        return (seq * nonempty).sum() / n_seq

    loss = aggregate(per_token)

    with torch.no_grad():
        metrics = {
            "kl": masked_mean(kl, keep) if kl is not None else zero.clone(),
            "clip_frac": masked_mean(clipped.to(dt), keep),
            "dual_clip_frac": masked_mean(dual.to(dt), keep),
            "ratio_mean": masked_mean(ratio, keep),
            "pg_loss": aggregate(pg),
        }
        if tis_w is not None:
            metrics["tis_weight_mean"] = masked_mean(tis_w, keep)
        metrics = {k: v.detach() for k, v in metrics.items()}
    return loss, metrics
