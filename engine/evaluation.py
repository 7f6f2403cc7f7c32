"""Benchmark evaluation (AIME24, AMC23, MATH-500, Minerva, OlympiadBench) with any :class:`Generator`.

Reproduces the open-rs evaluation setup (``src/open_r1/evaluate.py``: lighteval custom tasks):

* zero-shot, **no system prompt**; the user turn is :data:`MATH_QUERY_TEMPLATE` (verbatim, two
  spaces after "clearly.") with the problem, rendered with the tokenizer's chat template
  (``add_generation_prompt=True``) and tokenised with ``add_special_tokens=False``: one BOS
  (lighteval/vLLM's text path gives the R1 tokenizer a double BOS, a known quirk);
* sampling T=0.6, top_p=0.95 (:func:`default_sampling`), max new tokens configurable (open-rs:
  32768);
* **pass@1 = the first sample** of each problem (open-rs reports one sample); with ``k`` samples
  also ``avg@k`` (mean correctness over the k samples, then over problems) and ``pass@k`` (any of
  the k correct). Standard errors use the sample std (ddof=1) over problems, as lighteval.

Scoring (math-verify), per task ``scoring``:

* ``"lighteval"`` (default): open-rs's lighteval metrics rebuilt on ``math_verify``. Gold:
  ``ExprExtractionConfig`` for aime24/amc23 (``expr_gold``), ``LatexExtractionConfig`` for the
  others (``latex_gold``); prediction: ``[ExprExtractionConfig(), LatexExtractionConfig(
  boxed_match_priority=0)]``, ``fallback_mode="first_match"``, ``verify(gold, pred,
  float_rounding=5)``; a gold that does not parse is compared as its raw string (as lighteval).
  Differences from the real run: lighteval carries its own copy of these extraction configs
  (normalisation may differ slightly); open-rs graded math_500/minerva against the full
  ``solution`` text and we against ``$answer$`` (our files' answer is the boxed answer of that
  solution), olympiadbench against knoveleng's ``answer`` and we against ours wrapped in ``$…$``.
* ``"recipe"``: the training reward's parser (``engine.rewards``: :func:`parse_gold` with the
  bare-gold ``$…$`` wrap, :func:`parse_answer` with ``boxed="all"``,
  ``verify(answer, gold)`` in the recipe's argument order) -- exactly
  ``answer_is_correct(completion, gold, boxed="all")``. It needs an anchor in the completion
  (``\\boxed{}`` or ``$…$``): "The answer is 33." scores 0 here but 1 with ``"lighteval"``; an
  unparseable gold scores 0 (flagged ``gold_parsed=None``) instead of the reward's 1.0.

Both modes agree on the usual ``\\boxed{}`` answers (an AIME gold "033" matches ``\\boxed{33}``).

Distributed use: every rank calls :func:`evaluate` (TP ranks must run the generator in lock step).
Problems are sharded over data-parallel ranks (strided), scored on TP rank 0 of each replica and
gathered to global rank 0, which alone gets the per-problem records; the summary is broadcast to
every rank. Without ``torch.distributed`` / Megatron state it runs as one rank. The GRPO loop calls
:func:`run_periodic_eval` (or :func:`evaluate` + :func:`tensorboard_metrics`) every N steps.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # engine.rollout generators import Megatron (seconds): only when generating
    from engine.rollout.base import GenerationOutput, Generator, SamplingConfig

__all__ = [
    "EVAL_DIR",
    "MATH_QUERY_TEMPLATE",
    "TASKS",
    "EvalConfig",
    "EvalProblem",
    "EvalResult",
    "EvalTask",
    "build_prompt",
    "default_sampling",
    "evaluate",
    "eval_progress_table",
    "format_summary_table",
    "load_problems",
    "resolve_tasks",
    "run_periodic_eval",
    "score_completion",
    "summarize",
    "tensorboard_metrics",
    "tokenize_eval_prompts",
    "write_results",
]

EVAL_DIR = Path(__file__).resolve().parents[1] / "assets" / "eval"

# open-rs src/open_r1/evaluate.py (from open-r1; adapted from simple-evals / Llama 3 evals), verbatim:
# the source's ``\\boxed{{ANSWER}}`` renders as ``\boxed{ANSWER}`` after .format().
MATH_QUERY_TEMPLATE = """
Solve the following math problem efficiently and clearly.  The last line of your response should be of the following format: 'Therefore, the final answer is: $\\boxed{{ANSWER}}$. I hope it is correct' (without quotes) where ANSWER is just the final number or expression that solves the problem. Think step by step before answering.

