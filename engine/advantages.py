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
) -> Tensor:
    """Per-completion advantages from group-contiguous rewards.

    Args:
        rewards: ``[N]`` total reward per completion, ``N = num_prompts * group_size``.
        group_size: completions per prompt (``G``, ``num_generations`` in TRL).
        scale_by_std: divide by the group's unbiased std plus ``eps`` (TRL);
            ``False`` gives Dr. GRPO's mean-centred advantage.
        baseline: ``"mean"`` (GRPO) or ``"leave_one_out"`` (RLOO).
        eps: added to the std before dividing.

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

    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    if n == 0:
        return torch.zeros(0, dtype=out_dtype, device=rewards.device)

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
