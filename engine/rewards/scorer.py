"""``RewardScorer``: every configured reward on a batch of completions -> ``RewardResult``."""

from __future__ import annotations

import contextlib
import logging
import math
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

from engine.rewards.config import RewardConfig
from engine.rewards.pool import Outcome, RewardWorkerPool, run_task
from engine.rewards.registry import RewardSpec

__all__ = ["RewardResult", "RewardScorer"]

logger = logging.getLogger(__name__)


@dataclass
class RewardResult:
    """One batch's rewards (picklable: broadcast to the TP peers with ``broadcast_object``)."""

    total: list[float]  # sum_i w_i * r_i; a failed reward contributes 0
    per_function: dict[str, list[float]]  # unweighted, by registry name (metric reward/<name>/mean)
    num_timeouts: int
    num_errors: int
    elapsed_s: float = 0.0
    failed: list[bool] | None = None  # per completion: some reward timed out or raised


class RewardScorer:
    """Scores completions with the configured rewards.

    ``scorer(completions, golds, completion_lengths=None, group_size=1) -> RewardResult``.
    Pooled rewards (math-verify, dotted paths) run in the worker pool when ``num_workers > 0``;
    a crash or timeout scores 0, marks the completion failed and is counted. Use as a context
    manager or call :meth:`close`. ``pool`` lets several scorers share one pool (its size then
    overrides ``num_workers``).
    """

    def __init__(self, config: RewardConfig, pool: RewardWorkerPool | None = None) -> None:
        self.config = config
        self.weights = config.resolved_weights
        self.specs: list[RewardSpec] = config.specs
        context = {"gold_wrap": config.gold_wrap, "math_verify_timeout_s": config.math_verify_timeout_s}
        self._fns: list[Callable[..., Any]] = [
            s.bind(config.params.get(s.name), **context) for s in self.specs
        ]
        self._uses_tokens = [
            s.name for s in self.specs if getattr(config.params.get(s.name), "uses_num_tokens", False)
        ]
        self._owns_pool = pool is None
        needs_pool = any(s.pooled for s in self.specs)
        if needs_pool and (pool is not None or config.num_workers > 0):
            for s, fn in zip(self.specs, self._fns, strict=True):
                if s.pooled:
                    _check_picklable(s, fn)
        if pool is None and needs_pool and config.num_workers > 0:
            pool = RewardWorkerPool(config.num_workers, config.start_method)
        self._pool = pool if needs_pool else None
        if not needs_pool and pool is not None:
            self._owns_pool = False

    def __call__(
        self,
        completions: list[str],
        golds: list[str],
        completion_lengths: list[int] | None = None,
        group_size: int = 1,
    ) -> RewardResult:
        t0 = time.monotonic()
        n = len(completions)
        if len(golds) != n:
            raise ValueError(f"{n} completions but {len(golds)} golds")
        if completion_lengths is not None and len(completion_lengths) != n:
            raise ValueError(f"{n} completions but {len(completion_lengths)} completion_lengths")
        if self._uses_tokens and completion_lengths is None:
            raise ValueError(f"rewards {self._uses_tokens} with length_unit='tokens' need completion_lengths")
        if any(s.group for s in self.specs) and (group_size < 1 or n % group_size):
            raise ValueError(f"{n} completions is not a multiple of group_size={group_size}")

        # Every (reward, completion) task; outcomes[k][i] is filled inline or by the pool.
        outcomes: list[list[Outcome | None]] = [[None] * n for _ in self.specs]
        pooled: list[tuple[int, int]] = []
        pooled_tasks: list[tuple[Callable[..., Any], tuple, dict]] = []
        for k, (spec, fn) in enumerate(zip(self.specs, self._fns, strict=True)):
            for i in range(n):
                takes_tokens = completion_lengths is not None and "num_tokens" in spec.context
                kwargs = {"num_tokens": completion_lengths[i]} if takes_tokens else {}
                task = (fn, (completions[i], golds[i]), kwargs)
                if self._pool is not None and spec.pooled:
                    pooled.append((k, i))
                    pooled_tasks.append(task)
                else:
                    outcomes[k][i] = _run_inline(spec.name, *task)
        if pooled_tasks:
            assert self._pool is not None
            for (k, i), out in zip(pooled, self._pool.run(pooled_tasks, self.config.timeout_s), strict=True):
                outcomes[k][i] = out

        per_function: dict[str, list[float]] = {}
        failed = [False] * n
        num_timeouts = num_errors = 0
        for spec, outs_k in zip(self.specs, outcomes, strict=True):
            outs = [_checked(o, numeric=spec.group is None) for o in outs_k]
            num_timeouts += sum(o.status == "timeout" for o in outs)
            num_errors += sum(o.status == "error" for o in outs)
            bad = [o.status != "ok" for o in outs]
            failed = [f or b for f, b in zip(failed, bad, strict=True)]
            if spec.group is not None:
                rewards = []
                for s in range(0, n, group_size):
                    g = slice(s, s + group_size)
                    rewards += spec.group(completions[g], [o.value for o in outs[g]], bad[g])
            else:
                rewards = [o.value for o in outs]
            per_function[spec.name] = [0.0 if b else float(r) for r, b in zip(rewards, bad, strict=True)]
        total = [
            sum(w * per_function[s.name][i] for s, w in zip(self.specs, self.weights, strict=True))
            for i in range(n)
        ]
        return RewardResult(
            total=total,
            per_function=per_function,
            num_timeouts=num_timeouts,
            num_errors=num_errors,
            elapsed_s=time.monotonic() - t0,
            failed=failed,
        )

    def close(self) -> None:
        if self._pool is not None and self._owns_pool:
            self._pool.close()
        self._pool = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: modules may be gone
            self.close()


def _check_picklable(spec: RewardSpec, fn: Callable[..., Any]) -> None:
    try:
        pickle.dumps(fn)
    except Exception as e:
        raise ValueError(
            f"reward {spec.name!r} runs in the worker pool, so its function must be picklable "
            f"(a module-level function, not a closure or lambda): {type(e).__name__}: {e}"
        ) from e


def _run_inline(name: str, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Outcome:
    try:
        return Outcome("ok", run_task(fn, args, kwargs))
    except Exception as e:  # any reward bug scores 0 and is counted
        logger.warning("reward %s raised %s: %s", name, type(e).__name__, e)
        return Outcome("error", f"{type(e).__name__}: {e}")


def _checked(o: Outcome | None, numeric: bool) -> Outcome:
    """Turn a missing or non-numeric result into an error (a custom reward returning junk)."""
    if o is None:
        return Outcome("error", "no result")
    if o.status != "ok" or not numeric:  # a group reward's per-item values are its own business
        return o
    try:
        value = float(o.value)
    except (TypeError, ValueError):
        return Outcome("error", f"non-numeric reward {o.value!r}")
    if math.isnan(value):
        return Outcome("error", "NaN reward")
    return Outcome("ok", value)
