"""The loss normalisation, defined on logical micro-batches, whatever the physical batching.

The objective of a step (per rank) is the mean over its *logical* micro-batches (consecutive runs of
``batching.micro_batch_size`` completions: open-rs's per-device batch of 6) of each one's aggregated
GRPO loss (``loss.loss_agg``), and Megatron DDP averages it over DP ranks. The physical micro-batches
(token budgets, packing) may split a logical micro-batch or mix several; each physical micro-batch
gets one ``LossSlice`` per logical micro-batch it touches, carrying the logical denominators, so
that summing ``grpo_loss(slice) * loss_weight`` over the physical micro-batches reproduces the
logical objective exactly:

- ``token-mean``: ``grpo_loss(..., loss_scale_tokens=N_g)`` (the logical micro-batch's token count)
  and ``loss_weight = 1 / n_logical``;
- ``seq-mean-token-mean`` / ``seq-mean-token-sum-norm``: the slice's sequence mean re-weighted by
  ``(its non-empty rows / the logical micro-batch's) / n_logical``; the slice is widened to the
  logical micro-batch's completion width, Dr. GRPO's default constant;
- ``token-mean-global`` (DAPO; TRL 1.16 ``loss_type="dapo"``; verl token-mean): one token count over
  the whole step's completions on every DP rank: ``loss_scale_tokens = N_global / dp`` and weight 1
  (DDP's mean over DP then gives ``sum over all tokens / N_global``).

Metrics that are token means (KL, clip fraction, entropy) are weighted ``tokens_slice / N_g /
n_logical``: the mean over logical micro-batches of each one's token mean, as without slicing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.batching.micro_batches import MicroBatch


@dataclass(frozen=True)
class LossSlice:
    """The part of one logical micro-batch that lies in a physical micro-batch."""

    rows: list[int]  # positions among the physical micro-batch's completions
    width: int  # completion width of the logical micro-batch (its longest completion, >= 1)
    loss_scale_tokens: float | None  # grpo_loss's token-mean denominator; None for sequence means
    loss_weight: float  # multiplies grpo_loss's value (and its pg_loss metric)
    metric_weight: float  # multiplies the slice's token-mean metrics
    whole: bool  # the slice is the physical micro-batch, rows in order, at its own width


def row_indices(mb: MicroBatch) -> list[int]:
    """The step rows (completion indices) of ``mb``'s completions, in order."""
    if isinstance(mb.rows, slice):
        start = mb.rows.start or 0
        return list(range(start, start + mb.completion_mask.shape[0]))
    return list(mb.rows)


def completion_lengths(mb: MicroBatch) -> list[int]:
    if mb.completion_lengths is not None:
        return list(mb.completion_lengths)
    return [int(x) for x in mb.attn[:, mb.P :].sum(1)]  # unpacked rows


def assign_loss_slices(
    mbs: list[MicroBatch],
    loss_agg: str,
    logical_size: int | None = None,
    global_tokens: Callable[[float], float] | None = None,
    dp: int = 1,
    seq_mean_denominator: str = "nonempty",
) -> None:
    """Set ``mb.loss_slices`` on every micro-batch (after the final completion masks are set).

    ``logical_size``: completions per logical micro-batch (step rows ``[k m, (k+1) m)``); None = each
    physical micro-batch is its own logical one (the plain layout). ``global_tokens`` sums a count
    over DP ranks (``token-mean-global`` only), ``dp`` the DP size; ``seq_mean_denominator`` as in
    ``LossConfig`` (sequence means over the non-empty rows, or over all rows).
    """
    rows = [row_indices(mb) for mb in mbs]
    tokens = [[int(x) for x in mb.completion_mask.sum(1)] for mb in mbs]
    lengths = [completion_lengths(mb) for mb in mbs]
    group_of: list[list[int]] = []
    if logical_size is None:
        group_of = [[k] * len(r) for k, r in enumerate(rows)]
    else:
        group_of = [[i // logical_size for i in r] for r in rows]
    groups = sorted({g for gs in group_of for g in gs})
    n_logical = max(len(groups), 1)
    g_tokens = dict.fromkeys(groups, 0)
    g_seqs = dict.fromkeys(groups, 0)
    g_width = dict.fromkeys(groups, 1)
    for gs, ts, ls in zip(group_of, tokens, lengths, strict=True):
        for g, t, n in zip(gs, ts, ls, strict=True):
            g_tokens[g] += t
            g_seqs[g] += t > 0 or seq_mean_denominator == "all"
            g_width[g] = max(g_width[g], n)
    total = float(sum(g_tokens.values()))
    if loss_agg == "token-mean-global":
        if global_tokens is not None:
            total = float(global_tokens(total))
        denom_global = max(total, 1.0) / dp
    for mb, gs, ts in zip(mbs, group_of, tokens, strict=True):
        slices = []
        for g in sorted(set(gs)):
            local = [j for j, x in enumerate(gs) if x == g]
            tok = sum(ts[j] for j in local)
            seqs = sum(ts[j] > 0 or seq_mean_denominator == "all" for j in local)
            metric_weight = tok / max(g_tokens[g], 1) / n_logical
            if loss_agg == "token-mean":
                scale, weight = float(max(g_tokens[g], 1)), 1.0 / n_logical
            elif loss_agg == "token-mean-global":
                scale, weight = denom_global, 1.0
            else:
                scale, weight = None, (seqs / g_seqs[g] if g_seqs[g] else 0.0) / n_logical
            whole = local == list(range(len(gs))) and g_width[g] == mb.completion_mask.shape[1]
            slices.append(LossSlice(local, g_width[g], scale, weight, metric_weight, whole))
        mb.loss_slices = slices


def fit(x: torch.Tensor | None, rows: list[int], width: int, whole: bool) -> torch.Tensor | None:
    """``x[rows]`` ([completions, C] or [completions]) cut or zero-padded to ``width`` columns. Lossless:
    every real token of a row lies within both C and the logical width."""
    if x is None or whole:
        return x
    x = x[rows]
    if x.dim() == 1:
        return x
    C = x.shape[1]
    if C >= width:
        return x[:, :width]
    return torch.cat([x, x.new_zeros(x.shape[0], width - C)], dim=1)
