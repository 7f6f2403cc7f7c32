"""Group-relative advantages for GRPO.

Rewards are laid out group-contiguous: prompt ``i``'s ``G`` completions occupy
``rewards[i*G:(i+1)*G]``. Each group is normalised on its own.

* TRL / DeepSeekMath GRPO (the open-rs default)::

      A_i = (r_i - mean_g) / (std_g + eps)       # torch's unbiased std, eps = 1e-4

* Dr. GRPO (``scale_by_std=False``)::

      A_i = r_i - mean_g

* RLOO (``baseline="leave_one_out"``): the baseline is the mean of the *other*
  ``G - 1`` rewards in the group::

      A_i = r_i - (sum_g - r_i) / (G - 1)  =  G / (G - 1) * (r_i - mean_g)

  optionally divided by ``std_g + eps`` when ``scale_by_std`` is set.

A group whose rewards are all equal (including every group when ``G == 1``) gets
an advantage of exactly ``0``: never ``NaN``, never float round-off noise.

``valid`` (``rewards.on_failure=exclude``; TRL records a failed reward as NaN and uses
nanmean/nanstd): a completion whose reward failed gets advantage ``0`` and is left out of its
group's mean, std and leave-one-out baseline, so the others get exactly the advantages of a
group of ``G_valid`` completions. A group with fewer than two valid completions gets ``0``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["BASELINES", "group_advantages"]

BASELINES = ("mean", "leave_one_out")


def group_advantages(
    rewards: Tensor,
    group_size: int,
    *,
    scale_by_std: bool = True,
    baseline: Literal["mean", "leave_one_out"] = "mean",
    eps: float = 1e-4,
    valid: Tensor | None = None,
) -> Tensor:
    """Per-completion advantages from group-contiguous rewards.

    Args:
        rewards: ``[N]`` total reward per completion, ``N = num_prompts * group_size``.
        group_size: completions per prompt (``G``, ``num_generations`` in TRL).
        scale_by_std: divide by the group's unbiased std plus ``eps`` (TRL);
            ``False`` gives Dr. GRPO's mean-centred advantage.
        baseline: ``"mean"`` (GRPO) or ``"leave_one_out"`` (RLOO).
        eps: added to the std before dividing.
        valid: optional ``[N]`` bool mask; ``False`` completions (a failed reward) get ``0`` and
            do not count in their group's statistics. ``None`` or all ``True``: every completion.

    Returns:
        ``[N]`` advantages in the input's floating dtype (``float32`` for integer
        or bool rewards). Computed internally in float64.
    """
    if not isinstance(rewards, Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    n = rewards.numel()
    if n % group_size != 0:
        raise ValueError(
            f"number of rewards N={n} is not divisible by group_size={group_size}; "
            "rewards must hold group_size completions for every prompt, group-contiguous"
        )
    if baseline not in BASELINES:
        raise ValueError(f"baseline={baseline!r} is invalid; valid options: {list(BASELINES)}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if valid is not None:
        if not isinstance(valid, Tensor) or valid.dtype != torch.bool or valid.shape != rewards.shape:
            got = f"{valid.dtype} {tuple(valid.shape)}" if isinstance(valid, Tensor) else type(valid).__name__
            raise ValueError(f"valid must be a bool tensor of shape {tuple(rewards.shape)}, got {got}")
        if bool(valid.all()):
            valid = None  # the plain path: bit-identical to no mask

    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    if n == 0:
        return torch.zeros(0, dtype=out_dtype, device=rewards.device)

    if valid is not None:
        return _masked_group_advantages(rewards, valid, group_size, scale_by_std, baseline, eps, out_dtype)

    r = rewards.detach().to(torch.float64).view(-1, group_size)  # [P, G]
    mean = r.mean(dim=1, keepdim=True)
    if baseline == "mean":
        adv = r - mean
    else:
        if group_size == 1:
            adv = torch.zeros_like(r)  # no "others" to form a baseline from
        else:
            others_mean = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)
            adv = r - others_mean

    if scale_by_std and group_size > 1:
        std = r.std(dim=1, keepdim=True, unbiased=True)
        adv = adv / (std + eps)

    # Constant groups (and G == 1, whose torch std is NaN) give exactly zero.
    constant = (r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)) | (group_size == 1)
    adv = torch.where(constant, torch.zeros_like(adv), adv)
    return adv.reshape(-1).to(out_dtype)


def _masked_group_advantages(
    rewards: Tensor,
    valid: Tensor,
    group_size: int,
    scale_by_std: bool,
    baseline: str,
    eps: float,
    out_dtype: torch.dtype,
) -> Tensor:
    """:func:`group_advantages` over each group's valid members only (others: exactly 0)."""
    m = valid.to(rewards.device).view(-1, group_size)  # [P, G]
    w = m.to(torch.float64)
    r = torch.where(m, rewards.detach().to(torch.float64).view(-1, group_size), 0.0)
    k = w.sum(dim=1, keepdim=True)  # valid members per group
    total = r.sum(dim=1, keepdim=True)
    mean = total / k.clamp(min=1.0)
    if baseline == "mean":
        adv = r - mean
    else:
        adv = r - (total - r) / (k - 1.0).clamp(min=1.0)
    if scale_by_std:
        var = (((r - mean) * w) ** 2).sum(dim=1, keepdim=True) / (k - 1.0).clamp(min=1.0)
        adv = adv / (var.sqrt() + eps)
    big = torch.finfo(torch.float64).max
    hi = torch.where(m, r, -big).amax(dim=1, keepdim=True)
    lo = torch.where(m, r, big).amin(dim=1, keepdim=True)
    constant = (hi == lo) | (k < 2)
    adv = torch.where(constant | ~m, torch.zeros_like(adv), adv)
    return adv.reshape(-1).to(out_dtype)