{Question}
""".strip()

SCORING_MODES = ("lighteval", "recipe")
GOLD_MODES = ("expr", "latex")


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalTask:
    """One benchmark: a JSONL file, its columns and how its gold is parsed (``expr`` / ``latex``)."""

    name: str
    path: str
    gold_mode: str = "latex"
    problem_column: str = "problem"
    answer_column: str = "answer"
    id_column: str = "id"
    query_template: str = MATH_QUERY_TEMPLATE  # the user turn; "{Question}" = the problem as it is

    def __post_init__(self) -> None:
        if self.gold_mode not in GOLD_MODES:
            raise ValueError(f"task {self.name}: gold_mode {self.gold_mode!r} not in {GOLD_MODES}")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], name: str | None = None, **kw: Any) -> EvalTask:
        """A custom task over a local ``.jsonl`` (name defaults to the file stem)."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"eval task file {p} does not exist")
        if p.suffix.lower() != ".jsonl":
            raise ValueError(f"eval task file {p}: expected a .jsonl file")
        return cls(name=name or p.stem, path=str(p), **kw)


def _builtin(name: str, file: str, gold_mode: str) -> EvalTask:
    return EvalTask(name=name, path=str(EVAL_DIR / file), gold_mode=gold_mode)


# Gold modes follow open-rs: expr_gold for aime24/amc23, latex_gold for the others.
TASKS: dict[str, EvalTask] = {
    "aime24": _builtin("aime24", "aime24.jsonl", "expr"),
    "amc23": _builtin("amc23", "amc23.jsonl", "expr"),
    "math500": _builtin("math500", "math500.jsonl", "latex"),
    "minerva": _builtin("minerva", "minerva_math.jsonl", "latex"),
    "olympiadbench": _builtin("olympiadbench", "olympiadbench.jsonl", "latex"),
    # The built-in CPU demo (tools/demo_task.py): "3+4=" -> "7", prompted as it is.
    "demo_exact": EvalTask(
        "demo_exact", str(EVAL_DIR.parent / "demo" / "test.jsonl"), "expr", query_template="{Question}"
    ),
}
_ALIASES = {"math_500": "math500", "minerva_math": "minerva", "aime": "aime24", "amc": "amc23"}


def resolve_tasks(names: str | Sequence[str]) -> list[EvalTask]:
    """Task names (a list or a comma-separated string; open-rs names accepted) -> tasks."""
    if isinstance(names, str):
        names = [n for n in (s.strip() for s in names.split(",")) if n]
    out = []
    for n in names:
        key = _ALIASES.get(n, n)
        if key not in TASKS:
            raise ValueError(f"unknown eval task {n!r}: known tasks are {', '.join(TASKS)}")
        out.append(TASKS[key])
    if len({t.name for t in out}) != len(out):
        raise ValueError(f"eval tasks listed twice: {list(names)}")
    return out


@dataclass
class EvalProblem:
    index: int  # row in the task file
    id: str
    problem: str
    gold: str


def load_problems(task: EvalTask, limit: int | None = None) -> list[EvalProblem]:
    """The first ``limit`` rows (all when None) of a task file, checked."""
    p = Path(task.path)
    if not p.is_file():
        raise FileNotFoundError(f"eval task {task.name}: file {p} does not exist")
    rows: list[EvalProblem] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(rows) >= limit:
                break
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{lineno}: not valid JSON ({e})") from e
            prob, gold = row.get(task.problem_column), row.get(task.answer_column)
            if not isinstance(prob, str) or not prob.strip():
                raise ValueError(f"{p}:{lineno}: missing or empty {task.problem_column!r}")
            if gold is None or str(gold).strip() == "":
                raise ValueError(f"{p}:{lineno}: missing or empty {task.answer_column!r}")
            rid = row.get(task.id_column)
            idx = len(rows)
            rows.append(
                EvalProblem(idx, str(rid) if rid is not None else f"{task.name}-{idx}", prob, str(gold))
            )
    if not rows:
        raise ValueError(f"eval task {task.name}: {p} has no rows")
    return rows


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def build_prompt(tokenizer: Any, problem: str, template: str = MATH_QUERY_TEMPLATE) -> str:
    """Chat-templated prompt text: one user turn with ``template`` (:data:`MATH_QUERY_TEMPLATE`), no
    system prompt."""
    from engine.data import render_prompt

    return render_prompt(tokenizer, template.format(Question=problem), system_prompt=None)


