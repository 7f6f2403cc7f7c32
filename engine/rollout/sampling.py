"""Token sampling from vocab-parallel float32 logits, with the logprob the trainer recomputes.

Per step, three passes over this rank's vocab shard (max; exp; 256-column block sums) and then
reductions over TP of a few per-row numbers (never the full vocab). Greedy is a global argmax;
sampling is inverse-CDF sampling, the exact draw from ``softmax(logits / T)``: one uniform ``u`` per row
picks the token whose cumulative-probability interval holds ``u``: first the TP shard (from the
shards' masses), then the 256-column block (fp64 cumulative block sums), then the column inside the
block, so rounding stays far below the rarest token's mass. A Gumbel / exponential race needs one
random number per vocab entry: at 152k columns the CPU random-number generator alone costs more
than the LM head (``torch.multinomial`` did exactly that). The cut points depend only on the
probabilities, so the drawn token is the same at any TP size.

The uniforms are counter-based (a hash of seed, output row and token index), so a row's draws do not
depend on which other rows share its batch: continuous batching (rows leaving, prompts joining)
draws exactly what one static batch would. Top-k / top-p run only when asked: top-k gathers k
candidates per TP rank; top-p without top-k sorts (and at TP > 1 gathers) the whole vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from engine.rollout.base import SamplingConfig

CDF_BLOCK = 256  # columns per first-level CDF block
_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of the vocab: logits column ``j`` is token ``start + j`` for ``j < width``
    (columns past ``width`` are vocab padding and never sampled). ``group`` is the TP group (None: TP1)."""

    start: int
    width: int
    group: Any = None
    size: int = 1


def vocab_shard(vocab_size: int, shard_width: int) -> VocabShard:
    """The shard held by this TP rank for logits of ``shard_width`` columns (padded vocab / TP)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return VocabShard(0, min(shard_width, vocab_size))
    size = parallel_state.get_tensor_model_parallel_world_size()
    start = parallel_state.get_tensor_model_parallel_rank() * shard_width
    width = max(0, min(shard_width, vocab_size - start))
    if size == 1:
        return VocabShard(start, width)
    return VocabShard(start, width, parallel_state.get_tensor_model_parallel_group(), size)


class Draw(NamedTuple):
    tokens: torch.Tensor  # [B] long
    logprobs: torch.Tensor  # [B] float32, under the full temperature-scaled distribution
    finite: torch.Tensor  # [B] bool: every logit of the row finite (on every TP rank)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons) on int64 tensors holding 32-bit values; wrap-around keeps the low bits."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniforms(seed: int, rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """A float64 uniform in [0, 1) per (seed, row, step): 53 bits from two chained 32-bit hashes."""
    s = int(seed) & 0xFFFFFFFFFFFFFFFF
    key = _hash32(torch.full_like(rows, s & _M32) ^ _hash32(torch.full_like(rows, s >> 32)))
    h1 = _hash32(_hash32(key ^ (rows & _M32)) ^ (steps & _M32))
    h2 = _hash32(h1 ^ 0x5BD1E995)
    return ((h1 >> 5) * 67108864 + (h2 >> 6)).double() * (1.0 / 9007199254740992.0)


def _gather(t: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """[TP, *t.shape] of every TP rank's ``t`` (in rank order)."""
    if shard.size == 1:
        return t[None]
    out = [torch.empty_like(t) for _ in range(shard.size)]
    dist.all_gather(out, t.contiguous(), group=shard.group)
    return torch.stack(out)


