"""The GRPO run's configuration: one dataclass per concern (one YAML section each), composed into
``TrainConfig``.

Loaded with ``engine.config.load_config(TrainConfig, yaml, overrides)``; every section validates itself
in ``__post_init__`` (fields typed ``Literal[...]`` through ``engine.config.check_literals``). This
module imports neither torch nor Megatron, so resolving and printing a config is fast
(``tools/train_grpo.py --print-config``). Sections whose code is torch-free keep their dataclass beside
that code (``DataConfig`` in ``engine.data``, ``RewardConfig`` in ``engine.rewards``, ``EvalConfig`` in
``engine.evaluation``); the others are defined here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from engine.config import check_literals
from engine.data import DataConfig
from engine.evaluation import EvalConfig
from engine.rewards import RewardConfig
from engine.rollout.base import DecodeConfig

DTYPES = ("fp32", "bf16", "fp16")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# The recipe's model: the architecture of a random init when neither model.config nor a checkpoint is given.
DEFAULT_MODEL_CONFIG = str(
    Path(__file__).resolve().parents[1] / "configs/models/deepseek-r1-distill-qwen-1.5b.json"
)


@dataclass
class ModelConfig:
    """The architecture and the starting weights. With ``hf_checkpoint`` set, the checkpoint's own
    ``config.json`` is the architecture; a ``config`` given beside it must describe the same network
    (checked at start, ``engine.model_loading.resolve_model_config``). Without a checkpoint, ``config``
    (default: DeepSeek-R1-Distill-Qwen-1.5B) is the architecture of a random init."""

    config: str | None = None  # HF config.json (or a dir holding one); None = the checkpoint's / the default
    hf_checkpoint: str | None = None  # HF safetensors dir to start from; None = random init
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16 needs a GPU to be fast

    def __post_init__(self) -> None:
        check_literals(self, "model")
        if self.config == "":
            self.config = None

    @property
    def architecture_file(self) -> str:
        """Where the architecture comes from: ``config``, else the checkpoint, else the default."""
        return self.config or self.hf_checkpoint or DEFAULT_MODEL_CONFIG


@dataclass
class ParallelConfig:
    """Layout over ranks, and how the policy's activations are kept (Megatron-Core's names; see
    ``models.qwen.config.ActivationOptions``). The frozen reference model never recomputes."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1  # only 1 is supported by the engine for now
    timeout_minutes: int = 30  # torch.distributed collective timeout
    sequence_parallel: bool = False  # shard norms/residuals over TP along the sequence (TP > 1)
    recompute_granularity: Literal["selective", "full"] | None = None
    recompute_method: Literal["uniform", "block"] | None = None  # full recompute only
    recompute_num_layers: int | None = None  # full recompute only: layers per unit / first N layers
    recompute_modules: list[Literal["core_attn", "mlp", "layernorm"]] = field(
        default_factory=lambda: ["core_attn"]
    )

    def __post_init__(self) -> None:
        if self.tensor_parallel < 1:
            raise ValueError(f"parallel.tensor_parallel must be >= 1, got {self.tensor_parallel}")
        if self.pipeline_parallel != 1:
            raise ValueError(f"parallel.pipeline_parallel={self.pipeline_parallel}: only 1 is supported")
        if self.timeout_minutes < 1:
            raise ValueError(f"parallel.timeout_minutes must be >= 1, got {self.timeout_minutes}")
        check_literals(self, "parallel")
        if self.recompute_granularity == "full" and (
            self.recompute_method is None or not self.recompute_num_layers
        ):
            raise ValueError(
                "parallel.recompute_granularity=full needs parallel.recompute_method (uniform | block) and "
                f"parallel.recompute_num_layers >= 1, got {self.recompute_method!r} and {self.recompute_num_layers!r}"
            )


