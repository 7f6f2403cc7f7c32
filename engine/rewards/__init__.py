"""Rewards: the open-rs reward functions, a registry, and a timeout-bounded scorer.

==================  ===========================================================================
``math_answers``    answer parsing and checking with math-verify, as the recipe calls it
``open_rs``         the recipe's rewards (``accuracy``, ``format``, ``cosine``, ...), registered
``registry``        :class:`RewardSpec`, :func:`register_reward`, :data:`REWARDS`
``config``          :class:`RewardConfig` (the ``rewards:`` config section)
``pool``            :class:`RewardWorkerPool`: worker processes, per-task timeouts, crash recovery
``scorer``          :class:`RewardScorer` -> :class:`RewardResult` (totals, per reward, failures)
==================  ===========================================================================

Importing this package imports neither torch nor math-verify (loaded on first use).
"""

from engine.rewards.config import RewardConfig
from engine.rewards.math_answers import answer_is_correct, mv_timeout, parse_answer, parse_gold, wrap_gold
from engine.rewards.open_rs import (
    CosineParams,
    RepetitionParams,
    accuracy_reward,
    cosine_reward,
    cosine_scaled_value,
    exact_match_reward,
    format_reward,
    length_group_rewards,
    length_reward,
    repetition_reward,
    tag_count_reward,
)
from engine.rewards.pool import RewardWorkerPool
from engine.rewards.registry import REWARDS, RewardSpec, register, register_reward, resolve_reward
from engine.rewards.scorer import RewardResult, RewardScorer

__all__ = [
    "REWARDS",
    "CosineParams",
    "RepetitionParams",
    "RewardConfig",
    "RewardResult",
    "RewardScorer",
    "RewardSpec",
    "RewardWorkerPool",
    "accuracy_reward",
    "answer_is_correct",
    "cosine_reward",
    "cosine_scaled_value",
    "exact_match_reward",
    "format_reward",
    "length_group_rewards",
    "length_reward",
    "mv_timeout",
    "parse_answer",
    "parse_gold",
    "register",
    "register_reward",
    "repetition_reward",
    "resolve_reward",
    "tag_count_reward",
    "wrap_gold",
]
