"""Core attention of the local (non Transformer-Engine) layer spec, on PyTorch's SDPA kernel.

``SDPAttention`` replaces Megatron's ``DotProductAttention`` (which materialises the softmax over
[b, heads, S, S] in fp32, every layer) through the layer spec's ``core_attention``; it has the same
constructor and ``forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
packed_seq_params)``. Three ways to say which keys a query sees:

- ``packed_seq_params`` is a ``SegmentAttention`` (built by ``segment_attention``): document masking
  for packed sequences, and the prefix tree of a shared prompt (Prefix Grouper). Each block of
  tokens runs one causal SDPA (flash kernel, memory O(block length)); nothing of size S x S exists.
- ``attention_mask`` [b or 1, 1, sq, sk] bool, True = masked (Megatron's convention): SDPA with that
  mask. Keeps the old explicit-mask path (left-padded rows, KV-cache decode). PyTorch turns the mask
  into an additive float mask [b, 1, sq, sk]: O(S^2) per row, but not per head.
- neither: plain causal (``is_causal``).

GQA: SDPA's ``enable_gqa`` broadcasts the KV heads, K/V are never repeated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

# One causal attention block: ``tokens`` (row indices, in causal order) attend causally among
# themselves; outputs are written back for ``tokens[skip:]`` (the shared prompt's outputs are
# written by its first branch only).
Block = tuple[Tensor, int]


@dataclass
class SegmentAttention(PackedSeqParams):
    """Which keys each query sees, as causal blocks per row (see ``segment_attention``).

    A ``PackedSeqParams`` so that Megatron's attention layers hand it to the core attention
    untouched (``qkv_format='sbhd'``: no THD reshaping, RoPE as usual), selective recompute included.
    """

    qkv_format: str = "sbhd"
    blocks: list[list[Block]] = field(default_factory=list)  # per row
    _groups: list[tuple[int, Tensor, Tensor]] | None = field(default=None, repr=False)

    def groups(self) -> list[tuple[int, Tensor, Tensor]]:
        """The blocks batched by (length, skip): ``(skip, tokens [n, L], rows [n, L])`` per group, so
        equal-length sequences (many short completions) run as one SDPA call, not one each. Built once
        per forward and shared by every layer."""
        if self._groups is None:
            by_shape: dict[tuple[int, int], list[tuple[int, Tensor]]] = {}
            for r, blocks in enumerate(self.blocks):
                for tokens, skip in blocks:
                    by_shape.setdefault((len(tokens), skip), []).append((r, tokens))
            self._groups = []
            for (_, skip), members in by_shape.items():
                tokens = torch.stack([t for _, t in members])
                rows = torch.tensor([r for r, _ in members], device=tokens.device)[:, None].expand_as(tokens)
                self._groups.append((skip, tokens, rows))
        return self._groups


def _runs(ids: Tensor) -> list[tuple[int, Tensor]]:
    """(id, its token indices in order) for each distinct id in ``ids`` [S], first appearance order."""
    order = torch.argsort(ids, stable=True)
    vals, counts = torch.unique_consecutive(ids[order], return_counts=True)
    out = list(zip(vals.tolist(), torch.split(order, counts.tolist()), strict=True))
    return sorted(out, key=lambda r: int(r[1][0]))


def segment_attention(segment_ids: Tensor, branch_ids: Tensor | None = None) -> SegmentAttention:
    """The attention pattern of packed sequences, optionally with shared prefixes, as causal blocks.

    ``segment_ids`` [b, S] long: query q sees key k iff both are in the same segment (id >= 0) and
    k <= q (row order). Negative ids are padding: never keys, their outputs are zero.
    ``branch_ids`` [b, S] (optional): within a segment, branch 0 is a shared prefix and branches
    r > 0 are continuations of it that never see each other: q sees k iff same segment, k <= q, and
    k is in branch 0 or in q's branch (the prefix tree of ``prefix_tree_attention_mask``). The prefix
    must come before every branch of its segment in the row.
    """
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be [b, S], got shape {tuple(segment_ids.shape)}")
    if branch_ids is not None and branch_ids.shape != segment_ids.shape:
        raise ValueError(
            f"branch_ids shape {tuple(branch_ids.shape)} != segment_ids shape {tuple(segment_ids.shape)}"
        )
    seg = segment_ids.detach().to("cpu", torch.long)
    br = None if branch_ids is None else branch_ids.detach().to("cpu", torch.long)
    rows: list[list[Block]] = []
    for b in range(seg.shape[0]):
        blocks: list[Block] = []
        real = (seg[b] >= 0).nonzero()[:, 0]
        for sid, toks in _runs(seg[b, real]):
            toks = real[toks]
            if br is None or not bool((br[b, toks] != 0).any()):
                blocks.append((toks, 0))
                continue
            r = br[b, toks]
            prefix = toks[r == 0]
            branches = _runs(r[r != 0])
            rest = toks[r != 0]
            if len(prefix) and int(prefix[-1]) > int(rest[0]):
                raise ValueError(f"row {b}, segment {sid}: its prefix (branch 0) must precede its branches")
            for i, (_, idx) in enumerate(branches):
                blocks.append((torch.cat([prefix, rest[idx]]), 0 if i == 0 else len(prefix)))
        rows.append([(t.to(segment_ids.device), skip) for t, skip in blocks])  # moved once, not per layer
    return SegmentAttention(blocks=rows)


def explicit_mask_attention(
    query: Tensor, key: Tensor, value: Tensor, masked: Tensor, scale: float
) -> Tensor:
    """SDPA over [b, h, s, d] with Megatron's boolean mask (True = masked). A query with every key
    masked (a left pad) attends to all keys uniformly, as Megatron's -10000 fill gives, not NaN."""
    attend = ~masked
    attend = attend | ~attend.any(-1, keepdim=True)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attend, scale=scale, enable_gqa=True)


