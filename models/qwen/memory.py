"""Parameter counts and per-rank training memory for a Qwen2 config at a TP x DP layout.

Counts come from the weight mapping's per-rank shard shapes, so they are exactly what the built
model holds (checked against a meta-device build in the tests), with no weights needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.qwen.config import QwenConfig
from models.qwen.hf_mapping import mcore_shard_shape, rules

GiB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    tp: int
    dp: int
    params_total: int  # unpadded, as HF counts them
    params_per_rank: int  # this rank's shards, vocab padding included
    weights_bytes: int
    grads_bytes: int  # Megatron DDP keeps fp32 main_grad buffers
    master_bytes: int  # fp32 master copy when params are bf16/fp16 (sharded by the distributed optimizer)
    adam_bytes: int  # exp_avg + exp_avg_sq in fp32 (sharded by the distributed optimizer)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.grads_bytes + self.master_bytes + self.adam_bytes


def param_count(cfg: QwenConfig) -> int:
    """Total parameters of the HF model (no vocab padding)."""
    from models.qwen.hf_mapping import hf_names, hf_shape

    return sum(math.prod(hf_shape(cfg, n)) for n in hf_names(cfg))


def params_per_rank(cfg: QwenConfig, tp: int) -> int:
    return sum(math.prod(mcore_shard_shape(cfg, r, tp)) for r in rules(cfg))


def estimate(
    cfg: QwenConfig, tp: int, dp: int, params_dtype: torch.dtype, distributed_optimizer: bool = True
) -> MemoryEstimate:
    """Static training memory per rank (activations, KV cache and the reference model excluded)."""
    cfg.check_tp(tp)
    n = params_per_rank(cfg, tp)
    width = torch.finfo(params_dtype).bits // 8
    shard = dp if distributed_optimizer else 1
    master = 0 if params_dtype == torch.float32 else 4 * n // shard
    return MemoryEstimate(
        tp=tp,
        dp=dp,
        params_total=param_count(cfg),
        params_per_rank=n,
        weights_bytes=width * n,
        grads_bytes=4 * n,
        master_bytes=master,
        adam_bytes=8 * n // shard,
    )


# ---- decode (the built-in generator) ------------------------------------------------------------------


def kv_bytes_per_token(cfg: QwenConfig, tp: int, dtype: torch.dtype) -> int:
    """KV-cache bytes of one token on one rank: keys and values of every layer, KV heads split over TP."""
    cfg.check_tp(tp)
    width = torch.finfo(dtype).bits // 8
    return cfg.num_hidden_layers * 2 * (cfg.num_key_value_heads // tp) * cfg.kv_channels * width


def decode_weight_bytes(cfg: QwenConfig, tp: int, dtype: torch.dtype) -> int:
    """Weight bytes one decode step reads on one rank: every weight except the input embedding table
    (a lookup reads only the batch's rows), which a tied LM head does read in full."""
    width = torch.finfo(dtype).bits // 8
    embedding = 0 if cfg.tie_word_embeddings else cfg.padded_vocab_size(tp) // tp * cfg.hidden_size
    return width * (params_per_rank(cfg, tp) - embedding)


def format_table(rows: list[MemoryEstimate]) -> str:
    head = "| TP | DP | params total | params/rank | weights GiB | grads GiB | master GiB | Adam GiB | total GiB |"
    lines = [head, "|" + "---|" * 9]
    for e in rows:
        lines.append(
            f"| {e.tp} | {e.dp} | {e.params_total:,} | {e.params_per_rank:,} | {e.weights_bytes / GiB:.2f} | "
            f"{e.grads_bytes / GiB:.2f} | {e.master_bytes / GiB:.2f} | {e.adam_bytes / GiB:.2f} | "
            f"{e.total_bytes / GiB:.2f} |"
        )
    return "\n".join(lines)


# ---- activations of one micro-batch -------------------------------------------------------------------
@dataclass(frozen=True)
class ActivationEstimate:
    """What one physical micro-batch of ``tokens`` (``scored`` of them completion tokens) adds on a rank
    during its forward/backward (bytes)."""

    tokens: int
    scored: int
    layer_bytes_per_token: float  # saved for backward per token per decoder layer (after recompute)
    saved_bytes: float  # everything the backward needs: decoder layers + final norm + LM-head inputs
    recompute_bytes: float  # during the backward, one recompute unit's activations (full recompute)
    logits_bytes: float  # chunked LM-head transients, the larger of forward and backward

    @property
    def peak_bytes(self) -> float:
        return self.saved_bytes + max(self.recompute_bytes, self.logits_bytes)


def layer_activation_elements(
    cfg: QwenConfig, tp: int, sequence_parallel: bool = False, selective_core_attn: bool = False
) -> tuple[float, float]:
    """(elements in the model dtype, fp32 bytes) saved for backward per token by one decoder layer
    (the local spec: SDPA core attention, unfused SwiGLU, torch RMSNorm, RoPE tables per layer).

    Measured with ``saved_tensors_hooks`` (tests/test_memory_plan.py): each RMSNorm keeps its input,
    the normalised input and its output (3h, sharded over TP with sequence parallelism); the core
    attention keeps q, k, v and its output (SDPA, O(S)) plus the fp32 log-sum-exp per head; the
    attention output is kept twice (core output, proj input); RoPE keeps cos/sin of q and k (4 d);
    the MLP keeps fc1's output (2f), silu's output, the product and fc2's input (3f), over TP.
    """
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.kv_channels
    kvd = cfg.num_key_value_heads * d
    norms = 6 * h / (tp if sequence_parallel else 1)
    core = (h + 2 * kvd) / tp + (0 if selective_core_attn else h / tp)
    lse_bytes = 0.0 if selective_core_attn else 4.0 * cfg.num_attention_heads / tp
    attn_out = 2 * h / tp
    mlp = 5 * f / tp
    return norms + core + attn_out + 4 * d + mlp, lse_bytes


def activation_estimate(
    cfg: QwenConfig,
    tokens: int,
    tp: int,
    params_dtype: torch.dtype,
    chunk_tokens: int,
    scored: int | None = None,
    activations=None,
) -> ActivationEstimate:
    """Activation and logits memory of one micro-batch of ``tokens`` packed tokens on one rank.

    ``activations``: ``ActivationOptions`` (sequence parallelism; recompute ``selective`` with
    ``core_attn``, or ``full`` with ``uniform``/``block`` units of ``recompute_num_layers``); None = neither.
    ``scored``: completion tokens scored by the LM head (default: all ``tokens``, an upper bound).
    """
    e = torch.finfo(params_dtype).bits // 8
    L, h = cfg.num_hidden_layers, cfg.hidden_size
    scored = tokens if scored is None else scored
    sp = bool(activations is not None and activations.sequence_parallel and tp > 1)
    gran = None if activations is None else activations.recompute_granularity
    selective = gran == "selective" and "core_attn" in tuple(activations.recompute_modules)
    elems, fp32_bytes = layer_activation_elements(cfg, tp, sp, selective)
    layer = e * elems + fp32_bytes
    h_in = e * h / (tp if sp else 1)  # a layer's input, what full recompute keeps
    if gran == "full" and activations.recompute_method == "block":  # first n layers: input only
        n = min(activations.recompute_num_layers, L)
        decoder, recompute = tokens * (h_in * n + layer * (L - n)), tokens * layer
    elif gran == "full":  # uniform: units of n layers keep their input; one unit re-runs at a time
        n = min(activations.recompute_num_layers, L)
        decoder, recompute = tokens * h_in * math.ceil(L / n), tokens * layer * n
    else:
        decoder, recompute = tokens * layer * L, 0.0
    # final RMSNorm (input, normalised) + the LM head's selected hidden states and per-token lse
    head = tokens * 2 * e * h + scored * (e * h + 4 + 8)
    V = cfg.padded_vocab_size(tp) // tp
    c = min(chunk_tokens, max(scored, 1))
    fwd = c * V * (8 + (e if e != 4 else 0))  # fp32 logits and exp; the matmul output when not fp32
    bwd = c * V * (4 + (e if e != 4 else 0)) + 4 * V * h + (e * V * h if e != 4 else 0) + scored * e * h
    return ActivationEstimate(tokens, scored, layer, decoder + head, recompute, max(fwd, bwd))


def logprob_pass_bytes(
    cfg: QwenConfig, tokens: int, tp: int, params_dtype: torch.dtype, chunk_tokens: int
) -> float:
    """Peak of a no-grad logprob pass over ``tokens``: one layer's intermediates, the hidden states kept
    for the LM head, and one logits chunk."""
    e = torch.finfo(params_dtype).bits // 8
    elems, fp32_bytes = layer_activation_elements(cfg, tp)
    V = cfg.padded_vocab_size(tp) // tp
    c = min(chunk_tokens, max(tokens, 1))
    return tokens * (e * elems + fp32_bytes + 3 * e * cfg.hidden_size) + c * V * (8 + (e if e != 4 else 0))
