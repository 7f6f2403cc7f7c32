"""``RewardConfig``: the ``rewards:`` section of a training config."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Literal

from engine.config import check_literals
from engine.rewards.registry import RewardSpec, params_from, resolve_reward

__all__ = ["RewardConfig"]


@dataclass
class RewardConfig:
    """Which rewards, their weights and parameters, and how they run.

    ``funcs`` entries are registry names (``engine.rewards.REWARDS``) or dotted paths
    ``"module:function"``; the total reward is ``sum_i weights[i] * r_i``. ``params`` maps a reward
    name to its parameter dataclass's fields (``params: {cosine: {max_len: 3584}}``, or the override
    ``rewards.params.cosine.max_len=3584``); after construction it holds one parameter dataclass per
    reward in ``funcs`` that has one, defaults filled in. ``timeout_s`` bounds each (reward,
    completion) evaluation in the pool; ``num_workers=0`` runs everything inline (only math-verify's
    own timeouts apply).
    """

    funcs: list[str] = field(default_factory=lambda: ["accuracy", "format"])
    weights: list[float] | None = None  # None -> all 1.0; length must match funcs
    params: dict[str, dict[str, Any]] = field(default_factory=dict)  # per reward name (see above)
    # A reward that times out or raises: "zero" scores it 0 and keeps it in its group's mean/std
    # (the open-rs recipe); "exclude" (TRL: NaN + nanmean/nanstd) leaves the completion out of its
    # group's statistics and out of the loss, with advantage 0. Failures are counted either way.
    on_failure: Literal["zero", "exclude"] = "zero"
    timeout_s: float = 10.0  # per completion per function
    num_workers: int = 1
    gold_wrap: bool = True  # wrap a bare gold as $...$ so math-verify can parse it
    math_verify_timeout_s: int = 5  # math-verify's own per-parse/verify alarm; <=0 disables
    start_method: Literal["spawn", "forkserver"] = "spawn"  # never fork: the trainer is multi-threaded

    def __post_init__(self) -> None:
        check_literals(self, "rewards")
        self.funcs = list(self.funcs)
        if not self.funcs:
            raise ValueError("rewards.funcs is empty")
        if len(set(self.funcs)) != len(self.funcs):
            raise ValueError(f"duplicate reward functions in rewards.funcs {self.funcs}")
        specs = [resolve_reward(f) for f in self.funcs]
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(
                f"rewards.funcs {self.funcs} name two rewards {names}: metric names must be unique "
                "(rename one of the functions)"
            )
        unknown = sorted(set(self.params) - set(self.funcs) - set(names))
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"rewards.params has {unknown} but rewards.funcs is {self.funcs}: "
                f"params are for the rewards in funcs only.{hint}"
            )
        resolved: dict[str, Any] = {}
        for f, s in zip(self.funcs, specs, strict=True):
            p = params_from(s, self.params.get(s.name, self.params.get(f)), f"rewards.params.{s.name}")
            if p is not None:
                resolved[s.name] = p
        self.params = resolved
        if self.weights is not None:
            self.weights = [float(w) for w in self.weights]
            if len(self.weights) != len(self.funcs):
                raise ValueError(
                    f"reward weights has length {len(self.weights)} but funcs has length "
                    f"{len(self.funcs)} ({self.funcs})"
                )
        if self.timeout_s <= 0:
            raise ValueError(f"rewards.timeout_s must be > 0, got {self.timeout_s}")
        if self.num_workers < 0:
            raise ValueError(f"rewards.num_workers must be >= 0, got {self.num_workers}")

    @property
    def specs(self) -> list[RewardSpec]:
        """The registry entry of each ``funcs`` item, in order."""
        return [resolve_reward(f) for f in self.funcs]

    @property
    def resolved_weights(self) -> list[float]:
        return list(self.weights) if self.weights is not None else [1.0] * len(self.funcs)
