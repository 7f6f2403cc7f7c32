"""Prompts for GRPO: load problems, apply the chat template, sample them per step.

Pipeline (mirrors open-rs / TRL at the pinned commit):

1. :func:`load_problems` reads ``problem``/``answer`` columns from a local ``.jsonl`` /
   ``.json`` / ``.parquet`` / ``.csv`` file, a directory written by
   ``datasets.save_to_disk``, or (online only) a hub dataset name.
2. :func:`tokenize_prompts` renders ``[system?, user=problem]`` with the tokenizer's chat
   template (``add_generation_prompt=True``), tokenises the text with
   ``add_special_tokens=False`` (the R1-Distill template already starts with BOS; encoding
   with special tokens would double it) and keeps the **last** ``max_prompt_length`` ids
   (open-rs: ``prompt_ids[:, -512:]``).
3. :func:`prepare_prompts` does 1+2 and the checks: every id < the model's (unpadded)
   vocab size, and ``max_prompt_length + max_completion_length <= max context``.
4. :class:`PromptSampler` yields one :class:`PromptBatch` per optimizer step for this
   data-parallel rank, resumable through ``state_dict()`` / ``load_state_dict()``.

Tokenizers: load them with :func:`load_tokenizer`, not ``AutoTokenizer``. Under
transformers 5.x, a ``tokenizer_config.json`` that says ``LlamaTokenizerFast`` (as
DeepSeek-R1-Distill-Qwen's does) makes ``AutoTokenizer`` build a ``LlamaTokenizer`` that
replaces the ByteLevel pre-tokenizer/decoder of ``tokenizer.json`` with Metaspace:
wrong ids for every space/newline and ``Ġ``/``Ċ`` in decoded text
(huggingface/transformers#45488). :func:`load_tokenizer` loads ``tokenizer.json``
verbatim.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "OPEN_RS_SYSTEM_PROMPT",
    "DataConfig",
    "PromptBatch",
    "PromptDataset",
    "PromptSampler",
    "check_context_length",
    "check_vocab",
    "load_problems",
    "load_tokenizer",
    "prepare_prompts",
    "render_prompt",
    "tokenize_prompts",
]

# open-rs recipes/grpo.yaml ``system_prompt`` (Experiment 3, with the English sentence).
# The YAML source reads ``\\boxed{{}}`` inside double quotes, i.e. the literal text
# ``\boxed{{}}`` (TRL does not ``str.format`` it).
OPEN_RS_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer, and put your final answer within \\boxed{{}} . The reasoning process and answer are enclosed "
    "within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here </think> <answer> answer here </answer>. Note that respond by English, NOT use other languages."
)

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class DataConfig:
    path: str = ""  # local .jsonl/.json/.parquet/.csv, a save_to_disk dir, or a hub name (online only)
    split: str = (
        "train"  # used for save_to_disk DatasetDicts and hub datasets; a single file is its own split
    )
    problem_column: str = "problem"
    answer_column: str = "answer"
    system_prompt: str | None = None
    max_prompt_length: int = 512  # left truncation, as open-rs: prompt_ids[-512:]
    shuffle_seed: int = 42
    tokenizer: str = ""  # a local tokenizer dir
    limit: int | None = None  # keep the first `limit` rows (before shuffling)

    def __post_init__(self) -> None:
        if not isinstance(self.max_prompt_length, int) or self.max_prompt_length <= 0:
            raise ValueError(f"DataConfig.max_prompt_length={self.max_prompt_length!r} must be an int > 0")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit <= 0):
            raise ValueError(f"DataConfig.limit={self.limit!r} must be None or an int > 0")
        if not self.problem_column or not self.answer_column:
            raise ValueError("DataConfig.problem_column and answer_column must be non-empty")


# --------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """Load a local tokenizer dir, keeping ``tokenizer.json``'s pipeline exactly.

    With a ``tokenizer.json`` this uses ``PreTrainedTokenizerFast.from_pretrained`` (the
    generic ``TokenizersBackend`` in transformers 5), which still reads the special
    tokens and chat template from ``tokenizer_config.json`` but never rewrites the
    pre-tokenizer or decoder (see the module docstring). Otherwise ``AutoTokenizer``.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(
            f"tokenizer dir {p} does not exist (DataConfig.tokenizer must be a local dir)"
        )
    if (p / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(p))
    return AutoTokenizer.from_pretrained(str(p))


