"""Micro-batches: the completions of a step laid out as model rows.

Unpacked: one row per completion, [left-padded prompt | right-padded completion]. Shared prefix
(Prefix Grouper, ``batching.shared_prefix``): one row per group, [prompt | G completions].
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.train_config import check_whole_groups


@dataclass
class MicroBatch:
    """One forward's rows. Unpacked (``group_size == 0``): rows [left-padded prompt | right-padded
    completion], completion tokens from column P. Packed (shared prefix, ``group_size == G``): one row
    per group, [left-padded prompt (P) | completion 1 (C) | ... | completion G (C)], each completion
    right-padded to C. ``completion_mask`` (and every logprob tensor) is [completions, C] in both."""

    input_ids: torch.Tensor  # [b, S]
    attn: torch.Tensor  # [b, S] True = real token
    completion_mask: torch.Tensor  # [completions, C] True = token in the loss (up to and including EOS)
    P: int
    rows: slice  # completion rows of the step's batch
    group_size: int = 0  # G when packed; 0 = one row per completion
    # What the loss needs per completion, attached by the trainer's REWARD / LOGPROBS phases:
    advantages: torch.Tensor | None = None  # [completions]
    ref_logprobs: torch.Tensor | None = None  # [completions, C] frozen reference (beta > 0)
    old_logprobs: torch.Tensor | None = None  # [completions, C] policy before this batch (mu > 1)
    rollout_logprobs: torch.Tensor | None = None  # [completions, C] reported by the generator


def build_micro_batch(
    prompts: list[list[int]], completions: list[list[int]], rows: slice, pad_id: int
) -> MicroBatch:
    P = max(len(p) for p in prompts)
    C = max(1, max(len(c) for c in completions))
    ids = torch.full((len(prompts), P + C), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids[i, P - len(p) : P] = torch.tensor(p)
        ids[i, P : P + len(c)] = torch.tensor(c, dtype=torch.long)
        attn[i, P - len(p) : P + len(c)] = True
    return MicroBatch(ids, attn, attn[:, P:].clone(), P, rows)


def build_packed_micro_batch(
    prompts: list[list[int]], completions: list[list[int]], rows: slice, pad_id: int, group_size: int
) -> MicroBatch:
    """Shared-prefix packing: each run of ``group_size`` rows (one prompt, G completions) -> one row.

    P and C are the micro-batch's longest prompt and completion, as in :func:`build_micro_batch`, so
    the completion mask, and with it the token-mean loss, is the unpacked one.
    """
    G = group_size
    if len(prompts) % G:
        raise ValueError(f"{len(prompts)} rows do not split into whole groups of {G} (shared prefix)")
    P = max(len(p) for p in prompts)
    C = max(1, max(len(c) for c in completions))
    ids = torch.full((len(prompts) // G, P + G * C), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids, dtype=torch.bool)
    cmask = torch.zeros(len(prompts), C, dtype=torch.bool)
    for g in range(len(prompts) // G):
        p = prompts[g * G]
        if any(q != p for q in prompts[g * G : (g + 1) * G]):
            raise ValueError(f"rows {g * G}..{(g + 1) * G - 1} are not one group (their prompts differ)")
        ids[g, P - len(p) : P] = torch.tensor(p)
        attn[g, P - len(p) : P] = True
        for j, c in enumerate(completions[g * G : (g + 1) * G]):
            lo = P + j * C
            ids[g, lo : lo + len(c)] = torch.tensor(c, dtype=torch.long)
            attn[g, lo : lo + len(c)] = True
            cmask[g * G + j, : len(c)] = True
    return MicroBatch(ids, attn, cmask, P, rows, group_size=G)


def build_micro_batches(
    prompts: list[list[int]],
    completions: list[list[int]],
    micro_batch_size: int,
    pad_id: int,
    num_generations: int,
    shared_prefix: bool = False,
) -> list[MicroBatch]:
    """Consecutive micro-batches of ``micro_batch_size`` completions (the last may be shorter); with
    ``shared_prefix`` each holds whole groups, packed by :func:`build_packed_micro_batch`."""
    build = build_micro_batch
    if shared_prefix:
        check_whole_groups(micro_batch_size, num_generations)
        build = functools.partial(build_packed_micro_batch, group_size=num_generations)
    m = micro_batch_size
    return [
        build(prompts[s : s + m], completions[s : s + m], slice(s, s + m), pad_id)
        for s in range(0, len(completions), m)
    ]


def shared_prefix_layout(P: int, G: int, C: int) -> tuple[torch.Tensor, ...]:
    """(RoPE positions [S], segments [S], logit columns [G, C], target columns [G, C]) of the packed
    layout, S = P + G C.

    Slot j (0-based) covers columns P + jC .. P + (j+1)C - 1 with positions P .. P+C-1, where the
    unpacked row has them, so every attention score is the unpacked one. Completion token t of slot j
    (column P + jC + t) is predicted by the logits at column P + jC + t - 1, token 0 of every slot by
    the shared last prompt column P - 1.
    """
    t = torch.arange(C)
    positions = torch.cat([torch.arange(P), (P + t).repeat(G)])
    segments = torch.cat([torch.zeros(P, dtype=torch.long), torch.arange(1, G + 1).repeat_interleave(C)])
    targets = P + torch.arange(G)[:, None] * C + t[None, :]
    sources = targets - 1
    sources[:, 0] = P - 1
    return positions, segments, sources, targets


def pad_rows(rows: Sequence[Sequence[float]], width: int) -> torch.Tensor:
    """Ragged per-token values (e.g. the generator's logprobs) -> [len(rows), width], zero-padded."""
    t = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        t[i, : len(r)] = torch.tensor(r)
    return t
