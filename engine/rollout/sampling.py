"""Token sampling from float32 logits (temperature, top-k, top-p) with the logprob the trainer recomputes."""

from __future__ import annotations

import torch

from engine.rollout.base import SamplingConfig


def sample_next(
    logits: torch.Tensor, sampling: SamplingConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of float32 ``logits`` [B, V]; returns (tokens, logprobs).

    The logprob is taken under the temperature-scaled *full* distribution (before top-k/top-p
    truncation), the quantity the trainer recomputes; greedy (T=0) reports the T=1 logprob.
    """
    t = sampling.temperature
    scaled = logits / t if t > 0 else logits
    logp_full = torch.log_softmax(scaled, dim=-1)
    if t == 0:
        tok = scaled.argmax(-1)
        return tok, logp_full.gather(-1, tok[:, None])[:, 0]
    filt = scaled.clone()
    if sampling.top_k > 0 and sampling.top_k < filt.shape[-1]:
        kth = filt.topk(sampling.top_k, dim=-1).values[:, -1:]
        filt = filt.masked_fill(filt < kth, float("-inf"))
    if sampling.top_p < 1.0:
        srt, idx = filt.sort(dim=-1, descending=True)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum - srt.softmax(-1) > sampling.top_p  # keep the smallest prefix reaching top_p
        filt = filt.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
    probs = filt.softmax(-1)
    tok = torch.multinomial(probs, 1, generator=gen)[:, 0]
    return tok, logp_full.gather(-1, tok[:, None])[:, 0]
