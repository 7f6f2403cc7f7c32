"""The GRPO run's configuration: one dataclass per concern, composed into ``TrainConfig``.

Loaded with ``engine.config.load_config(TrainConfig, yaml, overrides)``; every concern validates
itself in ``__post_init__``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.data import DataConfig
from engine.evaluation import EvalConfig
from engine.loss import LossConfig, check_whole_groups
from engine.optimizer import OptimizerConfig
from engine.rewards import RewardConfig
from engine.vllm_generator import VLLMConfig
from parallel.distributed import ParallelConfig


@dataclass
class ModelConfig:
    config: str = ""  # HF config.json (or a dir holding one): the architecture
    hf_checkpoint: str | None = None  # HF safetensors dir to start from; None = random init
    dtype: str = "fp32"  # fp32 | bf16 | fp16 (bf16 needs a GPU to be fast)

    def __post_init__(self) -> None:
        if not self.config and not self.hf_checkpoint:
            raise ValueError("model.config (an HF config.json) or model.hf_checkpoint must be set")


@dataclass
class RolloutConfig:
    """How completions are sampled, and how many per optimizer step."""

    backend: str = "megatron"  # megatron (built-in) | vllm (issue: co-located vLLM)
    num_generations: int = 6  # G: completions per prompt
    prompts_per_step: int = 12  # global prompts per optimizer step (open-rs: 12 x 6 = 72)
    micro_batch_size: int = 6  # completions per forward/backward per rank
    max_completion_length: int = 3584
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    # Divide the trainer's logits by the sampling temperature (trl #4159); open-rs did not (False).
    scale_logprobs_by_temperature: bool = False
    mask_truncated_completions: bool = False  # open-rs keeps truncated completions in the loss
    # Stop the run when mean |logp_generator - logp_trainer| on the same weights exceeds this
    # (needs scale_logprobs_by_temperature or T=1 so both score the same distribution). None = log only.
    max_logprob_diff: float | None = None

    def __post_init__(self) -> None:
        if self.backend not in ("megatron", "vllm"):
            raise ValueError(f"rollout.backend={self.backend!r}: expected 'megatron' or 'vllm'")
        for name in ("num_generations", "prompts_per_step", "micro_batch_size", "max_completion_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"rollout.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class CheckpointConfig:
    dir: str = ""  # "" = <logging.dir>/checkpoints
    save_every: int = 50  # steps; 0 = only the final checkpoint
    keep_last: int = 3
    resume: str = ""  # "" = fresh start; "latest" = newest in `dir` if any; or a checkpoint path


@dataclass
class LoggingConfig:
    dir: str = "runs/grpo"
    log_completions: int = 1  # print this many sample completions every step (rank 0)


@dataclass
class TrainConfig:
    seed: int = 42
    max_steps: int = 500
    model: ModelConfig = field(
        default_factory=lambda: ModelConfig(config="configs/models/deepseek-r1-distill-qwen-1.5b.json")
    )
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        ro = self.rollout
        if self.loss.shared_prefix:
            check_whole_groups(ro.micro_batch_size, ro.num_generations)
        if self.loss.tis_cap and ro.temperature not in (0.0, 1.0) and not ro.scale_logprobs_by_temperature:
            raise ValueError(
                "loss.tis_cap compares rollout and trainer logprobs: set "
                "rollout.scale_logprobs_by_temperature=true so both use the sampling temperature"
            )