class SDPAttention(MegatronModule):
    """Megatron's core-attention interface on ``torch.nn.functional.scaled_dot_product_attention``.

    Inputs [sq, b, heads/TP, d] (query) and [sk, b, kv_heads/TP, d] (key, value); output
    [sq, b, heads/TP * d], as ``DotProductAttention``. No dropout (Qwen2 has none).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"SDPAttention has no attention dropout, config asks for {dropout}")
        if config.context_parallel_size > 1:
            raise NotImplementedError("SDPAttention with context parallelism (CP > 1)")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        if softmax_scale is None:
            softmax_scale = config.softmax_scale
        self.softmax_scale = softmax_scale if softmax_scale is not None else config.kv_channels**-0.5

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> Tensor:
        if attention_bias is not None:
            raise NotImplementedError("SDPAttention: attention_bias")
        sq, b, nh, d = query.shape
        if isinstance(packed_seq_params, SegmentAttention):
            return self._segments(query, key, value, packed_seq_params)
        if packed_seq_params is not None:
            raise NotImplementedError(
                f"SDPAttention: packed_seq_params of format {packed_seq_params.qkv_format!r} "
                "(THD packing needs the Transformer-Engine spec; use SegmentAttention here)"
            )
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        if attention_mask is not None:
            out = explicit_mask_attention(q, k, v, attention_mask, self.softmax_scale)
        else:
            if sq != key.shape[0]:
                raise ValueError(
                    f"causal attention without a mask needs sq == sk, got {sq} vs {key.shape[0]}"
                )
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=True
            )
        return out.permute(2, 0, 1, 3).reshape(sq, b, nh * d)

    def _segments(self, query: Tensor, key: Tensor, value: Tensor, plan: SegmentAttention) -> Tensor:
        sq, b, nh, d = query.shape
        if len(plan.blocks) != b or key.shape[0] != sq:
            raise ValueError(
                f"SegmentAttention for {len(plan.blocks)} rows, attention got {b} rows "
                f"(sq={sq}, sk={key.shape[0]}: segment masks need sq == sk, no KV cache)"
            )
        out = query.new_zeros(sq, b, nh * d)
        for skip, tokens, rows in plan.groups():
            tokens, rows = tokens.to(query.device), rows.to(query.device)
            q, k, v = (t[tokens, rows].transpose(1, 2) for t in (query, key, value))  # [n, heads, L, d]
            o = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=True
            )
            o = o[:, :, skip:].transpose(1, 2).reshape(tokens.shape[0], -1, nh * d)
            out = out.index_put((tokens[:, skip:], rows[:, skip:]), o)
        return out


def te_core_attention() -> type:
    """The Transformer-Engine spec's core attention for packed rows: Megatron's
    ``TEDotProductAttention``, except that with THD ``packed_seq_params`` (``forward_hidden`` with
    ``segment_ids`` on a TE model) it runs causal per sequence (TE's ``padding_causal``: flash / fused
    kernels) instead of the spec's ``arbitrary`` mask. Untested here: TE installs neither on the CPU
    machines nor on the lent GPU; it needs a TE whose mask type is chosen per call (>= 0.11)."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    class PackedTEDotProductAttention(TEDotProductAttention):
        def forward(self, query, key, value, attention_mask, attn_mask_type=None, *args, **kwargs):
            packed = kwargs.get("packed_seq_params", args[1] if len(args) > 1 else None)
            if packed is not None and packed.qkv_format == "thd":
                if not self.te_forward_mask_type:
                    raise NotImplementedError("packed (THD) rows need a TE that takes the mask type per call")
                attention_mask, attn_mask_type = None, AttnMaskType.causal  # -> padding_causal for THD
            elif attn_mask_type is None:
                attn_mask_type = self.attn_mask_type
            return super().forward(query, key, value, attention_mask, attn_mask_type, *args, **kwargs)

    return PackedTEDotProductAttention
