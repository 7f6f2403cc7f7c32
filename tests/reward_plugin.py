"""A reward added the way a user adds one: a single registration (see test_rewards.py).

Imported by a dotted path in ``rewards.funcs`` (``reward_plugin:scaled_length``), which registers
it; spawned pool workers import it again when they unpickle the bound function.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.rewards import register_reward


@dataclass
class ScaledLengthParams:
    scale: float = 1.0
    offset: int = 0


@register_reward("scaled_length", params=ScaledLengthParams, pooled=True)
def scaled_length(
    completion: str, gold: str, *, scale: float = 1.0, offset: int = 0, num_tokens: int | None = None
) -> float:
    """``scale * (num_tokens + offset)`` (characters when no token counts are given)."""
    return scale * ((len(completion) if num_tokens is None else num_tokens) + offset)