# --------------------------------------------------------------------------- loading


def load_problems(cfg: DataConfig) -> Any:
    """Load the problem table as a ``datasets.Dataset``; check columns and non-emptiness."""
    import datasets

    if not cfg.path:
        raise ValueError(
            "DataConfig.path is empty: set data.path to a .jsonl/.json/.parquet file or a dataset dir"
        )
    p = Path(cfg.path)
    if p.is_dir():
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise ValueError(f"dataset dir {p} has splits {list(ds)}, not data.split={cfg.split!r}")
            ds = ds[cfg.split]
    elif p.is_file():
        builder = _FILE_BUILDERS.get(p.suffix.lower())
        if builder is None:
            raise ValueError(
                f"data file {p}: unsupported extension {p.suffix!r}; use one of {sorted(_FILE_BUILDERS)}"
            )
        if not p.read_bytes().strip():
            raise ValueError(f"dataset {p} is empty (the file has no rows)")
        try:
            ds = datasets.load_dataset(builder, data_files={"train": str(p)}, split="train")
        except Exception as exc:
            if "corresponds to no data" in str(exc):
                raise ValueError(f"dataset {p} is empty (no rows)") from exc
            raise ValueError(f"cannot load dataset file {p}: {exc}") from exc
    elif p.suffix.lower() in _FILE_BUILDERS or p.is_absolute() or p.parts[0] in (".", ".."):
        raise FileNotFoundError(f"data file {p} does not exist")
    else:  # hub dataset name; works only with network access
        ds = datasets.load_dataset(cfg.path, split=cfg.split)

    missing = [c for c in (cfg.problem_column, cfg.answer_column) if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"dataset {cfg.path}: missing column(s) {missing} (data.problem_column={cfg.problem_column!r}, "
            f"data.answer_column={cfg.answer_column!r}); columns present: {ds.column_names}"
        )
    if len(ds) == 0:
        raise ValueError(f"dataset {cfg.path} (split {cfg.split!r}) is empty")
    if cfg.limit is not None and cfg.limit < len(ds):
        ds = ds.select(range(cfg.limit))
    return ds


def render_prompt(tokenizer: Any, problem: str, system_prompt: str | None = None) -> str:
    """The chat-templated prompt text for one problem (with the generation prompt)."""
    messages = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": problem})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def tokenize_prompts(
    tokenizer: Any, problems: Sequence[str], system_prompt: str | None, max_prompt_length: int
) -> tuple[list[list[int]], int]:
    """Chat-template + tokenise (``add_special_tokens=False``) + keep the last ``max_prompt_length`` ids.

    Returns ``(prompt_ids, num_truncated)``.
    """
    texts = [render_prompt(tokenizer, p, system_prompt) for p in problems]
    if not texts:
        return [], 0
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    out: list[list[int]] = []
    truncated = 0
    for ids in encoded:
        ids = list(ids)
        if len(ids) > max_prompt_length:
            truncated += 1
            ids = ids[-max_prompt_length:]
        out.append(ids)
    return out, truncated


def check_vocab(prompt_ids: Sequence[Sequence[int]], vocab_size: int, source: str = "prompts") -> None:
    """Every id must be in ``[0, vocab_size)`` (the model's unpadded vocab)."""
    for i, ids in enumerate(prompt_ids):
        for tok in ids:
            if tok < 0 or tok >= vocab_size:
                raise ValueError(
                    f"{source}: example {i} has token id {tok}, outside the model's vocab_size {vocab_size} "
                    f"(is the tokenizer the model's?)"
                )


