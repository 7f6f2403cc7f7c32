"""The one seed formula: every per-step, per-rank, per-prompt random stream is ``derive_seed(...)``.

SplitMix64 over the parts, so nearby inputs (step 3 vs 4, DP rank 0 vs 1) give unrelated streams and
no two streams collide by arithmetic (``seed * K + step`` does). 62 bits leave room for vLLM's child
seeds ``seed + j``.
"""

from __future__ import annotations


def derive_seed(*parts: int) -> int:
    """A 62-bit seed from a tuple of ints (order matters)."""
    h = 0x9E3779B97F4A7C15
    for x in parts:
        h = (h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & ((1 << 62) - 1)


def step_seed(run_seed: int, step: int) -> int:
    """The rollout sampling seed of a training step: a resumed run draws what an uninterrupted one would."""
    return derive_seed(run_seed, step)