def tokenize_eval_prompts(
    tokenizer: Any, problems: Sequence[str], template: str = MATH_QUERY_TEMPLATE
) -> tuple[list[str], list[list[int]]]:
    """(prompt texts, prompt ids); ``add_special_tokens=False`` (the template carries the BOS)."""
    texts = [build_prompt(tokenizer, p, template) for p in problems]
    if not texts:
        return [], []
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return texts, [list(x) for x in ids]


def default_sampling(max_new_tokens: int = 32768, seed: int = 0) -> SamplingConfig:
    """open-rs's eval sampling: T=0.6, top_p=0.95, no top-k."""
    from engine.rollout.base import SamplingConfig

    return SamplingConfig(
        temperature=0.6, top_p=0.95, top_k=0, max_new_tokens=max_new_tokens, seed=seed, logprobs=False
    )


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def _mv_timeout(seconds: int) -> int | None:
    from engine.rewards import mv_timeout as rewards_timeout

    return rewards_timeout(seconds)


def _show(parsed: list | None) -> str | None:
    """The human-readable form of a math-verify parse: the matched string when it has one."""
    if not parsed:
        return None
    return str(parsed[1] if len(parsed) > 1 else parsed[0])


def parse_eval_gold(gold: str, gold_mode: str, scoring: str, timeout_s: int = 5) -> list | None:
    """The parsed gold for ``scoring`` (``None``: unparseable under ``"recipe"``)."""
    if scoring == "recipe":
        from engine.rewards import parse_gold

        parsed = parse_gold(gold, gold_wrap=True, timeout_s=timeout_s)
        return parsed or None
    if scoring != "lighteval":
        raise ValueError(f"scoring {scoring!r} not in {SCORING_MODES}")
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    from engine.rewards import wrap_gold

    if gold_mode == "expr":
        text, config = gold, [ExprExtractionConfig()]
    else:
        text, config = wrap_gold(gold), [LatexExtractionConfig()]
    parsed = parse(
        text,
        extraction_config=config,
        fallback_mode="first_match",
        extraction_mode="any_match",
        parsing_timeout=_mv_timeout(timeout_s),
    )
    return parsed or [gold]  # lighteval: an unextractable gold is compared as its raw string


def score_completion(
    completion: str,
    gold: str,
    *,
    gold_mode: str = "latex",
    scoring: str = "lighteval",
    gold_parsed: list | None = None,
    timeout_s: int = 5,
) -> tuple[bool, str | None]:
    """(correct, extracted answer) for one completion; any math-verify failure scores False.

    ``gold_parsed`` (from :func:`parse_eval_gold`) saves re-parsing the gold per sample.
    """
    from math_verify import verify

    if gold_parsed is None:
        gold_parsed = parse_eval_gold(gold, gold_mode, scoring, timeout_s)
    try:
        if scoring == "recipe":
            from engine.rewards import parse_answer

            pred = parse_answer(completion, boxed="all", timeout_s=timeout_s)
            if gold_parsed is None:
                return False, _show(pred)
            ok = verify(pred, gold_parsed, timeout_seconds=_mv_timeout(timeout_s))
        else:
            from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

            pred = parse(
                completion,
                extraction_config=[ExprExtractionConfig(), LatexExtractionConfig(boxed_match_priority=0)],
                fallback_mode="first_match",
                extraction_mode="any_match",
                parsing_timeout=_mv_timeout(timeout_s),
            )
            ok = verify(gold_parsed, pred, float_rounding=5, timeout_seconds=_mv_timeout(timeout_s))
        return bool(ok), _show(pred)
    except Exception:  # a math-verify crash or timeout is a wrong answer, not a failed eval
        return False, None


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """``records[task]``: one dict per problem, in file order (complete on global rank 0 only,
    empty elsewhere); ``summary[task]`` (plus ``"mean"`` over tasks): on every rank."""

    records: dict[str, list[dict[str, Any]]]
    summary: dict[str, dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)


