"""Misbehaving rewards for the pool tests, named by dotted path (``reward_hooks:sleep_forever``).

Spawned reward workers inherit the parent's ``sys.path`` (pytest puts ``tests/`` on it, see
``pythonpath`` in pyproject.toml), so they can import this module.
"""

from __future__ import annotations

import os
import time

from tools.demo_task import demo_exact  # noqa: F401  # a second path to a function of that name


def sleep_forever(completion: str, gold: str) -> float:
    while True:
        time.sleep(3600)


def raise_error(completion: str, gold: str) -> float:
    raise RuntimeError("test hook: reward raised")


def exit_process(completion: str, gold: str) -> float:
    os._exit(3)  # a hard worker crash (segfault-like)


def fail_on_x(completion: str, gold: str) -> float:
    """1.0, except a completion containing "x" raises (a failure on chosen completions)."""
    if "x" in completion:
        raise RuntimeError("test hook: x")
    return 1.0


def digit_sum_fail_on_odd(completion: str, gold: str) -> float:
    """The sum of the completion's digits; raises when it ends with an odd digit (trainer test)."""
    text = completion.strip()
    if text and text[-1] in "13579":
        raise RuntimeError("test hook: odd digit")
    return float(sum(int(c) for c in text if c.isdigit()))