def check_context_length(max_prompt_length: int, max_completion_length: int, max_context: int) -> None:
    """``max_prompt_length + max_completion_length`` must fit the model's context."""
    total = max_prompt_length + max_completion_length
    if total > max_context:
        raise ValueError(
            f"max_prompt_length ({max_prompt_length}) + max_completion_length ({max_completion_length}) = {total} "
            f"exceeds the model's max context length {max_context}"
        )


@dataclass
class PromptDataset:
    """Tokenised prompts with their problems and gold answers (row ``i`` of each list)."""

    prompt_ids: list[list[int]]
    problems: list[str]
    answers: list[str]
    source: str = ""
    num_truncated: int = 0  # prompts longer than max_prompt_length (left-truncated)

    def __len__(self) -> int:
        return len(self.prompt_ids)


def prepare_prompts(
    cfg: DataConfig,
    tokenizer: Any = None,
    *,
    vocab_size: int | None = None,
    max_completion_length: int | None = None,
    max_context: int | None = None,
) -> PromptDataset:
    """Load, template, tokenise and check the prompts of ``cfg``.

    ``tokenizer`` defaults to :func:`load_tokenizer` of ``cfg.tokenizer``. The vocab check
    runs when ``vocab_size`` is given; the context check when both
    ``max_completion_length`` and ``max_context`` are (it runs first, before loading).
    """
    if max_completion_length is not None and max_context is not None:
        check_context_length(cfg.max_prompt_length, max_completion_length, max_context)
    if tokenizer is None:
        if not cfg.tokenizer:
            raise ValueError("DataConfig.tokenizer is empty: set data.tokenizer to a local tokenizer dir")
        tokenizer = load_tokenizer(cfg.tokenizer)
    ds = load_problems(cfg)
    problems = list(ds[cfg.problem_column])
    answers = list(ds[cfg.answer_column])
    for i, (prob, ans) in enumerate(zip(problems, answers, strict=True)):
        if not isinstance(prob, str) or not prob:
            raise ValueError(f"dataset {cfg.path}: example {i} has an empty or non-string problem {prob!r}")
        if ans is None or (isinstance(ans, str) and not ans):
            raise ValueError(f"dataset {cfg.path}: example {i} has an empty answer")
    answers = [a if isinstance(a, str) else str(a) for a in answers]
    prompt_ids, truncated = tokenize_prompts(tokenizer, problems, cfg.system_prompt, cfg.max_prompt_length)
    if vocab_size is not None:
        check_vocab(prompt_ids, vocab_size, source=f"dataset {cfg.path}")
    return PromptDataset(prompt_ids, problems, answers, source=cfg.path, num_truncated=truncated)


# --------------------------------------------------------------------------- sampling


@dataclass
class PromptBatch:
    """One optimizer step's prompts for one DP rank, each repeated ``group_size`` times.

    Rows ``[g*G, (g+1)*G)`` are the ``G = group_size`` copies of prompt ``g``.
    """

    prompt_ids: list[list[int]]
    answers: list[str]
    problems: list[str]
    indices: list[int]  # dataset row of each row (repeated like the prompts)
    epoch: int
    step: int  # global step index (0-based) of this batch since the sampler's start
    group_size: int

    @property
    def num_prompts(self) -> int:
        return len(self.indices) // self.group_size if self.group_size else 0

    def __len__(self) -> int:
        return len(self.prompt_ids)