def _parallel_info() -> tuple[int, int, int, Any]:
    """(dp_rank, dp_size, tp_rank, dp_group); single process when Megatron state is absent."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return 0, 1, 0, None
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return dist.get_rank(), dist.get_world_size(), 0, dist.group.WORLD
    return (
        ps.get_data_parallel_rank(),
        ps.get_data_parallel_world_size(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_data_parallel_group(),
    )


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def _stderr(xs: Sequence[float]) -> float:
    n = len(xs)
    if n < 2:
        return float("nan")
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def summarize(records: Sequence[dict[str, Any]], k: int) -> dict[str, Any]:
    """pass@1 (first sample), avg@k, pass@k (any of k) with standard errors, lengths, truncation."""
    first = [float(r["correct"][0]) for r in records]
    avg = [_mean([float(c) for c in r["correct"]]) for r in records]
    tokens = [n for r in records for n in r["completion_tokens"]]
    finished = [f for r in records for f in r["finished"]]
    return {
        "n": len(records),
        "k": k,
        "pass@1": _mean(first),
        "pass@1_stderr": _stderr(first),
        "avg@k": _mean(avg),
        "avg@k_stderr": _stderr(avg),
        "pass@k": _mean([float(any(r["correct"])) for r in records]),
        "mean_completion_tokens": _mean(tokens),
        "truncated_frac": 1.0 - _mean([float(f) for f in finished]) if finished else float("nan"),
        "gold_unparsed": sum(r["gold_parsed"] is None for r in records),
    }


def _mean_row(summary: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Unweighted mean over tasks (the open-rs "Avg" column)."""
    rows = list(summary.values())
    return {
        "n": sum(r["n"] for r in rows),
        "k": rows[0]["k"] if rows else 0,
        "pass@1": _mean([r["pass@1"] for r in rows]),
        "avg@k": _mean([r["avg@k"] for r in rows]),
        "pass@k": _mean([r["pass@k"] for r in rows]),
        "mean_completion_tokens": _mean([r["mean_completion_tokens"] for r in rows]),
        "truncated_frac": _mean([r["truncated_frac"] for r in rows]),
    }