def _all_sum(t: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    if shard.size > 1:
        dist.all_reduce(t, group=shard.group)
    return t


def _inverse_cdf(weights: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Index of the entry whose cumulative interval holds ``target`` (float64 [B], in [0, row sum)),
    never one of zero weight: ``weights`` [B, W] >= 0 with a positive sum."""
    cum = weights.double().cumsum(-1)
    idx = torch.searchsorted(cum, target[:, None], right=True)[:, 0]
    last = torch.searchsorted(cum, cum[:, -1:].contiguous(), right=False)[
        :, 0
    ]  # first entry reaching the total
    return torch.minimum(idx, last).clamp_(0, weights.shape[-1] - 1)  # NaN rows: any valid index


def _block_sums(e: torch.Tensor) -> torch.Tensor:
    """float64 [B, ceil(W / CDF_BLOCK)] sums of ``e`` [B, W] over consecutive column blocks (fp32 inside a
    block: 256 terms, relative error ~1e-7; fp64 across blocks)."""
    B, W = e.shape
    full = W // CDF_BLOCK * CDF_BLOCK
    parts = [e[:, :full].view(B, -1, CDF_BLOCK).sum(-1)] if full else []
    if full < W:
        parts.append(e[:, full:].sum(-1, keepdim=True))
    return torch.cat(parts, -1).double()


def _sample_shard(e: torch.Tensor, sums: torch.Tensor, frac: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF index into one shard's unnormalised probabilities ``e`` [B, W] (block sums ``sums``)
    at ``frac`` [B] (float64, in [0, 1)) of the shard's mass: the block first, then inside it."""
    W = e.shape[1]
    target = frac * sums.sum(-1)
    blk = _inverse_cdf(sums, target)
    before = sums.cumsum(-1).gather(1, blk[:, None])[:, 0] - sums.gather(1, blk[:, None])[:, 0]
    cols = (blk * CDF_BLOCK)[:, None] + torch.arange(CDF_BLOCK, device=e.device)
    inside = e.gather(1, cols.clamp_max(W - 1)).masked_fill(cols >= W, 0.0)
    return (blk * CDF_BLOCK + _inverse_cdf(inside, (target - before).clamp_min(0.0))).clamp_max_(W - 1)


def _candidates(logits: torch.Tensor, shard: VocabShard, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, token ids) [B, C] of the global top-k (all tokens when top_k == 0), descending.

    ``logits`` [B, V/TP] is the whole (padded) shard, so every rank sends the same shape; its padding
    columns must be -inf."""
    W = logits.shape[-1]
    k = min(top_k, W) if top_k > 0 else W
    if top_k > 0:
        vals, idx = logits.topk(k, dim=-1)
    else:
        vals, idx = logits, torch.arange(W, device=logits.device).expand_as(logits)
    idx = idx + shard.start
    if shard.size > 1:
        vals = _gather(vals.contiguous(), shard).permute(1, 0, 2).reshape(vals.shape[0], -1)
        idx = _gather(idx.contiguous(), shard).permute(1, 0, 2).reshape(idx.shape[0], -1)
    keep = min(top_k, vals.shape[-1]) if top_k > 0 else vals.shape[-1]
    vals, order = vals.topk(keep, dim=-1)  # sorted descending
    return vals, idx.gather(1, order)


def sample_next(
    logits: torch.Tensor,
    sampling: SamplingConfig,
    seed: int,
    rows: torch.Tensor,
    steps: torch.Tensor,
    shard: VocabShard | None = None,
) -> Draw:
    """Sample one token per row of vocab-parallel ``logits`` [B, V/TP] (any float dtype).

    ``rows`` / ``steps`` [B] (long) name each row's output row and token index: with ``seed`` they
    fix its uniform. The logprob is taken under the temperature-scaled *full* distribution (before
    top-k/top-p truncation), the quantity the trainer recomputes; greedy (T=0) reports the T=1 logprob.
    Every TP rank returns the same tokens.
    """
    shard = shard or VocabShard(0, logits.shape[-1])
    x = logits[:, : shard.width].float()
    B = x.shape[0]
    t = sampling.temperature
    scaled = x / t if t > 0 and t != 1.0 else x
    if shard.width:
        m = scaled.amax(-1)
        e = (scaled - m[:, None]).exp_()
        sums = _block_sums(e)
        s = sums.sum(-1).float()
        arg = scaled.argmax(-1) if t == 0 else torch.zeros_like(m, dtype=torch.long)
    else:  # a shard of padding only
        m = torch.full((B,), float("-inf"), device=x.device)
        arg, s = torch.zeros(B, dtype=torch.long, device=x.device), torch.zeros(B, device=x.device)
    # max propagates NaN and +inf; -inf logits are legitimate (probability 0, never drawn).
    finite = torch.isfinite(m) | (shard.width == 0)
    # Per-row statistics of every shard: max, sum of exp(. - max), argmax, finite. Token ids < 2^24
    # are exact in float32.
    stats = _gather(torch.stack([m, s, (arg + shard.start).float(), finite.float()], -1), shard)
    M = stats[..., 0].max(0).values  # [B]
    w = stats[..., 1].double() * (stats[..., 0] - M).double().exp()  # each shard's mass, global scale
    w = torch.nan_to_num(w, nan=0.0)  # all-padding shards: -inf - -inf
    lse = M.double() + w.sum(0).log()
    finite = stats[..., 3].all(0) if shard.size > 1 else finite
    if t == 0:
        winner = (stats[..., 0] == M).float().argmax(0)  # first shard holding the max
        tok = stats[..., 2].gather(0, winner[None])[0].long()
        return Draw(tok, (M.double() - lse).float(), finite)
    u = uniforms(seed, rows, steps)
    if sampling.top_k > 0 or sampling.top_p < 1.0:
        padded = logits.float().masked_fill(
            torch.arange(logits.shape[-1], device=logits.device) >= shard.width, float("-inf")
        )
        vals, ids = _candidates(padded / t if t != 1.0 else padded, shard, sampling.top_k)
        p = (vals - vals[:, :1]).double().exp()
        p = p / p.sum(-1, keepdim=True)
        if sampling.top_p < 1.0:  # keep the smallest prefix reaching top_p (at least one token)
            p = p.masked_fill(p.cumsum(-1) - p > sampling.top_p, 0.0)
        j = _inverse_cdf(p, u * p.sum(-1))
        tok, val = ids.gather(1, j[:, None])[:, 0], vals.gather(1, j[:, None])[:, 0]
        return Draw(tok, (val.double() - lse).float(), finite)
    # Which shard: cumulative masses over TP ranks (identical on every rank), then inside it.
    target = u * w.sum(0)
    owner = _inverse_cdf(w.T.contiguous(), target) if shard.size > 1 else torch.zeros_like(rows)
    before = (w.cumsum(0) - w).T.gather(1, owner[:, None])[:, 0]
    frac = ((target - before) / w.T.gather(1, owner[:, None])[:, 0]).clamp(0.0, 1.0 - 2**-53)
    rank = dist.get_rank(shard.group) if shard.size > 1 else 0
    if shard.width:
        j = _sample_shard(e, sums, frac)
        mine = owner == rank
        picked = torch.stack([(j + shard.start).double(), scaled.gather(1, j[:, None])[:, 0].double()], -1)
        picked = torch.where(mine[:, None], picked, torch.zeros_like(picked))
    else:
        picked = torch.zeros(B, 2, dtype=torch.float64, device=x.device)
    picked = _all_sum(picked, shard)  # exactly one shard owns each row's token: the sum is exact
    return Draw(picked[:, 0].long(), (picked[:, 1] - lse).float(), finite)
