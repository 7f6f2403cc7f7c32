"""What the GRPO loop needs from a rollout engine: ``Generator``, ``SamplingConfig``, ``GenerationOutput``.

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
