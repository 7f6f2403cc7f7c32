"""The open-rs recipe's rewards (quirks included), registered by name.

Reproduces ``knoveleng/open-rs`` (2889c47) ``src/open_r1/rewards.py`` with the defaults of its
``src/open_r1/grpo.py``; answer parsing is in :mod:`engine.rewards.math_answers`.

* ``format``: ``1.0 if completion.count("\\n</think>\\n") == 1``; not a regex, ``<think>`` not
  required (the R1-Distill chat template puts it in the generation prompt).
* ``accuracy``: ``float(verify(answer, gold))`` with ``boxed="all"``; a verify exception scores 0;
  **an unparseable gold scores 1.0** (the example is effectively skipped).
* ``cosine`` (``get_cosine_scaled_reward``, Exp 3 with weight 2 next to ``format``): open-rs changed
  open-r1's defaults to min/max value wrong 0.0 / -0.5, correct 0.5 / 1.0, ``max_len`` 1000 (3584
  for Exp 3). Traps kept on purpose: the length is ``len(content)`` in **characters**, progress is
  **not clamped** (a correct answer of 2 x max_len characters scores 1.0 again), and for wrong
  answers the recipe swaps min and max, so long wrong answers are penalised *more*.
* ``tag_count``, ``length`` (Kimi 1.5), ``repetition`` (open-r1): defined in the recipe, unused in
  its runs. ``exact_match``: string equality, for toy tasks.

Deviation: a reward that raises scores 0 and is counted (the recipe would crash in ``cosine`` and
``length``, which call ``verify`` outside a ``try``); ``rewards.on_failure`` decides what a failed
score does to the advantages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from engine.config import check_literals
from engine.rewards.math_answers import answer_is_correct, mv_timeout, parse_answer, parse_gold
from engine.rewards.registry import RewardSpec, register, register_reward

__all__ = [
    "CosineParams",
    "RepetitionParams",
    "accuracy_reward",
    "cosine_reward",
    "cosine_scaled_value",
    "exact_match_reward",
    "format_reward",
    "length_group_rewards",
    "length_reward",
    "repetition_reward",
    "tag_count_reward",
]


@dataclass
class CosineParams:
    """``rewards.params.cosine`` (open-rs defaults; Exp 3 sets ``max_len: 3584``)."""

    max_len: int = 1000
    min_value_wrong: float = 0.0
    max_value_wrong: float = -0.5
    min_value_correct: float = 0.5
    max_value_correct: float = 1.0
    length_unit: Literal["chars", "tokens"] = "chars"  # recipe: characters of the decoded text
    clamp: bool = False  # recipe: progress unclamped (the cosine wraps past max_len)

    def __post_init__(self) -> None:
        check_literals(self, "rewards.params.cosine")
        if self.max_len <= 0:
            raise ValueError(f"rewards.params.cosine.max_len must be > 0, got {self.max_len}")

    @property
    def uses_num_tokens(self) -> bool:
        return self.length_unit == "tokens"


@dataclass
class RepetitionParams:
    """``rewards.params.repetition`` (open-r1 ``get_repetition_penalty_reward``)."""

    ngram_size: int = 3
    max_penalty: float = -1.0

    def __post_init__(self) -> None:
        if self.ngram_size < 1:
            raise ValueError(f"rewards.params.repetition.ngram_size must be >= 1, got {self.ngram_size}")
        if self.max_penalty > 0:
            raise ValueError(f"rewards.params.repetition.max_penalty must be <= 0, got {self.max_penalty}")


@register_reward("format")
def format_reward(completion: str, gold: str = "") -> float:
    """``1.0 if completion.count("\\n</think>\\n") == 1 else 0.0``."""
    return 1.0 if completion.count("\n</think>\n") == 1 else 0.0


@register_reward("tag_count")
def tag_count_reward(completion: str, gold: str = "") -> float:
    """``0.5*[count("<think>\\n") == 1] + 0.5*[count("\\n</think>\\n") == 1]`` (open-rs version;
    no ``<answer>`` tags)."""
    reward = 0.0
    if completion.count("<think>\n") == 1:
        reward += 0.5
    if completion.count("\n</think>\n") == 1:
        reward += 0.5
    return reward


@register_reward("accuracy", pooled=True)
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
        return float(verify(answer_parsed, gold_parsed, timeout_seconds=mv_timeout(math_verify_timeout_s)))
    except Exception:  # recipe: any verify failure scores 0
        return 0.0


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


@register_reward("cosine", params=CosineParams, pooled=True)
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
        completion, gold, boxed=True, gold_wrap=gold_wrap, math_verify_timeout_s=math_verify_timeout_s
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


def length_from_correctness(
    completions: Sequence[str], correct: Sequence[Any], failed: Sequence[bool]
) -> list[float]:
    """``length``'s group step. Lengths in characters; an unparseable gold (``None``) counts as
    correct, as in the recipe; a failed check counts as wrong and scores 0 while the rest of the
    group keeps its group-relative reward."""
    ok = [not f and c is not False for c, f in zip(correct, failed, strict=True)]
    rewards = length_group_rewards([len(c) for c in completions], ok)
    return [0.0 if f else r for r, f in zip(rewards, failed, strict=True)]


# Per completion: correctness (pooled: math-verify); per group: the length reward.
register(RewardSpec("length", answer_is_correct, pooled=True, group=length_from_correctness))


def length_reward(
    completions: Sequence[str],
    golds: Sequence[str],
    *,
    gold_wrap: bool = True,
    math_verify_timeout_s: int = 5,
) -> list[float]:
    """Group-level ``len_reward`` on one group, inline (what the scorer computes for ``length``)."""
    correct = [
        answer_is_correct(c, g, boxed=True, gold_wrap=gold_wrap, math_verify_timeout_s=math_verify_timeout_s)
        for c, g in zip(completions, golds, strict=True)
    ]
    return length_from_correctness(completions, correct, [False] * len(completions))


@register_reward("repetition", params=RepetitionParams)
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


@register_reward("exact_match")
def exact_match_reward(completion: str, gold: str) -> float:
    """``1.0 if completion.strip() == gold.strip() else 0.0`` (toy tasks)."""
    return 1.0 if completion.strip() == gold.strip() else 0.0