def _generate_shard(
    generator: Generator,
    prompt_ids: list[list[int]],
    k: int,
    sampling: SamplingConfig,
    batch_size: int | None,
    seed: int,
    log: Callable[[str], None] | None,
    label: str,
) -> list[tuple[list[list[int]], list[bool]]]:
    """k completions per prompt, batched (``batch_size`` sequences per call; None = one call),
    longest prompts first (less padding, and an out-of-memory shows up at once)."""
    out: list[tuple[list[list[int]], list[bool]]] = [([], [])] * len(prompt_ids)
    if not prompt_ids:
        return out
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    per_call = len(order) if batch_size is None else max(1, batch_size // k)
    chunks = [order[s : s + per_call] for s in range(0, len(order), per_call)]
    for c, chunk in enumerate(chunks):
        t0 = time.time()
        res: GenerationOutput = generator.generate(
            [prompt_ids[i] for i in chunk], k, replace(sampling, seed=seed + c)
        )
        if len(res.completion_ids) != len(chunk) * k:
            raise RuntimeError(
                f"generator returned {len(res.completion_ids)} completions for {len(chunk)} prompts x {k}"
            )
        for j, i in enumerate(chunk):
            s = slice(j * k, (j + 1) * k)
            out[i] = ([list(x) for x in res.completion_ids[s]], [bool(x) for x in res.finished[s]])
        if log is not None:
            log(
                f"eval {label}: batch {c + 1}/{len(chunks)} ({len(chunk)} prompts x {k}) in {time.time() - t0:.1f}s"
            )
    return out


def evaluate(
    generator: Generator,
    tokenizer: Any,
    tasks: str | Sequence[str | EvalTask],
    *,
    k: int = 1,
    sampling: SamplingConfig | None = None,
    limit: int | None = None,
    batch_size: int | None = 64,
    scoring: str = "lighteval",
    max_context: int | None = None,
    keep_text: bool = True,
    math_verify_timeout_s: int = 5,
    log: Callable[[str], None] | None = None,
) -> EvalResult:
    """Generate ``k`` samples per problem for every task and score them. Collective (see module doc).

    ``tasks``: names (see :data:`TASKS`), a comma-separated string, or :class:`EvalTask` objects.
    ``sampling`` defaults to :func:`default_sampling` (its ``seed`` is offset per task and batch; its
    ``logprobs`` is turned off: evaluation never needs them).
    ``batch_size``: sequences (prompts x k) per ``generate`` call on each DP rank; None = all at once
    (vLLM schedules them itself). ``max_context``: fail early when the longest prompt plus
    ``max_new_tokens`` exceeds it. ``keep_text=False`` drops prompt/completion texts from the
    records (e.g. periodic evals in training). ``log``: progress messages (e.g. ``print``).
    """
    import torch.distributed as dist

    from parallel.collectives import broadcast_object

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if scoring not in SCORING_MODES:
        raise ValueError(f"scoring {scoring!r} not in {SCORING_MODES}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
    # Scoring reads tokens only: no logprobs (the vLLM generator then accepts eval's top_p 0.95).
    sampling = replace(sampling or default_sampling(), logprobs=False)
    if isinstance(tasks, str):
        task_list = resolve_tasks(tasks)
    else:
        task_list = [t if isinstance(t, EvalTask) else resolve_tasks([t])[0] for t in tasks]
    if not task_list:
        raise ValueError("no eval tasks given")
    dp_rank, dp_size, tp_rank, dp_group = _parallel_info()
    is_global0 = not dist.is_initialized() or dist.get_rank() == 0

    records: dict[str, list[dict[str, Any]]] = {}
    summary: dict[str, dict[str, Any]] = {}
    t_start = time.time()
    for t_idx, task in enumerate(task_list):
        problems = load_problems(task, limit)
        mine = problems[dp_rank::dp_size]
        texts, ids = tokenize_eval_prompts(tokenizer, [p.problem for p in mine], task.query_template)
        if max_context is not None and ids:
            longest = max(len(x) for x in ids)
            if longest + sampling.max_new_tokens > max_context:
                raise ValueError(
                    f"eval task {task.name}: longest prompt ({longest} tokens) + max_new_tokens "
                    f"({sampling.max_new_tokens}) exceeds the model's context {max_context}"
                )
        t0 = time.time()
        gens = _generate_shard(
            generator, ids, k, sampling, batch_size, sampling.seed + 100_003 * t_idx, log, task.name
        )
        local: list[dict[str, Any]] | None = None
        if tp_rank == 0:  # TP peers hold the same completions: score once per replica
            local = []
            for prob, text, pids, (comp_ids, finished) in zip(mine, texts, ids, gens, strict=True):
                gold_parsed = parse_eval_gold(prob.gold, task.gold_mode, scoring, math_verify_timeout_s)
                comps = [tokenizer.decode(c, skip_special_tokens=True) for c in comp_ids]
                scored = [
                    score_completion(
                        c,
                        prob.gold,
                        gold_mode=task.gold_mode,
                        scoring=scoring,
                        gold_parsed=gold_parsed,
                        timeout_s=math_verify_timeout_s,
                    )
                    for c in comps
                ]
                rec: dict[str, Any] = {
                    "task": task.name,
                    "index": prob.index,
                    "id": prob.id,
                    "gold": prob.gold,
                    "gold_parsed": _show(gold_parsed),
                    "correct": [ok for ok, _ in scored],
                    "extracted": [ex for _, ex in scored],
                    "pass@1": float(scored[0][0]),
                    "avg@k": _mean([float(ok) for ok, _ in scored]),
                    "prompt_tokens": len(pids),
                    "completion_tokens": [len(c) for c in comp_ids],
                    "finished": finished,
                }
                if keep_text:
                    rec.update(problem=prob.problem, prompt=text, completions=comps)
                local.append(rec)
            if dp_size > 1:
                gathered: list | None = [None] * dp_size if dp_rank == 0 else None
                dist.gather_object(local, gathered, dst=dist.get_global_rank(dp_group, 0), group=dp_group)
                local = [r for part in gathered for r in part] if gathered is not None else None
        if is_global0:
            assert local is not None
            task_records = sorted(local, key=lambda r: r["index"])
            records[task.name] = task_records
            summary[task.name] = {
                **summarize(task_records, k),
                "gold_mode": task.gold_mode,
                "source": task.path,
                "seconds": time.time() - t0,
            }
            if log is not None:
                s = summary[task.name]
                log(
                    f"eval {task.name}: pass@1 {100 * s['pass@1']:.1f}  avg@{k} {100 * s['avg@k']:.1f}  "
                    f"(n={s['n']}, {s['seconds']:.0f}s)"
                )
    if is_global0:
        summary["mean"] = _mean_row({n: s for n, s in summary.items()})
    summary = broadcast_object(summary)
    settings = {
        "tasks": [t.name for t in task_list],
        "k": k,
        "limit": limit,
        "scoring": scoring,
        "sampling": asdict(sampling),
        "dp_size": dp_size,
        "weight_version": getattr(generator, "weight_version", None),
        "seconds": time.time() - t_start,
    }
    return EvalResult(records, summary, settings)


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def tensorboard_metrics(result: EvalResult, prefix: str = "eval") -> dict[str, float]:
    """Flat scalars for :class:`engine.logger.MetricsLogger`: ``eval/<task>/pass@1`` etc."""
    out: dict[str, float] = {}
    for task, s in result.summary.items():
        for key in ("pass@1", "avg@k", "pass@k", "mean_completion_tokens", "truncated_frac"):
            if key in s:
                out[f"{prefix}/{task}/{key}"] = float(s[key])
    return out


def eval_progress_table(evals: dict[int, dict[str, float]]) -> str:
    """First vs last evaluation of a run: ``eval/<task>/pass@1`` per task (and the mean over several
    tasks), in %."""
    first, last = min(evals), max(evals)
    keys = [k for k in evals[last] if k in evals[first] and k.endswith("/pass@1")]
    if len(keys) == 2:  # one task: its row and the identical mean row
        keys = [k for k in keys if not k.startswith("eval/mean/")]
    lines = [f"| eval | step {first} | step {last} |", "|---|---|---|"]
    lines += [f"| {k} | {100 * evals[first][k]:.1f} | {100 * evals[last][k]:.1f} |" for k in keys]
    return "\n".join(lines)


def format_summary_table(summary: dict[str, dict[str, Any]]) -> str:
    """A Markdown table: one row per task plus the mean; scores in %."""
    k = next(iter(summary.values()))["k"] if summary else 1

    def pct(x: float) -> str:
        return "–" if x is None or math.isnan(x) else f"{100 * x:.1f}"

    lines = [
        f"| task | n | pass@1 | ± | avg@{k} | ± | pass@{k} | mean tokens | truncated % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {'**mean**' if name == 'mean' else name} | {s['n']} | {pct(s['pass@1'])} | "
            f"{pct(s.get('pass@1_stderr', float('nan')))} | {pct(s['avg@k'])} | "
            f"{pct(s.get('avg@k_stderr', float('nan')))} | {pct(s['pass@k'])} | "
            f"{s['mean_completion_tokens']:.0f} | {pct(s['truncated_frac'])} |"
        )
    return "\n".join(lines) + "\n"


def write_results(
    result: EvalResult, out_dir: str | os.PathLike[str], meta: dict[str, Any] | None = None
) -> Path:
    """``<out>/<task>.jsonl`` (one record per problem), ``summary.json``, ``summary.md``; each file
    written to a temp file and renamed. Call on global rank 0 (the records live there)."""
    from models.atomic_io import atomic_write as _atomic_write  # lazy: models/ imports torch

    out = Path(out_dir)
    for task, recs in result.records.items():

        def write_jsonl(f: Any, recs: list[dict[str, Any]] = recs) -> None:
            for r in recs:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")

        _atomic_write(out / f"{task}.jsonl", write_jsonl)
    doc = {"summary": result.summary, "settings": result.settings, **(meta or {})}
    _atomic_write(out / "summary.json", lambda f: f.write(json.dumps(doc, indent=2, default=str) + "\n"))
    header = "# Evaluation summary\n\n"
    settings = result.settings
    if settings:
        sm = settings.get("sampling", {})
        header += (
            f"k={settings.get('k')}, T={sm.get('temperature')}, top_p={sm.get('top_p')}, "
            f"max_new_tokens={sm.get('max_new_tokens')}, scoring={settings.get('scoring')}, "
            f"limit={settings.get('limit')}\n\n"
        )
    if meta and "model" in meta:
        header += f"model: `{meta['model']}`\n\n"
    _atomic_write(out / "summary.md", lambda f: f.write(header + format_summary_table(result.summary)))
    return out


# --------------------------------------------------------------------------------------------
# Periodic evaluation from the GRPO loop
# --------------------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    """Periodic evaluation during training (flat, YAML-loadable)."""

    every_steps: int = 0  # 0 = off; evaluate after every N optimizer steps
    at_start: bool = False  # also evaluate the initial policy (step 0)
    tasks: list[str] = field(default_factory=lambda: ["aime24", "amc23", "math500"])
    task_files: list[str] = field(default_factory=list)  # extra custom .jsonl tasks (latex gold)
    k: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 32768
    seed: int = 1234  # fixed: every periodic eval draws from the same streams
    limit: int | None = None
    batch_size: int | None = 64  # sequences per generate call per DP rank
    scoring: str = "lighteval"
    out_dir: str = ""  # "" = no per-problem files; else <out_dir>/step_<N>/

    def __post_init__(self) -> None:
        self.tasks = list(self.tasks)
        self.task_files = list(self.task_files)
        if self.every_steps < 0:
            raise ValueError(f"eval.every_steps must be >= 0, got {self.every_steps}")
        if self.k < 1:
            raise ValueError(f"eval.k must be >= 1, got {self.k}")
        if self.scoring not in SCORING_MODES:
            raise ValueError(f"eval.scoring={self.scoring!r} not in {SCORING_MODES}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"eval.limit must be None or >= 1, got {self.limit}")
        if self.every_steps or self.at_start:
            self.task_list()  # unknown task / missing file fails at config time
        self.sampling()

    def task_list(self) -> list[EvalTask]:
        return resolve_tasks(self.tasks) + [EvalTask.from_file(p) for p in self.task_files]

    def sampling(self) -> SamplingConfig:
        from engine.rollout.base import SamplingConfig

        return SamplingConfig(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
            logprobs=False,  # scoring needs tokens only: no logprobs, so any top_p / top_k is fine
        )

    def due(self, step: int) -> bool:
        """Whether to evaluate after optimizer step ``step`` (``step == 0``: before training)."""
        if step == 0:
            return self.at_start
        return self.every_steps > 0 and step % self.every_steps == 0


def run_periodic_eval(
    generator: Generator,
    tokenizer: Any,
    cfg: EvalConfig,
    step: int,
    *,
    max_context: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Evaluate now (collective: call on every rank) and return TensorBoard scalars
    (``eval/<task>/pass@1``, ...) on every rank; rank 0 writes ``<cfg.out_dir>/step_<N>/``."""
    import torch.distributed as dist

    result = evaluate(
        generator,
        tokenizer,
        cfg.task_list(),
        k=cfg.k,
        sampling=cfg.sampling(),
        limit=cfg.limit,
        batch_size=cfg.batch_size,
        scoring=cfg.scoring,
        max_context=max_context,
        keep_text=bool(cfg.out_dir),
        log=log,
    )
    if cfg.out_dir and (not dist.is_initialized() or dist.get_rank() == 0):
        write_results(result, Path(cfg.out_dir) / f"step_{step:06d}", {"step": step})
    return tensorboard_metrics(result)