@dataclass
class RolloutConfig:
    """How completions are sampled, and how many per optimizer step."""

    backend: Literal["megatron", "vllm"] = "megatron"  # built-in generator | co-located vLLM
    num_generations: int = 6  # G: completions per prompt
    prompts_per_step: int = 12  # global prompts per optimizer step (open-rs: 12 x 6 = 72)
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
    # The built-in generator's batching: decode slots, host-sync interval, prefill budget, CUDA graphs.
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    def __post_init__(self) -> None:
        check_literals(self, "rollout")
        for name in ("num_generations", "prompts_per_step", "max_completion_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"rollout.{name} must be >= 1, got {getattr(self, name)}")


def check_whole_groups(micro_batch_size: int, num_generations: int) -> None:
    """``batching.shared_prefix`` packs whole groups into each micro-batch."""
    if micro_batch_size % num_generations:
        raise ValueError(
            f"batching.shared_prefix=true packs whole groups: batching.micro_batch_size={micro_batch_size} "
            f"must be a multiple of rollout.num_generations={num_generations}"
        )


@dataclass
class BatchingConfig:
    """How a step's completions are laid out for the logprob and training passes."""

    micro_batch_size: int = 6  # completions per forward/backward per rank (the loss's token-mean unit)
    # Training forward layout (Prefix Grouper): each group as ONE row [prompt | G completions] with
    # a mask that keeps completions apart, so the prompt is forwarded once, not G times. Same loss
    # and gradients; micro_batch_size must be a multiple of rollout.num_generations.
    shared_prefix: bool = False
    # Whole sequences (prompt + completion) back to back in one row, no padding computed; positions
    # restart per sequence, attention never crosses sequences. Same loss and gradients.
    pack_sequences: bool = False
    # Token budgets per physical micro-batch (prompt + completion tokens; need pack_sequences): the
    # gradient pass and the no-grad reference/old logprob passes. None = one physical micro-batch per
    # logical one. The loss stays defined on micro_batch_size completions (engine.batching.normalisation).
    train_max_tokens: int | None = None
    logprob_max_tokens: int | None = None
    # LM-head rows scored at once: fp32 [chunk, V/TP] logits exist one chunk at a time, forward and backward.
    logprob_chunk_tokens: int = 512

    def __post_init__(self) -> None:
        def bad(key: str, value: object, valid: str) -> ValueError:
            return ValueError(f"batching.{key}={value!r} is invalid; valid options: {valid}")

        if self.micro_batch_size < 1:
            raise ValueError(f"batching.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        for key in ("shared_prefix", "pack_sequences"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, getattr(self, key), "True or False")
        for key in ("train_max_tokens", "logprob_max_tokens"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise bad(key, v, "None or an int >= 1 (tokens per micro-batch)")
            if v is not None and not self.pack_sequences:
                raise ValueError(
                    f"batching.{key}={v} needs batching.pack_sequences=true (budgets pack sequences)"
                )
        c = self.logprob_chunk_tokens
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise bad("logprob_chunk_tokens", c, "an int >= 1 (e.g. 512)")
        if self.pack_sequences and self.shared_prefix:
            raise ValueError(
                "batching.pack_sequences=true and batching.shared_prefix=true cannot be combined"
            )


@dataclass
class AdvantageConfig:
    """Group-relative advantages A = (r - baseline_g) / (std_g + eps) (``engine.advantages``)."""

    scale_rewards: bool = True  # divide by the group std (TRL); False = Dr. GRPO
    baseline: Literal["mean", "leave_one_out"] = "mean"  # GRPO | RLOO

    def __post_init__(self) -> None:
        check_literals(self, "advantages")
        if not isinstance(self.scale_rewards, bool):
            raise ValueError(
                f"advantages.scale_rewards={self.scale_rewards!r} is invalid; valid options: True or False"
            )


@dataclass
class LossConfig:
    """The clipped-surrogate GRPO objective with a KL penalty (``engine.loss.grpo_loss``)."""

    beta: float = 0.04  # KL coefficient against the frozen reference
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    # Clamp the log-ratio input to [-c, c] and k3's value to [-10, 10] (verl low_var_kl, NeMo-RL); None = off
    # (TRL, the open-rs configs). A clamped token gets no KL gradient (k3 from log-ratio ~2.6 up).
    kl_clamp: float | None = 20.0
    # TRL 1.16 use_bias_correction_kl (DeepSeek-V3.2): KL_t x the importance ratio pi/pi_old (with grad);
    # on-policy the value is unchanged and the gradient gains beta * KL_t * grad(logp).
    kl_bias_correction: bool = False
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    dual_clip_c: float | None = None  # e.g. 3.0: dual clip for A < 0 (verl clip_ratio_c)
    # token-mean: per logical micro-batch (batching.micro_batch_size); token-mean-global: over the step (DAPO)
    loss_agg: Literal["token-mean", "token-mean-global", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = (
        "token-mean"
    )
    norm_length: int | None = None  # constant for seq-mean-token-sum-norm; default T
    # seq-mean-* divide by the rows with >= 1 loss token ("nonempty": a row masked out entirely, e.g. by
    # rollout.mask_truncated_completions, is not in the mean) or by every row ("all": TRL 1.16's
    # loss_type="grpo" / "dr_grpo", a masked row counts as 0).
    seq_mean_denominator: Literal["nonempty", "all"] = "nonempty"
    tis_cap: float | None = None  # truncated IS: weight min(exp(old - rollout), cap)
    num_iterations: int = 1  # mu: policy updates per batch over stored old logprobs

    def __post_init__(self) -> None:
        def bad(field: str, value: object, valid: str) -> ValueError:
            return ValueError(f"loss.{field}={value!r} is invalid; valid options: {valid}")

        check_literals(self, "loss")
        if not _is_number(self.beta) or not math.isfinite(self.beta) or self.beta < 0:
            raise bad("beta", self.beta, "a finite number >= 0")
        if self.kl_clamp is not None and (not _is_number(self.kl_clamp) or self.kl_clamp <= 0):
            raise bad("kl_clamp", self.kl_clamp, "None or a number > 0")
        if not isinstance(self.kl_bias_correction, bool):
            raise bad("kl_bias_correction", self.kl_bias_correction, "True or False")
        low, high = self.clip_eps_low, self.clip_eps_high
        if not _is_number(low) or not math.isfinite(low) or not 0 <= low < 1:
            raise bad("clip_eps_low", low, "a number in [0, 1)")
        if not _is_number(high) or not math.isfinite(high) or high < 0:
            raise bad("clip_eps_high", high, "a finite number >= 0")
        if self.dual_clip_c is not None and (not _is_number(self.dual_clip_c) or not self.dual_clip_c > 1):
            raise bad("dual_clip_c", self.dual_clip_c, "None or a number > 1 (e.g. 3.0)")
        n = self.norm_length
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise bad("norm_length", n, "None or an int >= 1")
        if self.tis_cap is not None and (not _is_number(self.tis_cap) or not self.tis_cap > 0):
            raise bad("tis_cap", self.tis_cap, "None or a number > 0 (e.g. 2.0)")
        mu = self.num_iterations
        if isinstance(mu, bool) or not isinstance(mu, int) or mu < 1:
            raise bad("num_iterations", mu, "an int >= 1")


@dataclass
class OptimizerConfig:
    lr: float = 1e-6
    min_lr_ratio: float = 0.1  # cosine floor = lr * min_lr_ratio
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True  # GPU only; ignored on CPU

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


@dataclass
class VLLMConfig:
    """Settings of the co-located vLLM engine (one per rank; ``engine.rollout.vllm_generator``)."""

    gpu_memory_utilization: float = 0.5  # fraction of the GPU vLLM may use (weights + KV cache)
    kv_cache_memory_bytes: int | None = None  # explicit KV cache size; overrides the fraction
    cpu_kv_cache_mb: int = 128  # CPU only: KV cache size (the fraction means host RAM there)
    enable_sleep_mode: bool = True  # GPU: release memory between rollouts (forced off on CPU)
    sleep_level: Literal[1, 2] = 2  # 1: weights offloaded to host; 2: weights dropped (always re-synced)
    enforce_eager: bool = False  # GPU: False = CUDA graphs; CPU always runs eager
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    # engine dtype. The trainer turns "auto" into its own dtype (model.dtype): vLLM's "auto" would
    # run a float32 config in bf16 on CPU. bfloat16 | float16 | float32 are passed as they are.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    bucket_mb: float = 512.0  # weight-sync bucket size (HF tensors in the engine dtype)
    tensor_parallel_size: int = 1  # 1 (an engine per rank) or the Megatron TP size (GPU only)
    seed: int = 0  # engine seed (per-request seeds come from SamplingConfig.seed)
    max_num_seqs: int | None = None
    enable_prefix_caching: bool = True
    load_format: str = "dummy"  # initial weights: random (a sync always follows) or "auto" (from disk)
    skip_tokenizer_init: bool = True  # ids in, ids out: no tokenizer needed
    allow_renormalized_logprobs: bool = False  # accept top_p < 1 / top_k > 0 (nucleus-renormalised logprobs)
    extra_engine_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to vllm.LLM as is

    def __post_init__(self) -> None:
        check_literals(self, "vllm")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"vllm.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.bucket_mb <= 0:
            raise ValueError(f"vllm.bucket_mb must be > 0, got {self.bucket_mb}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"vllm.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")


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
    seed: int = 42  # model init, dropout and every sampling stream derive from it (engine.seeds)
    max_steps: int = 500
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    advantages: AdvantageConfig = field(default_factory=AdvantageConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
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
        if self.batching.shared_prefix:
            check_whole_groups(self.batching.micro_batch_size, ro.num_generations)
        if self.loss.tis_cap and ro.temperature not in (0.0, 1.0) and not ro.scale_logprobs_by_temperature:
            raise ValueError(
                "loss.tis_cap compares rollout and trainer logprobs: set "
                "rollout.scale_logprobs_by_temperature=true so both use the sampling temperature"
            )
