"""The memory plan of a run: static training state per rank plus the peak of one micro-batch, against a
device, with the key to change when it does not fit.

    static   weights, fp32 main grads, fp32 masters + Adam moments (sharded over DP by the distributed
             optimizer), the frozen reference model (beta > 0)         models.qwen.memory.estimate
    TRAIN    + one training micro-batch (``batching.train_max_tokens`` packed tokens, else
             ``micro_batch_size`` rows of max prompt + max completion): saved activations (with the
             configured sequence parallelism / recomputation) and the chunked LM-head transients
    LOGPROBS + one no-grad pass of ``batching.logprob_max_tokens``
    ROLLOUT  trainer weights (+ reference) resident while the co-located generator holds its share
             (vLLM: ``vllm.gpu_memory_utilization`` of the device; in the training phases a sleeping
             vLLM keeps only ``SLEEPING_GENERATOR_GIB``. The built-in generator: its KV cache of
             ``rollout.decode.max_batch_rows`` slots x the longest row, and one step's fp32 logits,
             freed when the rollout ends)

The activation figure is checked against saved-tensor bytes in tests/test_memory_plan.py; the
whole-step peak against measurements in docs/benchmarks.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.train_config import TrainConfig
from models.qwen.config import QwenConfig, parse_dtype
from models.qwen.memory import (
    ActivationEstimate,
    MemoryEstimate,
    activation_estimate,
    estimate,
    kv_bytes_per_token,
    logprob_pass_bytes,
)

GiB = 1024**3
SLEEPING_GENERATOR_GIB = 1.0  # vLLM asleep (level 1 or 2): CUDA context, graphs, allocator residue
RUNTIME_GIB = 0.75  # the trainer's own CUDA context and allocator slack (GPU); Python + libraries (CPU)


@dataclass(frozen=True)
class MemoryPlan:
    tp: int
    dp: int
    dtype: str
    static: MemoryEstimate
    reference_bytes: float
    train: ActivationEstimate
    logprob_tokens: int
    logprob_bytes: float
    generator_rollout_bytes: float  # the generator's share while it samples
    generator_train_bytes: float  # what it keeps while the trainer trains
    device_bytes: float | None
    backend: str = "megatron"

    @property
    def static_bytes(self) -> float:
        return self.static.total_bytes + self.reference_bytes + RUNTIME_GIB * GiB

    @property
    def phase_bytes(self) -> dict[str, float]:
        """Peak per phase on one rank."""
        weights = self.static.weights_bytes + self.reference_bytes + RUNTIME_GIB * GiB
        return {
            "rollout": weights + self.generator_rollout_bytes,  # grads + optimizer state offloaded
            "logprobs": self.static_bytes + self.logprob_bytes + self.generator_train_bytes,
            "train": self.static_bytes + self.train.peak_bytes + self.generator_train_bytes,
        }

    def problems(self) -> list[str]:
        """Why it does not fit (empty when it does, or when no device size is known), naming the keys."""
        if self.device_bytes is None:
            return []
        dev, gib = self.device_bytes, lambda x: f"{x / GiB:.1f} GiB"
        out = []
        ph = self.phase_bytes
        if ph["train"] > dev:
            out.append(
                f"TRAIN needs {gib(ph['train'])} per rank of {gib(dev)} (static {gib(self.static_bytes)}, "
                f"micro-batch of {self.train.tokens} tokens {gib(self.train.peak_bytes)}): lower "
                "batching.train_max_tokens (with batching.pack_sequences=true) or batching.logprob_chunk_tokens, "
                "enable recomputation, or raise parallel.tensor_parallel"
            )
        if ph["logprobs"] > dev:
            out.append(
                f"LOGPROBS needs {gib(ph['logprobs'])} per rank of {gib(dev)} ({self.logprob_tokens} tokens): "
                "lower batching.logprob_max_tokens or batching.logprob_chunk_tokens"
            )
        if ph["rollout"] > dev:
            key = (
                "rollout.decode.max_batch_rows"
                if self.backend == "megatron"
                else "vllm.gpu_memory_utilization"
            )
            out.append(f"ROLLOUT needs {gib(ph['rollout'])} per rank of {gib(dev)}: lower {key}")
        return out

    def format(self) -> str:
        gib = lambda x: f"{x / GiB:.2f}"  # noqa: E731
        s, t = self.static, self.train
        dev = "no device size" if self.device_bytes is None else f"device {gib(self.device_bytes)} GiB"
        ph = self.phase_bytes
        rows = [
            ("layout", f"TP{self.tp} x DP{self.dp}, {self.dtype}, {dev}"),
            ("weights / fp32 grads / masters / Adam", f"{gib(s.weights_bytes)} / {gib(s.grads_bytes)} / "
             f"{gib(s.master_bytes)} / {gib(s.adam_bytes)}"),
            ("reference model", gib(self.reference_bytes)),
            ("static per rank (+ runtime)", gib(self.static_bytes)),
            ("train micro-batch", f"{t.tokens} tokens: activations {gib(t.saved_bytes)} "
             f"({t.layer_bytes_per_token / 1024:.1f} KiB/token/layer), recompute {gib(t.recompute_bytes)}, "
             f"logits chunk {gib(t.logits_bytes)}"),
            ("logprob micro-batch", f"{self.logprob_tokens} tokens: {gib(self.logprob_bytes)}"),
            ("generator (rollout / training phases)",
             f"{gib(self.generator_rollout_bytes)} / {gib(self.generator_train_bytes)}"),
            ("peak ROLLOUT / LOGPROBS / TRAIN", f"{gib(ph['rollout'])} / {gib(ph['logprobs'])} / {gib(ph['train'])}"),
            ("fits", "unknown (no device size)" if self.device_bytes is None else
             ("yes" if not self.problems() else "NO: " + "; ".join(self.problems()))),
        ]  # fmt: skip
        return "\n".join(
            ["| memory plan (GiB per rank) | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
        )


def micro_batch_tokens(cfg: TrainConfig, budget: int | None) -> int:
    """Tokens of one physical micro-batch: the budget, else ``micro_batch_size`` full-length rows."""
    if budget is not None:
        return budget
    return cfg.batching.micro_batch_size * (cfg.data.max_prompt_length + cfg.rollout.max_completion_length)


def builtin_decode_bytes(cfg: TrainConfig, qcfg: QwenConfig, dp: int) -> tuple[int, int]:
    """(KV cache, one decode step's fp32 logits and sampling copies) bytes of the built-in generator on
    one rank: ``rollout.decode.max_batch_rows`` slots (default: this DP replica's prompts x G) of
    max prompt + max completion positions (``engine.rollout.kv_cache``)."""
    ro = cfg.rollout
    rows = -(-ro.prompts_per_step // dp) * ro.num_generations
    slots = min(rows, ro.decode.max_batch_rows or rows)
    max_len = cfg.data.max_prompt_length + ro.max_completion_length
    tp = cfg.parallel.tensor_parallel
    kv = slots * max_len * kv_bytes_per_token(qcfg, tp, parse_dtype(cfg.model.dtype))
    return kv, 3 * slots * (qcfg.padded_vocab_size(tp) // tp) * 4  # logits, scaled, exp


def plan_memory(
    cfg: TrainConfig,
    qcfg: QwenConfig,
    dp: int,
    device_gib: float | None = None,
    activations=None,
    distributed_optimizer: bool | None = None,
) -> MemoryPlan:
    """The plan of ``cfg`` at its TP and this ``dp`` (``activations``: the model's ``ActivationOptions``)."""
    tp, bc = cfg.parallel.tensor_parallel, cfg.batching
    dtype = parse_dtype(cfg.model.dtype)
    if distributed_optimizer is None:
        distributed_optimizer = cfg.optim.use_distributed_optimizer and torch.cuda.is_available()
    static = estimate(qcfg, tp, dp, dtype, distributed_optimizer)
    ref = static.weights_bytes if cfg.loss.beta > 0 else 0.0
    train_tokens = micro_batch_tokens(cfg, bc.train_max_tokens)
    C = cfg.rollout.max_completion_length
    rows = max(1, train_tokens // (cfg.data.max_prompt_length + C))
    scored = min(train_tokens, max(rows, 1) * C)
    train = activation_estimate(qcfg, train_tokens, tp, dtype, bc.logprob_chunk_tokens, scored, activations)
    lp_tokens = micro_batch_tokens(cfg, bc.logprob_max_tokens)
    needs_lp = cfg.loss.beta > 0 or cfg.loss.num_iterations > 1
    lp_bytes = logprob_pass_bytes(qcfg, lp_tokens, tp, dtype, bc.logprob_chunk_tokens) if needs_lp else 0.0
    device = None if device_gib is None else device_gib * GiB
    gen_rollout = gen_train = 0.0
    if cfg.rollout.backend == "vllm" and device is not None:
        v = cfg.vllm
        width = torch.finfo(dtype).bits // 8
        gen_rollout = (
            width * static.params_total + v.kv_cache_memory_bytes  # its weights + the explicit KV cache
            if v.kv_cache_memory_bytes
            else v.gpu_memory_utilization * device
        )
        gen_train = SLEEPING_GENERATOR_GIB * GiB if v.enable_sleep_mode else gen_rollout
    elif cfg.rollout.backend == "megatron":
        gen_rollout = float(sum(builtin_decode_bytes(cfg, qcfg, dp)))
    return MemoryPlan(
        tp, dp, cfg.model.dtype, static, ref, train, lp_tokens, lp_bytes, gen_rollout, gen_train, device,
        cfg.rollout.backend,
    )  # fmt: skip
