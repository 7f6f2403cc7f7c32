"""Per-token log-probabilities and entropy of completion tokens, without full logits.

``completion_logprobs(model, mb, ...)`` runs the decoder (``models.qwen.model.forward_hidden``), keeps
the hidden states of the positions that predict a completion token (never prompt positions), and
scores them with ``chunked_logprobs``: a custom autograd function over (hidden states, LM-head
weight) that forms the vocab-parallel logits ``chunk_tokens`` rows at a time, reduces max / sum-exp /
target logit over TP as Megatron's ``vocab_parallel_cross_entropy`` does, and recomputes each chunk's
logits in the backward. So fp32 [tokens, V/TP] never exists beyond one chunk, forward or backward;
the entropy comes from the same pass, without grad.

``token_logprobs`` / ``token_entropy`` score logits that already exist (Megatron's vocab-parallel CE;
the reference the chunked path is tested against).

The vocab is padded to a multiple of 128 * TP; the padded columns live at the end of the last TP
rank's shard. They are masked to -inf here, so they never reach sampling, losses or logprobs.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel
from torch import Tensor

from engine.batching.micro_batches import MicroBatch, score_positions, shared_prefix_layout
from models.qwen.model import forward_hidden, is_te_model, prefix_tree_segments, unwrap

DEFAULT_CHUNK_TOKENS = 512


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


# ---- chunked, vocab-parallel ------------------------------------------------------------------------
def _chunk_logits(hidden: Tensor, weight: Tensor, vocab_size: int, temperature: float) -> Tensor:
    """fp32 logits / T of ``hidden`` [n, H] on this TP shard [n, V/TP], padded columns -inf (a new tensor)."""
    z = (hidden @ weight.t()).float()  # the output layer's matmul in the model dtype, as forward_logits
    lo, hi = _shard_range(weight.shape[0])
    if hi > vocab_size:
        z[:, max(vocab_size - lo, 0) :] = float("-inf")
    if temperature != 1.0:
        z.div_(temperature)
    return z


class _ChunkedVocabParallelLogprobs(torch.autograd.Function):
    """(log p(target) [N], entropy [N] or empty) of ``hidden`` [N, H] under the vocab-parallel LM head.

    Forward per chunk: logits z, max over TP, target logit (owned by one shard) and sum-exp (and
    sum p*z for the entropy) summed over TP; only the per-token log-sum-exp is saved. Backward per
    chunk: z recomputed, p = exp(z - lse), dlogp/dz = onehot - p (over 1/T), no TP collective: the
    hidden-state gradient is this shard's partial sum, summed over TP by the caller's
    ``copy_to_tensor_model_parallel_region``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size, temperature, chunk, with_entropy):
        group = parallel_state.get_tensor_model_parallel_group()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        N, width = hidden.shape[0], weight.shape[0]
        lo, hi = _shard_range(width)
        logp = hidden.new_empty(N, dtype=torch.float32)
        lse = hidden.new_empty(N, dtype=torch.float32)
        ent = hidden.new_empty(N if with_entropy else 0, dtype=torch.float32)
        for s in range(0, N, chunk):
            e_ = min(s + chunk, N)
            z = _chunk_logits(hidden[s:e_], weight, vocab_size, temperature)
            m = z.max(dim=-1).values
            if tp > 1:
                torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
            z.sub_(m[:, None])
            t = targets[s:e_]
            mine = (t >= lo) & (t < hi)
            zt = z.gather(1, (t - lo).clamp(0, width - 1)[:, None])[:, 0]
            zt = torch.where(mine, zt, torch.zeros_like(zt))  # another shard's target: 0 here
            p = z.exp()
            stats = [zt, p.sum(-1)]
            if with_entropy:
                if hi > vocab_size:  # padded columns: p = 0 there, and 0 * -inf would be NaN
                    z[:, max(vocab_size - lo, 0) :] = 0.0
                stats.append((p[:, None, :] @ z[:, :, None])[:, 0, 0])
            del z, p
            stats = torch.stack(stats)
            if tp > 1:
                torch.distributed.all_reduce(stats, group=group)
            log_sum = stats[1].log()
            logp[s:e_] = stats[0] - log_sum
            lse[s:e_] = m + log_sum
            if with_entropy:
                ent[s:e_] = log_sum - stats[2] / stats[1]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.vocab_size, ctx.temperature, ctx.chunk = vocab_size, temperature, chunk
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, _grad_ent):
        hidden, weight, targets, lse = ctx.saved_tensors
        N, width = hidden.shape[0], weight.shape[0]
        lo, hi = _shard_range(width)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        need_w = ctx.needs_input_grad[1]
        acc = torch.float32 if weight.dtype != torch.float64 else torch.float64
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_logp = grad_logp.float()
        for s in range(0, N, ctx.chunk):
            e_ = min(s + ctx.chunk, N)
            g = grad_logp[s:e_]
            z = _chunk_logits(hidden[s:e_], weight, ctx.vocab_size, ctx.temperature)
            p = z.sub_(lse[s:e_, None]).exp_()  # softmax, in place
            p.mul_(-g[:, None] / ctx.temperature)  # d logp / d logits = (onehot - p) / T
            t = targets[s:e_]
            mine = (t >= lo) & (t < hi)
            rows = torch.nonzero(mine)[:, 0]
            p[rows, t[rows] - lo] += g[rows] / ctx.temperature
            gl = p.to(weight.dtype)
            if grad_h is not None:
                grad_h[s:e_] = gl @ weight
            if need_w:
                grad_w.addmm_(gl.t().to(acc), hidden[s:e_].to(acc))
            del z, p, gl
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None


