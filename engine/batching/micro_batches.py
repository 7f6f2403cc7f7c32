"""Micro-batches: the completions of a step laid out as model rows, and how many go in each.

Layouts:
- unpacked: one row per completion, [left-padded prompt | right-padded completion];
- shared prefix (Prefix Grouper, ``batching.shared_prefix``): one row per group, [prompt | G completions];
- packed (``batching.pack_sequences``): whole sequences (prompt + completion) one after another in a
  single row [1, T] with no padding; RoPE positions restart per sequence and segment ids keep
  attention within a sequence (``build_packed_sequences``).

Which completions share a physical micro-batch: without a token budget, consecutive runs of
``batching.micro_batch_size`` (the logical micro-batches); with one, ``token_budget_bins`` packs the
sequences into the fewest bins under the budget, with as many bins on every DP rank (verl's
``rearrange_micro_batches``). The loss does not depend on this choice (``engine.batching.normalisation``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from engine.train_config import check_whole_groups


@dataclass
class PackedLayout:
    """Where the sequences of a packed row are (T = total tokens, N = scored completion tokens)."""

    positions: torch.Tensor  # [T] RoPE positions, 0.. for every sequence
    segment_ids: torch.Tensor  # [1, T] the sequence each token belongs to (attention stays within)
    sources: torch.Tensor  # [N] columns whose hidden state predicts a completion token
    targets: torch.Tensor  # [N] the columns of those tokens
    slots: torch.Tensor  # [N] where each lands in the [completions, C] grid: row * C + t


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
    rows: slice | list[int]  # completion rows of the step's batch (a list for packed micro-batches)
    group_size: int = 0  # G when packed; 0 = one row per completion
    packed: PackedLayout | None = None  # sequences packed into one row (``build_packed_sequences``)
    completion_lengths: list[int] | None = None  # tokens of each completion (before any loss masking)
    loss_slices: list | None = None  # the logical micro-batches it holds (engine.batching.normalisation)
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
    return MicroBatch(
        ids, attn, attn[:, P:].clone(), P, rows, completion_lengths=[len(c) for c in completions]
    )


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
    return MicroBatch(
        ids, attn, cmask, P, rows, group_size=G, completion_lengths=[len(c) for c in completions]
    )


def build_packed_sequences(
    prompts: list[list[int]], completions: list[list[int]], rows: list[int]
) -> MicroBatch:
    """Sequences ``prompt + completion`` of ``rows`` back to back in one row [1, T], T = their total
    length: no padding is computed. Completion token t of sequence i (at column o_i + p_i + t) is
    scored from the hidden state at the column before it. ``completion_mask`` is [len(rows), C],
    C = the longest completion, as in the unpacked layout. No rows: an empty micro-batch (T = 0).
    """
    C = max([1, *(len(c) for c in completions)])
    ids, pos, seg, src, slots = [], [], [], [], []
    cmask = torch.zeros(len(rows), C, dtype=torch.bool)
    offset = 0
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        n = len(p) + len(c)
        ids += [*p, *c]
        pos.append(torch.arange(n))
        seg.append(torch.full((n,), i, dtype=torch.long))
        src.append(offset + len(p) - 1 + torch.arange(len(c)))
        slots.append(i * C + torch.arange(len(c)))
        cmask[i, : len(c)] = True
        offset += n
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long)  # noqa: E731
    sources = cat(src)
    layout = PackedLayout(cat(pos), cat(seg)[None], sources, sources + 1, cat(slots))
    input_ids = torch.tensor(ids, dtype=torch.long)[None]
    attn = torch.ones_like(input_ids, dtype=torch.bool)
    return MicroBatch(
        input_ids, attn, cmask, 0, list(rows), packed=layout, completion_lengths=[len(c) for c in completions]
    )


def score_positions(mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sources, targets, slots) [N] for every real completion token of ``mb``: the flat index (over
    the [b, S] rows) of the hidden state that predicts it, of the token itself, and of its place in
    the [completions, C] grid. Prompt positions are never sources."""
    if mb.packed is not None:
        return mb.packed.sources, mb.packed.targets, mb.packed.slots
    b, C = mb.completion_mask.shape
    S = mb.input_ids.shape[1]
    if not mb.group_size:
        row, t = torch.nonzero(mb.attn[:, mb.P :], as_tuple=True)
        targets = row * S + mb.P + t
        return targets - 1, targets, row * C + t
    G = mb.group_size
    _, _, sources, targets = shared_prefix_layout(mb.P, G, C)
    real = torch.tensor([[t < n for t in range(C)] for n in mb.completion_lengths])  # [completions, C]
    comp, t = torch.nonzero(real, as_tuple=True)
    group, slot = comp // G, comp % G
    return group * S + sources[slot, t], group * S + targets[slot, t], comp * C + t


