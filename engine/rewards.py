"""Reward functions of the open-rs recipe (quirks included), a registry, and a safe executor.

The math rewards reproduce ``knoveleng/open-rs`` ``src/open_r1/rewards.py`` (math-verify based);
see ``/work/shared/reference/open-rs-recipe.md`` section 1.5. Deliberate, documented deviations:

* ``gold_wrap`` (default on): our golds are bare answers ("27"), which math-verify's gold parse
  (``LatexExtractionConfig()``, needs a LaTeX anchor) returns ``[]`` for, and an unparseable gold
  scores 1.0 for *every* completion. The recipe's golds were full solutions containing
  ``\\boxed{}``; wrapping a bare gold as ``$...$`` restores the intended comparison.
* An exception inside a reward scores 0 and is counted (the recipe would crash in ``cosine`` and
  ``length``, which call ``verify`` outside a ``try``).

Per-item reward functions take ``(completion, gold, ...)`` and return a float; ``length`` is the
one group-level reward. :class:`RewardScorer` runs math-verify based rewards in a pool of
``spawn``/``forkserver`` worker processes, each task bounded by ``timeout_s``; a hung worker is
killed and replaced.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import logging
import math
import multiprocessing as mp
import multiprocessing.connection as mp_conn
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

logger = logging.getLogger(__name__)


class _DropEquationsDeprecation(logging.Filter):
    """latex2sympy2_extended logs a warning on *every* parse with ``equations=True``; the recipe
    passes it (and it still changes normalisation), so keep the flag and drop only that line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "equations=True in NormalizationConfig is deprecated" not in record.getMessage()


logging.getLogger("latex2sympy2_extended.math_normalization").addFilter(_DropEquationsDeprecation())


# --------------------------------------------------------------------------------------------
# math-verify helpers
# --------------------------------------------------------------------------------------------


