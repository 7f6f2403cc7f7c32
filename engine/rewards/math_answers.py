"""Answer parsing and checking with math-verify, exactly as the open-rs recipe calls it.

The recipe (``knoveleng/open-rs`` at 2889c47, ``src/open_r1/rewards.py``; ``math-verify==0.5.2``)
parses the gold with ``parse(sol, extraction_mode="first_match",
extraction_config=[LatexExtractionConfig()])`` and a completion with a ``LatexExtractionConfig``
whose ``NormalizationConfig(nits=False, malformed_operators=False, basic_latex=True,
equations=True, boxed="all" | True, units=True)``, ``boxed_match_priority=0`` and
``try_extract_without_anchor=False``; then ``verify(answer, gold)``.

One deliberate deviation, ``gold_wrap`` (default on): our golds are bare answers ("27"), which the
gold parse (it needs a LaTeX anchor) returns ``[]`` for, and an unparseable gold scores 1.0 for
*every* completion. The recipe's golds were full solutions containing ``\\boxed{}``; wrapping a
bare gold as ``$...$`` restores the intended comparison.

``math_verify`` is imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import logging
import threading

__all__ = ["answer_is_correct", "mv_timeout", "parse_answer", "parse_gold", "wrap_gold"]


class _DropEquationsDeprecation(logging.Filter):
    """latex2sympy2_extended logs a warning on *every* parse with ``equations=True``; the recipe
    passes it (and it still changes normalisation), so keep the flag and drop only that line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "equations=True in NormalizationConfig is deprecated" not in record.getMessage()


logging.getLogger("latex2sympy2_extended.math_normalization").addFilter(_DropEquationsDeprecation())


def mv_timeout(seconds: int) -> int | None:
    """math-verify's own timeouts use ``signal.alarm``, which raises outside the main thread;
    disable them there (the worker pool's process-level timeout is the real guard)."""
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
        parsing_timeout=mv_timeout(timeout_s),
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
        parsing_timeout=mv_timeout(timeout_s),
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
            timeout_seconds=mv_timeout(math_verify_timeout_s),
        )
    )