@dataclass
class PromptSampler:
    """Infinite, resumable, DP-sharded prompt sampler (one batch per optimizer step).

    * Epoch ``e`` visits the rows in the order ``numpy.random.default_rng(seed + e)
      .permutation(N)``: the same for every rank, so no communication is needed.
    * Each step takes the next ``prompts_per_step`` rows of that order (global prompts);
      rank ``r`` of ``dp_size`` keeps the contiguous slice
      ``[r * P/dp_size, (r+1) * P/dp_size)``, and repeats each prompt ``num_generations``
      times, group-contiguous.
    * The incomplete tail of an epoch (``N % prompts_per_step`` rows) is **dropped**: when
      fewer than ``prompts_per_step`` rows are left, the next epoch starts. Every step has
      the same global batch; the dropped rows differ per epoch, since the order does.
    * The state is ``(epoch, position)`` where ``position`` counts the global prompts
      consumed in the epoch, independent of ``dp_rank``/``dp_size``: a checkpoint saved at
      one dp_size resumes at another one at the same global position.
    """

    dataset: PromptDataset
    prompts_per_step: int
    num_generations: int
    dp_rank: int = 0
    dp_size: int = 1
    seed: int = 42
    epoch: int = 0
    position: int = 0  # global prompts consumed in the current epoch
    step: int = 0  # global steps consumed since the start
    _perm: np.ndarray | None = field(default=None, init=False, repr=False)
    _perm_epoch: int = field(default=-1, init=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.dataset)
        if self.prompts_per_step <= 0 or self.num_generations <= 0:
            raise ValueError(
                f"prompts_per_step ({self.prompts_per_step}) and num_generations ({self.num_generations}) must be > 0"
            )
        if self.dp_size <= 0 or not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"dp_rank {self.dp_rank} must be in [0, dp_size={self.dp_size})")
        if self.prompts_per_step % self.dp_size:
            raise ValueError(
                f"prompts_per_step ({self.prompts_per_step}) must be divisible by dp_size ({self.dp_size})"
            )
        if n < self.prompts_per_step:
            raise ValueError(
                f"dataset {self.dataset.source!r} has {n} prompts, fewer than prompts_per_step={self.prompts_per_step}"
            )

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.prompts_per_step

    @property
    def prompts_per_rank(self) -> int:
        return self.prompts_per_step // self.dp_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The global visiting order of the rows in ``epoch``."""
        if self._perm_epoch != epoch or self._perm is None:
            self._perm = np.random.default_rng(self.seed + epoch).permutation(len(self.dataset))
            self._perm_epoch = epoch
        return self._perm

    def step_indices(self) -> list[int]:
        """This rank's dataset rows for the next step (no repetition), without advancing."""
        epoch, position = self.epoch, self.position
        if position + self.prompts_per_step > len(self.dataset):
            epoch, position = epoch + 1, 0
        order = self.epoch_order(epoch)
        start = position + self.dp_rank * self.prompts_per_rank
        return [int(i) for i in order[start : start + self.prompts_per_rank]]

    def __iter__(self) -> PromptSampler:
        return self

    def __next__(self) -> PromptBatch:
        if self.position + self.prompts_per_step > len(self.dataset):
            self.epoch += 1
            self.position = 0
        rows = self.step_indices()
        g = self.num_generations
        ds = self.dataset
        indices = [i for i in rows for _ in range(g)]
        batch = PromptBatch(
            prompt_ids=[list(ds.prompt_ids[i]) for i in indices],
            answers=[ds.answers[i] for i in indices],
            problems=[ds.problems[i] for i in indices],
            indices=indices,
            epoch=self.epoch,
            step=self.step,
            group_size=g,
        )
        self.position += self.prompts_per_step
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "step": self.step,
            "seed": self.seed,
            "num_prompts": len(self.dataset),
            "prompts_per_step": self.prompts_per_step,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from :meth:`state_dict` (any dp_rank/dp_size)."""
        for key in ("epoch", "position", "seed", "num_prompts"):
            if key not in state:
                raise ValueError(f"PromptSampler state is missing {key!r}: {state}")
        if state["num_prompts"] != len(self.dataset):
            raise ValueError(
                f"PromptSampler state was saved for {state['num_prompts']} prompts, "
                f"but dataset {self.dataset.source!r} has {len(self.dataset)}"
            )
        if state["seed"] != self.seed:
            raise ValueError(
                f"PromptSampler state has seed {state['seed']}, but this sampler has seed {self.seed}"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.step = int(state.get("step", 0))