def _mv_timeout(seconds: int) -> int | None:
    """math-verify's own timeouts use ``signal.alarm``, which raises outside the main thread;
    disable them there (the pool's process-level timeout is the real guard)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        return None
    return int(seconds)


def wrap_gold(gold: str) -> str:
    """Wrap a bare gold answer as ``$gold$`` unless it already has math delimiters or ``\\boxed``.

    math-verify's gold parse needs an anchor: ``"27"`` -> ``[]`` but ``"$27$"`` -> ``[27]``.
    Side effect: a free-text gold ("no answer") then parses as a product of symbols and scores 0
    for every completion instead of 1.0; both are constant per group (zero advantage).
    """
    g = gold.strip()
    if not g or any(tok in g for tok in ("$", "\\boxed", "\\(", "\\[")):
        return gold
    return f"${g}$"


def parse_gold(gold: str, *, gold_wrap: bool = True, timeout_s: int = 5) -> list:
    """Recipe gold parse: ``parse(sol, extraction_mode="first_match",
    extraction_config=[LatexExtractionConfig()])`` (after optional :func:`wrap_gold`)."""
    from math_verify import LatexExtractionConfig, parse

    return parse(
        wrap_gold(gold) if gold_wrap else gold,
        extraction_mode="first_match",
        extraction_config=[LatexExtractionConfig()],
        parsing_timeout=_mv_timeout(timeout_s),
    )


def parse_answer(content: str, *, boxed: str | bool = "all", timeout_s: int = 5) -> list:
    """Recipe completion parse (``boxed="all"`` for accuracy, ``boxed=True`` for cosine/length).

    Only anchored answers are extracted (``try_extract_without_anchor=False``), ``\\boxed`` first.
    """
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse

    config = LatexExtractionConfig(
        normalization_config=NormalizationConfig(
            nits=False,
            malformed_operators=False,
            basic_latex=True,
            equations=True,
            boxed=boxed,  # type: ignore[arg-type]  # recipe passes True for cosine
            units=True,
        ),
        boxed_match_priority=0,
        try_extract_without_anchor=False,
    )
    return parse(
        content,
        extraction_config=[config],
        extraction_mode="first_match",
        parsing_timeout=_mv_timeout(timeout_s),
    )


def answer_is_correct(
    completion: str,
    gold: str,
    *,
    boxed: str | bool = True,
    gold_wrap: bool = True,
    math_verify_timeout_s: int = 5,
) -> bool | None:
    """``verify(answer, gold)`` with the recipe's parses; ``None`` when the gold is unparseable.

    Argument order follows the recipe: the *answer* is passed as math-verify's ``gold``
    (``verify`` is not symmetric).
    """
    from math_verify import verify

    gold_parsed = parse_gold(gold, gold_wrap=gold_wrap, timeout_s=math_verify_timeout_s)
    if len(gold_parsed) == 0:
        return None
    answer_parsed = parse_answer(completion, boxed=boxed, timeout_s=math_verify_timeout_s)
    return bool(
        verify(
            answer_parsed,
            gold_parsed,
            timeout_seconds=_mv_timeout(math_verify_timeout_s),
        )
    )


# --------------------------------------------------------------------------------------------
# Reward functions
# --------------------------------------------------------------------------------------------


def accuracy_reward(
    completion: str,
    gold: str,
    *,
    gold_wrap: bool = True,
    math_verify_timeout_s: int = 5,
) -> float:
    """``float(verify(answer, gold))`` with ``boxed="all"``; verify exception -> 0.0;
    **unparseable gold -> 1.0** (recipe quirk: the example is effectively skipped)."""
    from math_verify import verify

    gold_parsed = parse_gold(gold, gold_wrap=gold_wrap, timeout_s=math_verify_timeout_s)
    if len(gold_parsed) == 0:
        return 1.0
    answer_parsed = parse_answer(completion, boxed="all", timeout_s=math_verify_timeout_s)
    try:
        return float(
            verify(
                answer_parsed,
                gold_parsed,
                timeout_seconds=_mv_timeout(math_verify_timeout_s),
            )
        )
    except Exception:  # recipe: any verify failure scores 0
        return 0.0


def format_reward(completion: str, gold: str = "") -> float:
    """``1.0 if completion.count("\\n</think>\\n") == 1 else 0.0``.

    Not a regex: ``<think>`` is not required (the R1-Distill chat template puts it in the prompt).
    """
    return 1.0 if completion.count("\n</think>\n") == 1 else 0.0


def tag_count_reward(completion: str, gold: str = "") -> float:
    """``0.5*[count("<think>\\n") == 1] + 0.5*[count("\\n</think>\\n") == 1]`` (open-rs version;
    no ``<answer>`` tags)."""
    reward = 0.0
    if completion.count("<think>\n") == 1:
        reward += 0.5
    if completion.count("\n</think>\n") == 1:
        reward += 0.5
    return reward


def cosine_scaled_value(
    length: float,
    is_correct: bool,
    *,
    max_len: int = 1000,
    min_value_wrong: float = 0.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
    clamp: bool = False,
) -> float:
    """Recipe cosine schedule for a given length.

    ``progress = length/max_len`` (unclamped unless ``clamp``), ``c = cos(pi*progress)``;
    correct: ``lo, hi = min_value_correct, max_value_correct``; wrong: the recipe *swaps* them,
    ``lo, hi = max_value_wrong, min_value_wrong``; ``r = lo + 0.5*(hi - lo)*(1 + c)``.
    With open-rs defaults: correct ``0.5 + 0.25*(1+c)`` (1.0 at 0, 0.5 at max_len, 1.0 again at
    2*max_len); wrong ``-0.5 + 0.25*(1+c)`` (0.0 at 0, -0.5 at max_len).
    """
    progress = length / max_len
    if clamp:
        progress = min(max(progress, 0.0), 1.0)
    cosine = math.cos(progress * math.pi)
    if is_correct:
        lo, hi = min_value_correct, max_value_correct
    else:
        lo, hi = max_value_wrong, min_value_wrong
    return float(lo + 0.5 * (hi - lo) * (1.0 + cosine))


def cosine_reward(
    completion: str,
    gold: str,
    *,
    num_tokens: int | None = None,
    max_len: int = 1000,
    min_value_wrong: float = 0.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
    length_unit: str = "chars",
    clamp: bool = False,
    gold_wrap: bool = True,
    math_verify_timeout_s: int = 5,
) -> float:
    """``get_cosine_scaled_reward``: correctness from math-verify (``boxed=True`` parse), length
    ``len(completion)`` in **characters** (``length_unit="tokens"`` uses ``num_tokens``), then
    :func:`cosine_scaled_value`. **Unparseable gold -> 1.0.**"""
    correct = answer_is_correct(
        completion,
        gold,
        boxed=True,
        gold_wrap=gold_wrap,
        math_verify_timeout_s=math_verify_timeout_s,
    )
    if correct is None:
        return 1.0
    if length_unit == "chars":
        length = len(completion)
    elif length_unit == "tokens":
        if num_tokens is None:
            raise ValueError("cosine length_unit='tokens' needs completion_lengths")
        length = num_tokens
    else:
        raise ValueError(f"cosine length_unit must be 'chars' or 'tokens', got {length_unit!r}")
    return cosine_scaled_value(
        length,
        correct,
        max_len=max_len,
        min_value_wrong=min_value_wrong,
        max_value_wrong=max_value_wrong,
        min_value_correct=min_value_correct,
        max_value_correct=max_value_correct,
        clamp=clamp,
    )


def length_group_rewards(lengths: Sequence[int], correct: Sequence[bool]) -> list[float]:
    """Kimi 1.5 ``len_reward`` on one group: ``lam = 0.5 - (len - min_len)/(max_len - min_len)``;
    correct -> ``lam``, wrong -> ``min(0, lam)``; all lengths equal -> all 0."""
    lo, hi = min(lengths), max(lengths)
    if hi == lo:
        return [0.0] * len(lengths)
    out = []
    for n, ok in zip(lengths, correct, strict=True):
        lam = 0.5 - (n - lo) / (hi - lo)
        out.append(float(lam if ok else min(0.0, lam)))
    return out


def length_reward(
    completions: Sequence[str],
    golds: Sequence[str],
    *,
    gold_wrap: bool = True,
    math_verify_timeout_s: int = 5,
) -> list[float]:
    """Group-level ``len_reward`` (lengths in characters; correctness with ``boxed=True``;
    unparseable gold counts as correct). See :func:`length_group_rewards`."""
    correct = [
        answer_is_correct(
            c,
            g,
            boxed=True,
            gold_wrap=gold_wrap,
            math_verify_timeout_s=math_verify_timeout_s,
        )
        is not False
        for c, g in zip(completions, golds, strict=True)
    ]
    return length_group_rewards([len(c) for c in completions], correct)


def repetition_reward(
    completion: str, gold: str = "", *, ngram_size: int = 3, max_penalty: float = -1.0
) -> float:
    """open-r1 ``get_repetition_penalty_reward``: words = ``completion.lower().split()``;
    ``(1 - unique_ngrams/total_ngrams) * max_penalty``; empty or fewer than ``ngram_size`` words
    -> 0."""
    if max_penalty > 0:
        raise ValueError(f"max_penalty {max_penalty} should not be positive")
    words = completion.lower().split()
    if completion == "" or len(words) < ngram_size:
        return 0.0
    ngrams = list(zip(*[words[i:] for i in range(ngram_size)], strict=False))
    return float((1 - len(set(ngrams)) / len(ngrams)) * max_penalty)


def exact_match_reward(completion: str, gold: str) -> float:
    """CPU demo task: ``1.0 if completion.strip() == gold.strip() else 0.0``."""
    return 1.0 if completion.strip() == gold.strip() else 0.0


REWARD_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "cosine": cosine_reward,
    "tag_count": tag_count_reward,
    "length": length_reward,
    "repetition": repetition_reward,
    "exact_match": exact_match_reward,
}
# Run in the worker pool (math-verify can hang); the rest are cheap and run inline.
_POOL_FUNCS = frozenset({"accuracy", "cosine", "length"})
_GROUP_FUNCS = frozenset({"length"})


# Test hooks, referenced by dotted path ("engine.rewards:_test_hook_sleep_forever") so that
# spawned workers can import them. Not registered.
def _test_hook_sleep_forever(completion: str, gold: str) -> float:
    while True:
        time.sleep(3600)


def _test_hook_raise(completion: str, gold: str) -> float:
    raise RuntimeError("test hook: reward raised")


def _test_hook_exit(completion: str, gold: str) -> float:
    os._exit(3)  # simulates a hard worker crash (segfault-like)


def resolve_reward(name: str) -> Callable[..., Any]:
    """A registry name, or a dotted path ``"package.module:function"`` for a custom per-item
    reward ``fn(completion, gold) -> float`` (importable by spawned workers)."""
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        fn = getattr(importlib.import_module(module), attr)
        if not callable(fn):
            raise TypeError(f"{name} is not callable")
        return fn
    raise KeyError(name)


# --------------------------------------------------------------------------------------------
# Config and result
# --------------------------------------------------------------------------------------------


@dataclass
class RewardConfig:
    """Reward settings (flat: the YAML loader reads dataclass fields).

    ``funcs`` entries are registry names (see ``REWARD_FUNCTIONS``) or dotted paths
    ``"module:function"``. ``timeout_s`` bounds each (function, completion) evaluation in the pool;
    ``num_workers=0`` runs everything inline (only math-verify's own timeouts apply).
    """

    funcs: list[str] = field(default_factory=lambda: ["accuracy", "format"])
    weights: list[float] | None = None  # None -> all 1.0; length must match funcs
    cosine_max_len: int = 1000
    cosine_min_value_wrong: float = 0.0
    cosine_max_value_wrong: float = -0.5
    cosine_min_value_correct: float = 0.5
    cosine_max_value_correct: float = 1.0
    cosine_length_unit: str = "chars"  # or "tokens" (uses completion_lengths)
    cosine_clamp: bool = False
    repetition_ngram_size: int = 3
    repetition_max_penalty: float = -1.0
    timeout_s: float = 10.0  # per completion per function
    num_workers: int = 1
    gold_wrap: bool = True  # wrap a bare gold as $...$ so math-verify can parse it
    math_verify_timeout_s: int = 5  # math-verify's own per-parse/verify alarm; <=0 disables
    start_method: str = "spawn"  # or "forkserver"; never fork (caller is multi-threaded)

    def __post_init__(self) -> None:
        self.funcs = list(self.funcs)
        valid = sorted(REWARD_FUNCTIONS)
        for name in self.funcs:
            if name in REWARD_FUNCTIONS:
                continue
            if ":" in name:
                try:
                    resolve_reward(name)
                except Exception as e:
                    raise ValueError(f"cannot import reward function {name!r}: {e!r}") from e
                continue
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"unknown reward function {name!r}.{hint} Valid names: {valid} "
                "(or a dotted path 'module:function')"
            )
        if len(set(self.funcs)) != len(self.funcs):
            raise ValueError(f"duplicate reward functions in {self.funcs}")
        if not self.funcs:
            raise ValueError("RewardConfig.funcs is empty")
        if self.weights is not None:
            self.weights = [float(w) for w in self.weights]
            if len(self.weights) != len(self.funcs):
                raise ValueError(
                    f"reward weights has length {len(self.weights)} but funcs has length "
                    f"{len(self.funcs)} ({self.funcs})"
                )
        if self.cosine_length_unit not in ("chars", "tokens"):
            raise ValueError(
                f"cosine_length_unit must be 'chars' or 'tokens', got {self.cosine_length_unit!r}"
            )
        if self.cosine_max_len <= 0:
            raise ValueError(f"cosine_max_len must be > 0, got {self.cosine_max_len}")
        if self.repetition_max_penalty > 0:
            raise ValueError(f"repetition_max_penalty must be <= 0, got {self.repetition_max_penalty}")
        if self.repetition_ngram_size < 1:
            raise ValueError(f"repetition_ngram_size must be >= 1, got {self.repetition_ngram_size}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.start_method not in ("spawn", "forkserver"):
            raise ValueError(f"start_method must be 'spawn' or 'forkserver', got {self.start_method!r}")

    @property
    def resolved_weights(self) -> list[float]:
        return list(self.weights) if self.weights is not None else [1.0] * len(self.funcs)


@dataclass
class RewardResult:
    total: list[float]  # sum_i w_i * r_i
    per_function: dict[str, list[float]]  # unweighted
    num_timeouts: int
    num_errors: int
    elapsed_s: float = 0.0


# --------------------------------------------------------------------------------------------
# Worker pool
# --------------------------------------------------------------------------------------------

# Private per-item task targets, addressable by name in the workers.
_TASK_TARGETS: dict[str, Callable[..., Any]] = {
    **REWARD_FUNCTIONS,
    "_answer_is_correct": answer_is_correct,
}


def _resolve_task(ref: str) -> Callable[..., Any]:
    return _TASK_TARGETS[ref] if ref in _TASK_TARGETS else resolve_reward(ref)


def _parent_alive(parent_pid: int, initial_ppid: int) -> bool:
    # Under forkserver the direct parent is the fork server, not the trainer: check both.
    if os.getppid() != initial_ppid:
        return False
    try:
        os.kill(parent_pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _watch_parent(parent_pid: int) -> None:
    # If the trainer is SIGKILLed while a task spins in C code, do not leave an orphan behind.
    initial_ppid = os.getppid()
    while True:
        time.sleep(2.0)
        if not _parent_alive(parent_pid, initial_ppid):
            os._exit(0)


def _worker_main(conn: mp_conn.Connection, parent_pid: int) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    # Warm up imports and math-verify's grammar so the first task is not billed for it.
    answer_is_correct("\\boxed{1}", "1")
    conn.send(("ready", None, None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        tid, ref, args, kwargs = msg
        try:
            value = _resolve_task(ref)(*args, **kwargs)
            conn.send((tid, True, value))
        # BaseException: math-verify's TimeoutException is one; the worker must survive it.
        except BaseException as e:
            conn.send((tid, False, f"{type(e).__name__}: {e}"))


class _Worker:
    def __init__(self, ctx: Any) -> None:
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=_worker_main,
            args=(child_conn, os.getpid()),
            daemon=True,
            name="reward-worker",
        )
        self.proc.start()
        child_conn.close()
        self.conn: mp_conn.Connection = parent_conn
        self.ready = False
        self.started_at = time.monotonic()
        self.task: int | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5.0)
        self.conn.close()


@dataclass
class _Outcome:
    status: str  # "ok" | "timeout" | "error"
    value: Any = None


class RewardWorkerPool:
    """Fixed-size pool of reward worker processes with per-task kill-on-timeout.

    ``concurrent.futures`` cannot cancel a running task, so each worker has its own pipe and
    the parent enforces deadlines; a timed-out or dead worker is killed and replaced (the
    replacement starts in the background and takes tasks once it reports ready).
    """

    def __init__(
        self,
        num_workers: int,
        start_method: str = "spawn",
        startup_timeout_s: float = 180.0,
    ) -> None:
        if num_workers < 1:
            raise ValueError("RewardWorkerPool needs num_workers >= 1")
        self._ctx = mp.get_context(start_method)
        self._startup_timeout_s = startup_timeout_s
        self._lock = threading.Lock()
        self._failed_starts = 0
        self._workers = [_Worker(self._ctx) for _ in range(num_workers)]
        self._closed = False

    @property
    def num_workers(self) -> int:
        return len(self._workers)

    def _replace(self, i: int) -> None:
        self._workers[i].kill()
        self._workers[i] = _Worker(self._ctx)

    def run(self, tasks: Sequence[tuple[str, tuple, dict]], timeout_s: float) -> list[_Outcome]:
        """Run ``(target, args, kwargs)`` tasks; each is bounded by ``timeout_s`` from dispatch."""
        with self._lock:
            if self._closed:
                raise RuntimeError("RewardWorkerPool is closed")
            return self._run(tasks, timeout_s)

    def _run(self, tasks: Sequence[tuple[str, tuple, dict]], timeout_s: float) -> list[_Outcome]:
        results: list[_Outcome | None] = [None] * len(tasks)
        pending = deque(range(len(tasks)))
        remaining = len(tasks)
        while remaining:
            now = time.monotonic()
            # Dispatch to idle, ready workers.
            for i, w in enumerate(self._workers):
                if pending and w.ready and w.task is None:
                    tid = pending.popleft()
                    try:
                        w.conn.send((tid, *tasks[tid]))
                    except (
                        OSError,
                        ValueError,
                    ):  # died while idle: retry on a fresh worker
                        pending.appendleft(tid)
                        self._replace(i)
                        continue
                    w.task, w.deadline = tid, now + timeout_s
            # Wait for a message or the nearest deadline.
            wait_until = [w.deadline for w in self._workers if w.task is not None]
            wait_until += [w.started_at + self._startup_timeout_s for w in self._workers if not w.ready]
            timeout = max(0.0, min(wait_until) - now) if wait_until else None
            ready_conns = mp_conn.wait([w.conn for w in self._workers], timeout=timeout)
            for i, w in enumerate(self._workers):
                if w.conn not in ready_conns:
                    continue
                try:
                    tid, ok, value = w.conn.recv()
                except (EOFError, OSError):  # worker died (crash, OOM kill, os._exit)
                    if w.task is not None:
                        results[w.task] = _Outcome("error", "worker process died")
                        remaining -= 1
                        self._failed_starts = 0
                    else:
                        self._failed_starts += 1
                        if self._failed_starts > 3:
                            raise RuntimeError(
                                "reward workers keep dying at startup "
                                f"(exitcode {w.proc.exitcode}); see their stderr"
                            ) from None
                    self._replace(i)
                    continue
                if tid == "ready":
                    w.ready = True
                    self._failed_starts = 0
                    continue
                if tid == w.task:
                    results[tid] = _Outcome("ok" if ok else "error", value)
                    remaining -= 1
                w.task = None
            # Enforce deadlines.
            now = time.monotonic()
            for i, w in enumerate(self._workers):
                if w.task is not None and now >= w.deadline:
                    results[w.task] = _Outcome("timeout")
                    remaining -= 1
                    logger.warning(
                        "reward task timed out after %.1fs; restarting worker",
                        timeout_s,
                    )
                    self._replace(i)
                elif not w.ready and now >= w.started_at + self._startup_timeout_s:
                    raise RuntimeError(f"reward worker did not start within {self._startup_timeout_s:.0f}s")
        return [r if r is not None else _Outcome("error") for r in results]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            asked = []
            for w in self._workers:
                if w.task is None:  # idle or starting: ask politely, a busy one gets killed
                    try:
                        w.conn.send(None)
                        asked.append(w)
                    except (OSError, ValueError):
                        pass
            deadline = time.monotonic() + 2.0
            for w in asked:
                w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            for w in self._workers:
                w.kill()


# --------------------------------------------------------------------------------------------
# Scorer
# --------------------------------------------------------------------------------------------


class RewardScorer:
    """Scores completions with the configured rewards.

    ``scorer(completions, golds, completion_lengths=None, group_size=1) -> RewardResult``.
    math-verify rewards and dotted-path rewards run in the pool (``num_workers > 0``); a crash
    or timeout scores 0 and is counted. Use as a context manager or call :meth:`close`.
    ``pool`` lets several scorers share one pool (its size then overrides ``num_workers``).
    """

    def __init__(self, config: RewardConfig, pool: RewardWorkerPool | None = None) -> None:
        self.config = config
        self.weights = config.resolved_weights
        self._owns_pool = pool is None
        needs_pool = any(f in _POOL_FUNCS or f not in REWARD_FUNCTIONS for f in config.funcs)
        if pool is None and needs_pool and config.num_workers > 0:
            pool = RewardWorkerPool(config.num_workers, config.start_method)
        self._pool = pool if needs_pool else None
        if not needs_pool and pool is not None:
            self._owns_pool = False

    # -- task construction ------------------------------------------------------------------

    def _mv_kwargs(self) -> dict[str, Any]:
        c = self.config
        return {
            "gold_wrap": c.gold_wrap,
            "math_verify_timeout_s": c.math_verify_timeout_s,
        }

    def _item_task(
        self, name: str, completion: str, gold: str, num_tokens: int | None
    ) -> tuple[str, tuple, dict]:
        c = self.config
        if name == "accuracy":
            return name, (completion, gold), self._mv_kwargs()
        if name == "cosine":
            kwargs = {
                "num_tokens": num_tokens,
                "max_len": c.cosine_max_len,
                "min_value_wrong": c.cosine_min_value_wrong,
                "max_value_wrong": c.cosine_max_value_wrong,
                "min_value_correct": c.cosine_min_value_correct,
                "max_value_correct": c.cosine_max_value_correct,
                "length_unit": c.cosine_length_unit,
                "clamp": c.cosine_clamp,
                **self._mv_kwargs(),
            }
            return name, (completion, gold), kwargs
        if name == "length":  # per-item part: correctness; combined per group afterwards
            return (
                "_answer_is_correct",
                (completion, gold),
                {"boxed": True, **self._mv_kwargs()},
            )
        if name == "repetition":
            kwargs = {
                "ngram_size": c.repetition_ngram_size,
                "max_penalty": c.repetition_max_penalty,
            }
            return name, (completion, gold), kwargs
        return name, (completion, gold), {}

    # -- scoring ----------------------------------------------------------------------------

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
        if (
            "cosine" in self.config.funcs
            and self.config.cosine_length_unit == "tokens"
            and completion_lengths is None
        ):
            raise ValueError("cosine_length_unit='tokens' needs completion_lengths")
        if "length" in self.config.funcs and (group_size < 1 or n % group_size):
            raise ValueError(f"{n} completions is not a multiple of group_size={group_size}")
        lengths = completion_lengths if completion_lengths is not None else [None] * n

        # Build every (function, item) task; outcomes[f][i] is filled inline or by the pool.
        outcomes: dict[str, list[_Outcome | None]] = {f: [None] * n for f in self.config.funcs}
        pooled: list[tuple[str, int]] = []
        pooled_tasks: list[tuple[str, tuple, dict]] = []
        for f in self.config.funcs:
            use_pool = self._pool is not None and (f in _POOL_FUNCS or f not in REWARD_FUNCTIONS)
            for i in range(n):
                task = self._item_task(f, completions[i], golds[i], lengths[i])
                if use_pool:
                    pooled.append((f, i))
                    pooled_tasks.append(task)
                else:
                    outcomes[f][i] = _run_inline(*task)
        if pooled_tasks:
            assert self._pool is not None
            for (f, i), out in zip(pooled, self._pool.run(pooled_tasks, self.config.timeout_s), strict=True):
                outcomes[f][i] = out

        per_function: dict[str, list[float]] = {}
        num_timeouts = num_errors = 0
        for f in self.config.funcs:
            outs = [_checked(o, f in _GROUP_FUNCS) for o in outcomes[f]]
            num_timeouts += sum(o.status == "timeout" for o in outs)
            num_errors += sum(o.status == "error" for o in outs)
            if f in _GROUP_FUNCS:
                per_function[f] = self._length_from_correctness(completions, outs, group_size)
            else:
                per_function[f] = [float(o.value) if o.status == "ok" else 0.0 for o in outs]
        total = [
            sum(w * per_function[f][i] for f, w in zip(self.config.funcs, self.weights, strict=True))
            for i in range(n)
        ]
        return RewardResult(
            total=total,
            per_function=per_function,
            num_timeouts=num_timeouts,
            num_errors=num_errors,
            elapsed_s=time.monotonic() - t0,
        )

    @staticmethod
    def _length_from_correctness(
        completions: list[str], outs: list[_Outcome], group_size: int
    ) -> list[float]:
        # Unparseable gold (None) counts as correct, as in the recipe; a failed check scores 0
        # for that item while the rest of the group keeps its group-relative reward.
        rewards = [0.0] * len(completions)
        for start in range(0, len(completions), group_size):
            idx = range(start, start + group_size)
            group = length_group_rewards(
                [len(completions[i]) for i in idx],
                [outs[i].status == "ok" and outs[i].value is not False for i in idx],
            )
            for i, r in zip(idx, group, strict=True):
                rewards[i] = r if outs[i].status == "ok" else 0.0
        return rewards

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


def _run_inline(ref: str, args: tuple, kwargs: dict) -> _Outcome:
    try:
        return _Outcome("ok", _resolve_task(ref)(*args, **kwargs))
    except Exception as e:  # any reward bug scores 0 and is counted
        logger.warning("reward %s raised %s: %s", ref, type(e).__name__, e)
        return _Outcome("error", f"{type(e).__name__}: {e}")


def _checked(o: _Outcome | None, group: bool) -> _Outcome:
    """Turn a missing or non-numeric result into an error (a custom reward returning junk)."""
    if o is None:
        return _Outcome("error", "no result")
    if o.status != "ok" or group:  # group tasks return bool | None (correctness)
        return o
    try:
        value = float(o.value)
    except (TypeError, ValueError):
        return _Outcome("error", f"non-numeric reward {o.value!r}")
    if math.isnan(value):
        return _Outcome("error", "NaN reward")
    return _Outcome("ok", value)
