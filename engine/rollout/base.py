"""What the GRPO loop needs from a rollout engine: ``Generator``, ``SamplingConfig``, ``GenerationOutput``;
and ``DecodeConfig``, the built-in generator's batching (torch-free: it is the ``rollout.decode`` YAML section).

``Generator.generate(prompt_ids, n, sampling) -> GenerationOutput`` is all the trainer needs, so the
built-in Megatron generator and a co-located vLLM engine plug in side by side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 64
    seed: int = 0
    # Whether the caller needs each sampled token's logprob (training: yes; evaluation: no). A generator
    # may skip computing them when False (GenerationOutput.logprobs are then empty lists), and the vLLM
    # generator's top-p/top-k guard (renormalised logprobs) only applies when they are needed.
    logprobs: bool = True

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class DecodeConfig:
    """How the built-in generator (``engine.rollout.megatron_generator``) batches its decode steps."""

    max_batch_rows: int = 0  # decode slots (KV cache rows); 0 = every row of a generate() call at once
    sync_every: int = 0  # decode steps between host reads of the done flags; 0 = 1 on CPU, 16 on GPU
    max_prefill_tokens: int = 16384  # padded prompt tokens per prefill forward (at least one prompt)
    # Replay each decode step from a CUDA graph captured per (rows bucket, attention-span bucket)
    # (engine.rollout.step_graphs). Off by default until tools/gpu_checks.sh has compared it with eager
    # decode on a GPU. On CPU, True runs the same bucketed static-shape steps uncaptured.
    cuda_graphs: bool = False
    span_bucket: int = 256  # with cuda_graphs: attention span rounded up to a multiple of this

    def __post_init__(self) -> None:
        if self.max_batch_rows < 0:
            raise ValueError(f"decode.max_batch_rows must be >= 0 (0 = all rows), got {self.max_batch_rows}")
        if self.sync_every < 0:
            raise ValueError(f"decode.sync_every must be >= 0 (0 = auto), got {self.sync_every}")
        if self.max_prefill_tokens < 1:
            raise ValueError(f"decode.max_prefill_tokens must be >= 1, got {self.max_prefill_tokens}")
        if self.span_bucket < 1:
            raise ValueError(f"decode.span_bucket must be >= 1, got {self.span_bucket}")


@dataclass
class GenerationOutput:
    """Completions for ``len(prompts) * n`` samples, grouped per prompt (prompt i -> [i*n, (i+1)*n))."""

    completion_ids: list[list[int]]  # up to and including EOS when one was sampled
    logprobs: list[list[float]]  # log p of each sampled token under the temperature-scaled model
    finished: list[bool]  # False = truncated at max_new_tokens
    weight_version: int
    stats: dict[str, float] = field(default_factory=dict)


class Generator(Protocol):
    """What the GRPO loop needs from a rollout engine (built-in Megatron, or vLLM)."""

    weight_version: int

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingConfig) -> GenerationOutput: ...

    def sync_weights(self, model: Any, version: int) -> None: ...