def chunked_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    vocab_size: int,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """(log p(targets) [N] fp32, differentiable in ``hidden`` and ``weight``; entropy [N] or None).

    ``hidden`` [N, H] is replicated over TP (its gradient is summed over TP here), ``weight`` the
    vocab-parallel LM head [V/TP, H]. Equal to ``token_logprobs`` / ``token_entropy`` of
    ``hidden @ weight.T``; peak extra memory ~2 x ``chunk_tokens`` x V/TP x 4 bytes.
    """
    if chunk_tokens < 1:
        raise ValueError(f"batching.logprob_chunk_tokens must be >= 1, got {chunk_tokens}")
    hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden)
    lp, ent = _ChunkedVocabParallelLogprobs.apply(
        hidden, weight, targets, vocab_size, float(temperature), int(chunk_tokens), with_entropy
    )
    return lp, (ent if with_entropy else None)


def output_weight(model: torch.nn.Module) -> Tensor:
    """The LM head's vocab-parallel weight [V/TP, H] (the embedding when tied), as ``output_logits`` uses."""
    gpt = unwrap(model)
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def completion_hidden(model: torch.nn.Module, mb: MicroBatch) -> tuple[Tensor, Tensor, Tensor]:
    """(hidden states [N, H] of the positions that predict completion tokens, their targets [N], and
    where each lands in the [completions, C] grid: flat index row * C + t), for any micro-batch layout."""
    device = next(model.parameters()).device
    ids = mb.input_ids.to(device)
    sources, targets, slots = (t.to(device) for t in score_positions(mb))
    if mb.packed is not None:  # packed sequences: one row, segments keep them apart
        lay = mb.packed
        hidden = forward_hidden(model, ids, lay.positions, segment_ids=lay.segment_ids.to(device))
    elif mb.group_size:  # shared prefix (Prefix Grouper): one row per group
        if is_te_model(model):
            raise NotImplementedError(
                "batching.shared_prefix needs the local attention spec (no TE test here)"
            )
        positions, segments, _, _ = shared_prefix_layout(mb.P, mb.group_size, mb.completion_mask.shape[1])
        seg_ids, branch_ids = prefix_tree_segments(mb.attn.to(device), segments)  # no S x S mask
        hidden = forward_hidden(model, ids, positions, segment_ids=seg_ids, branch_ids=branch_ids)
    else:  # one row per completion, left-padded prompt: padding is a segment of its own (-1)
        attn = mb.attn.to(device)
        if is_te_model(model):
            from models.qwen.model import attention_mask

            hidden = forward_hidden(model, ids, attn_mask=attention_mask(attn))
        else:
            hidden = forward_hidden(model, ids, segment_ids=torch.where(attn, 0, -1))
    S, b, H = hidden.shape
    flat = hidden.transpose(0, 1).reshape(b * S, H) if b > 1 else hidden[:, 0]
    return flat.index_select(0, sources), ids.reshape(-1)[targets], slots


def completion_logprobs(
    model: torch.nn.Module,
    mb: MicroBatch,
    vocab_size: int,
    temperature: float = 1.0,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """(log p of each completion token [completions, C] (0 at padding), its entropy [completions, C]
    or None), on the host. Differentiable when grad is enabled; LM-head logits exist only at the
    scored positions, ``chunk_tokens`` at a time."""
    b, C = mb.completion_mask.shape
    hidden, targets, slots = completion_hidden(model, mb)
    lp, ent = chunked_logprobs(
        hidden, output_weight(model), targets, vocab_size, temperature, chunk_tokens, with_entropy
    )
    grid = lp.new_zeros(b * C).index_copy(0, slots, lp).view(b, C).cpu()
    if ent is not None:
        ent = ent.new_zeros(b * C).index_copy(0, slots, ent).view(b, C).cpu()
    return grid, ent