def build_micro_batches(
    prompts: list[list[int]],
    completions: list[list[int]],
    micro_batch_size: int,
    pad_id: int,
    num_generations: int,
    shared_prefix: bool = False,
    *,
    pack_sequences: bool = False,
    max_tokens: int | None = None,
    budget_key: str = "batching.train_max_tokens",
    agree: Callable[[int], int] = lambda k: k,
) -> list[MicroBatch]:
    """The step's micro-batches. Without ``max_tokens``: consecutive runs of ``micro_batch_size``
    completions (the last may be shorter), padded rows, whole groups packed by
    :func:`build_packed_micro_batch` with ``shared_prefix``, or one packed row each with
    ``pack_sequences``. With ``max_tokens`` (needs ``pack_sequences``): :func:`token_budget_bins`, with
    ``agree`` turning this rank's bin count into the count every DP rank uses (an all-reduce MAX)."""
    if max_tokens is not None:
        if not pack_sequences:
            raise ValueError(f"{budget_key}={max_tokens} needs batching.pack_sequences=true")
        lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
        bins = token_budget_bins(lengths, max_tokens, budget_key, agree)
        return [build_packed_sequences([prompts[i] for i in b], [completions[i] for i in b], b) for b in bins]
    m = micro_batch_size
    if pack_sequences:
        if shared_prefix:
            raise ValueError(
                "batching.pack_sequences=true and batching.shared_prefix=true cannot be combined"
            )
        return [
            build_packed_sequences(
                prompts[s : s + m], completions[s : s + m], list(range(s, min(s + m, len(prompts))))
            )
            for s in range(0, len(completions), m)
        ]
    build = build_micro_batch
    if shared_prefix:
        check_whole_groups(micro_batch_size, num_generations)
        build = functools.partial(build_packed_micro_batch, group_size=num_generations)
    return [
        build(prompts[s : s + m], completions[s : s + m], slice(s, s + m), pad_id)
        for s in range(0, len(completions), m)
    ]


def first_fit_decreasing(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices into bins of at most ``budget`` tokens, longest first, each into the first bin it fits."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for b, load in enumerate(loads):
            if load + lengths[i] <= budget:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    return bins


def balanced_bins(lengths: Sequence[int], k: int, budget: int) -> list[list[int]]:
    """``k`` bins of at most ``budget`` tokens with loads as even as possible (longest sequence to the
    least loaded bin); falls back to first-fit-decreasing (plus empty bins) if that breaks the budget.
    Each bin's indices are sorted; empty bins come last."""
    bins: list[list[int]] = [[] for _ in range(k)]
    loads = [0] * k
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        b = min(range(k), key=lambda j: (loads[j], j))
        bins[b].append(i)
        loads[b] += lengths[i]
    if max(loads, default=0) > budget:
        bins = first_fit_decreasing(lengths, budget)
        bins += [[] for _ in range(k - len(bins))]
    bins = [sorted(b) for b in bins]
    return sorted(bins, key=lambda b: (not b, b[0] if b else 0))


def token_budget_bins(
    lengths: Sequence[int],
    budget: int,
    key: str = "batching.train_max_tokens",
    agree: Callable[[int], int] = lambda k: k,
) -> list[list[int]]:
    """Sequences (``lengths`` = prompt + completion tokens) into micro-batches of at most ``budget``
    tokens. The count is the fewest bins this rank needs (first-fit-decreasing), made equal over DP
    ranks by ``agree`` (an all-reduce MAX: every rank runs as many micro-batches, verl
    ``rearrange_micro_batches``); the sequences are then balanced over that many bins (a rank may
    get an empty one). A sequence longer than the budget is an error naming ``key``."""
    if budget < 1:
        raise ValueError(f"{key} must be >= 1 token, got {budget}")
    longest = max(lengths, default=0)
    if longest > budget:
        i = list(lengths).index(longest)
        raise ValueError(
            f"sequence {i} has {longest} tokens (prompt + completion), more than {key}={budget}: "
            f"set {key} >= {longest} (the longest row is at most max_prompt_length + max_completion_length)"
        )
    k = agree(len(first_fit_decreasing(lengths, budget)))
    return balanced_bins(lengths, max(k, 1), budget)


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
