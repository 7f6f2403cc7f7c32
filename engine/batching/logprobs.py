"""Per-token log-probabilities and entropy: from vocab-parallel logits (Megatron's vocab-parallel CE),
and of a micro-batch's completion tokens under a model (``completion_logprobs``).

The vocab is padded to a multiple of 128 * TP; the padded columns live at the end of the last TP
rank's shard. They are masked to -inf here, so they never reach sampling, losses or logprobs.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention

from engine.batching.micro_batches import MicroBatch, shared_prefix_layout
from models.qwen.model import forward_logits, prefix_tree_attention_mask, unwrap


def _shard_range(shard_width: int) -> tuple[int, int]:
    rank = parallel_state.get_tensor_model_parallel_rank()
    return rank * shard_width, (rank + 1) * shard_width


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Return float32 logits with this shard's padded-vocab columns set to -inf (a new tensor)."""
    lo, hi = _shard_range(logits.shape[-1])
    out = logits.float()
    if hi <= vocab_size:
        # A copy either way: vocab_parallel_cross_entropy subtracts the max in place.
        return out.clone() if out is logits else out
    cols = torch.arange(lo, hi, device=logits.device) >= vocab_size
    return out.masked_fill(cols, float("-inf"))


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, temperature: float = 1.0
) -> torch.Tensor:
    """log p(target) for vocab-parallel ``logits`` [..., V/TP] and ``targets`` [...] (differentiable).

    ``temperature`` divides the logits first, so the trainer scores tokens with the same
    distribution the sampler drew them from (trl #4159); the open-rs recipe uses 1.0.
    """
    logits = mask_padded_vocab(logits, vocab_size)
    if temperature != 1.0:
        logits = logits / temperature
    return -tensor_parallel.vocab_parallel_cross_entropy(logits, targets)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, vocab_size: int, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of the (temperature-scaled) next-token distribution, [...] (metric only, no grad)."""
    logits = mask_padded_vocab(logits, vocab_size) / temperature
    group = parallel_state.get_tensor_model_parallel_group()
    m = logits.max(dim=-1).values
    torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
    z = logits - m.unsqueeze(-1)
    e = z.exp()
    sum_e = e.sum(-1)
    sum_ez = (e * torch.where(torch.isfinite(z), z, torch.zeros_like(z))).sum(-1)
    torch.distributed.all_reduce(sum_e, group=group)
    torch.distributed.all_reduce(sum_ez, group=group)
    return sum_e.log() - sum_ez / sum_e


def gather_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """All-gather vocab-parallel logits over TP and drop the padded columns: [..., vocab_size]."""
    full = tensor_parallel.gather_from_tensor_model_parallel_region(logits.contiguous())
    return full[..., :vocab_size]


def completion_logprobs(
    model: torch.nn.Module, mb: MicroBatch, vocab_size: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each completion token [completions, C], its vocab-parallel logits [completions, C, V/TP])."""
    device = next(model.parameters()).device
    ids = mb.input_ids.to(device)
    if not mb.group_size:
        logits = forward_logits(model, ids, mb.attn.to(device))
        logits = logits[:, mb.P - 1 : -1]  # position t predicts token t + 1
        return token_logprobs(logits, ids[:, mb.P :], vocab_size, temperature).cpu(), logits
    core = type(unwrap(model).decoder.layers[0].self_attention.core_attention)
    if core is not DotProductAttention:
        # Packed rows need the explicit mask applied; only the local spec is verified to (TE was not
        # installable in CI or on the lent GPU), so refuse rather than risk slots seeing each other.
        raise NotImplementedError(f"batching.shared_prefix needs the local attention spec, model has {core}")
    G, C = mb.group_size, mb.completion_mask.shape[1]
    positions, segments, sources, targets = shared_prefix_layout(mb.P, G, C)
    mask = prefix_tree_attention_mask(mb.attn.to(device), segments)
    logits = forward_logits(model, ids, attn_mask=mask, positions=positions)
    logits = logits[:, sources.to(device)].flatten(0, 1)  # [groups * G, C, V/TP], unpacked row order
    tokens = ids[:, targets.to(device)].flatten(0, 1)
    return token_logprobs(logits, tokens, vocab_size, temperature).cpu(), logits
