"""Model provider: a Megatron-Core GPTModel configured as Qwen2, plus its forward API.

Forward API (what the trainer, the logprob passes and the generator call):

- ``forward_hidden(model, input_ids, positions, *, segment_ids=None, branch_ids=None, attn_mask=None)``
  -> hidden [S, b, H]: the decoder output after the final RMSNorm, *without* the output layer, for
  ``input_ids`` [b, S] (a packed row is [1, T]). ``positions`` [S] or [b, S] are the RoPE positions
  (``None``: ``0..S-1``); packed sequences restart them per sequence. Which keys a query sees:
  ``segment_ids`` [b, S] long (document masking: causal within a segment, never across segments; a
  negative id is padding, its hidden state is meaningless), optionally with ``branch_ids`` (a shared
  prefix, branch 0, seen by the branches r > 0 of its segment, which never see each other: Prefix
  Grouper; ``prefix_tree_segments`` makes both from a shared-prefix layout); or an explicit
  ``attn_mask`` [b, 1, S, S] (True = masked); or neither: causal.
  With segments, attention memory is O(S) (``models.qwen.attention``). With sequence parallelism
  the hidden states are gathered over TP here, so every rank holds all S positions.
- ``output_logits(model, hidden [N, H])`` -> vocab-parallel logits [N, padded_vocab / TP]: the LM
  head (tied or untied) on the positions the caller selected (completion positions only).
- ``forward_logits(model, input_ids, pad_mask, *, attn_mask, positions, segment_ids, branch_ids)``
  -> [b, S, V/TP]: ``forward_hidden`` + ``output_logits`` at every position (older callers).

Layer spec: on the local spec (CPU, GPUs without Transformer-Engine) the core attention is the
project's ``SDPAttention`` (PyTorch SDPA). With TE, ``forward_hidden`` with ``segment_ids`` builds
Megatron's THD ``PackedSeqParams`` (TE flash/fused attention, ``padding_causal``); that path has no
test here (TE is not installable on the CPU machines nor on the lent GPU).

Build options beyond the architecture (``ActivationOptions`` in ``models.qwen.config``): sequence
parallelism and activation recomputation. A ``pad_token_id`` in config.json freezes that embedding
row's lookup gradient, as HF's ``nn.Embedding(padding_idx=...)`` does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec

from models.qwen.attention import SDPAttention, segment_attention, te_core_attention
from models.qwen.config import ActivationOptions, QwenConfig
from models.qwen.hf_mapping import HFReader, hf_to_mcore_state_dict


def use_transformer_engine() -> bool:
    """TE spec only when TE imports *and* a GPU is present; the local spec otherwise."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # TE's import can fail in many ways (missing libs, ABI)
        return False
    return True


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` behind Megatron's norm interface (the local spec's ``WrappedTorchNorm``
    refuses sequence parallelism). Under sequence parallelism each TP rank normalises its slice of
    the sequence, so the weight's gradient is summed over TP here (identity forward)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused) -> None:
        if config.normalization != "RMSNorm":
            raise ValueError(f"RMSNorm built for normalization={config.normalization!r}")
        super().__init__(hidden_size, eps=eps)
        self.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.sequence_parallel:
            w = tensor_parallel.copy_to_tensor_model_parallel_region(w)
        return F.rms_norm(x, self.normalized_shape, w, self.eps)


def layer_spec(use_te: bool | None = None) -> ModuleSpec:
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.enums import AttnMaskType

    if use_te is None:
        use_te = use_transformer_engine()
    spec = (
        get_gpt_layer_with_transformer_engine_spec()
        if use_te
        else get_gpt_layer_local_spec(normalization="RMSNorm")
    )
    if use_te:  # packed rows (THD) run TE's causal flash / fused kernels
        spec.submodules.self_attention.submodules.core_attention = te_core_attention()
    else:  # Megatron's DotProductAttention materialises [b, heads, S, S]: ours is O(S)
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
        spec.submodules.input_layernorm = RMSNorm
        spec.submodules.pre_mlp_layernorm = RMSNorm
    # Megatron's specs say "causal", and under "causal" the fused paths (TE, and the local spec's
    # upper-triangular softmax kernel when built) ignore the attention mask we pass: left-padded
    # prompts would attend to their pads. "arbitrary" makes every path apply our explicit mask.
    spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.arbitrary
    return spec


def build_model(
    cfg: QwenConfig,
    params_dtype: torch.dtype = torch.float32,
    use_te: bool | None = None,
    perform_initialization: bool = True,
    activations: ActivationOptions | None = None,
) -> GPTModel:
    """A GPTModel for this Qwen2 config on the current TP group (parallel_state must be set up).

    ``activations``: sequence parallelism and activation recomputation (default: neither).
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tcfg = cfg.transformer_config(
        tp, params_dtype, perform_initialization=perform_initialization, activations=activations
    )
    if use_te is None:
        use_te = use_transformer_engine()
    spec = layer_spec(use_te)
    if not use_te:  # the final norm too: the block's default is the local spec's WrappedTorchNorm
        from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

        spec = TransformerBlockSubmodules(layer_specs=[spec] * cfg.num_hidden_layers, layer_norm=RMSNorm)
    model = GPTModel(
        config=tcfg,
        transformer_layer_spec=spec,
        vocab_size=cfg.padded_vocab_size(tp),
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=True,
        post_process=True,
        parallel_output=True,  # logits stay vocab-parallel: logprobs use vocab-parallel CE
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.rope_theta),
    )
    if cfg.pad_token_id is not None:
        freeze_padding_row(model, cfg.pad_token_id)
    if torch.cuda.is_available():
        model.cuda()
    return model


def freeze_padding_row(model: GPTModel, pad_token_id: int) -> None:
    """HF's Qwen2 embeds with ``nn.Embedding(padding_idx=pad_token_id)``: looking up the pad token
    gives no gradient to its row. Same here: the embedding output at pad-token inputs is detached
    (its value unchanged). With tied embeddings the LM head still trains that row, as in HF."""
    emb = model.embedding.word_embeddings
    if not 0 <= pad_token_id < model.vocab_size:
        raise ValueError(
            f"config.json: pad_token_id={pad_token_id} is outside the vocab (0..{model.vocab_size - 1})"
        )

    def hook(_module, args, output: torch.Tensor) -> torch.Tensor:
        is_pad = args[0] == pad_token_id  # [b, s]
        if getattr(emb, "reduce_scatter_embeddings", False):  # SP: output is this rank's [s/TP, b, h]
            n = output.shape[0]
            r = parallel_state.get_tensor_model_parallel_rank()
            is_pad = is_pad.transpose(0, 1)[r * n : (r + 1) * n]
        return torch.where(is_pad[..., None], output.detach(), output)

    emb.register_forward_hook(hook)


def unwrap(model: torch.nn.Module) -> GPTModel:
    """Strip DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def is_te_model(model: torch.nn.Module) -> bool:
    return any(k.endswith("layer_norm_weight") for k in unwrap(model).state_dict())


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, cfg: QwenConfig, read: HFReader) -> None:
    """Copy HF weights (via ``read``) into this TP rank's parameters; every parameter must be set."""
    gpt = unwrap(model)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    shards = hf_to_mcore_state_dict(cfg, read, tp, rank, te_names=is_te_model(gpt))
    params = dict(gpt.named_parameters())
    missing = sorted(set(params) - set(shards))
    unexpected = sorted(set(shards) - set(params))
    if missing or unexpected:
        raise KeyError(f"weight mapping mismatch: model lacks {unexpected}, mapping lacks {missing}")
    for name, p in params.items():
        src = shards[name]
        if tuple(src.shape) != tuple(p.shape):
            raise ValueError(f"{name}: mapped shape {tuple(src.shape)} != parameter shape {tuple(p.shape)}")
        p.copy_(src.to(p.dtype))


def attention_mask(pad_mask: torch.Tensor) -> torch.Tensor:
    """Megatron's boolean attention mask [B, 1, S, S] (True = masked): causal AND key is padding.

    Always passed explicitly (Megatron's default causal mask is built on "cuda"). Left padding needs
    no position shift: RoPE scores depend only on the distance between positions.
    """
    B, S = pad_mask.shape
    causal = torch.ones(S, S, dtype=torch.bool, device=pad_mask.device).triu(1)
    return causal[None, None] | ~pad_mask.bool()[:, None, None, :]


def prefix_tree_attention_mask(pad_mask: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Megatron's boolean mask [B, 1, S, S] (True = masked) for a shared prefix with branches.

    ``segments`` [S] gives each column's segment: 0 = the shared prefix, k > 0 = branch k. Query q
    sees key k iff ``k <= q`` (causal), key k is a real token (``pad_mask``) and key k is in the prefix
    or in q's own branch, so branches never see each other. Prefix queries see only the prefix (it
    comes first), exactly as in the unpacked causal mask.
    """
    S = pad_mask.shape[1]
    seg = segments.to(pad_mask.device)
    causal = torch.ones(S, S, dtype=torch.bool, device=pad_mask.device).triu(1)
    other_branch = (seg[None, :] != 0) & (seg[None, :] != seg[:, None])  # [q, k]
    return (causal | other_branch)[None, None] | ~pad_mask.bool()[:, None, None, :]


def prefix_tree_segments(pad_mask: torch.Tensor, segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(segment_ids, branch_ids)`` [B, S] for ``forward_hidden``: the attention pattern of
    ``prefix_tree_attention_mask(pad_mask, segments)`` without its [B, 1, S, S] mask. Each row is one
    segment (its real tokens; padding is -1); ``segments`` [S] (0 = shared prefix, k = branch k)
    are the branches."""
    seg_ids = torch.where(pad_mask.bool(), 0, -1)
    return seg_ids, segments.to(pad_mask.device)[None].expand_as(seg_ids)


def rotary_freqs(rope: RotaryEmbedding, positions: torch.Tensor) -> torch.Tensor:
    """``RotaryEmbedding.get_emb`` for arbitrary ``positions`` [S] instead of ``0..S-1``: [S, 1, 1, dim].

    The same operations in the same order (interpolation factor, outer product with the module's own
    ``inv_freq``, concatenated or interleaved halves), so ``positions = arange(S)`` is bit-identical.
    Megatron's plain RotaryEmbedding has no mscale (only the YaRN subclass does).
    """
    seq = positions.to(device=rope.inv_freq.device, dtype=rope.inv_freq.dtype)
    if rope.seq_len_interpolation_factor is not None:
        seq = seq * (1 / rope.seq_len_interpolation_factor)
    freqs = torch.outer(seq, rope.inv_freq)
    if not rope.rotary_interleaved:
        emb = torch.cat((freqs, freqs), dim=-1)
    else:
        emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
    return emb[:, None, None, :]


@contextlib.contextmanager
def rotary_positions(model: torch.nn.Module, positions: torch.Tensor) -> Iterator[None]:
    """Within the block, ``model``'s RoPE uses ``positions`` [S] (shared by every row) for its
    sequence of length S instead of ``0..S-1``.

    GPTModel ignores ``position_ids`` for RoPE (it asks its RotaryEmbedding for ``seq_len`` positions);
    a forward hook on that one module instance replaces the result, and is removed on exit.
    """
    rope = getattr(unwrap(model), "rotary_pos_emb", None)
    if type(rope) is not RotaryEmbedding:  # YaRN / multimodal RoPE return other things
        raise TypeError(f"custom rotary positions need a plain RotaryEmbedding, model has {type(rope)}")
    if rope.cp_group is not None and rope.cp_group.size() > 1:
        raise NotImplementedError("custom rotary positions with context parallelism (CP > 1)")

    def hook(_module, _args, output: torch.Tensor) -> torch.Tensor:
        if output.shape[0] != positions.shape[0]:
            raise ValueError(
                f"rotary positions has {positions.shape[0]} entries, the sequence {output.shape[0]}"
            )
        return rotary_freqs(rope, positions)  # after forward: inv_freq is on its device by now

    handle = rope.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def rotary_table(rope: RotaryEmbedding, positions: torch.Tensor) -> torch.Tensor:
    """RoPE frequencies for ``positions`` [S] ([S, 1, 1, dim], shared by every row) or [b, S]
    ([S, b, 1, dim], per row); ``rotary_freqs`` for one row, so ``arange(S)`` equals ``get_emb``."""
    if positions.dim() == 1:
        return rotary_freqs(rope, positions)
    b, S = positions.shape
    return rotary_freqs(rope, positions.reshape(-1)).reshape(b, S, 1, -1).transpose(0, 1)


def _sp_pad(t: torch.Tensor | None, extra: int, value, dim: int = -1) -> torch.Tensor | None:
    """``t`` with ``extra`` entries of ``value`` appended along ``dim`` (sequence parallel needs S % TP == 0)."""
    if t is None or extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_full(shape, value)], dim=dim)


def forward_hidden(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    positions: torch.Tensor | None = None,
    *,
    segment_ids: torch.Tensor | None = None,
    branch_ids: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decoder output after the final norm, [S, b, H], for ``input_ids`` [b, S] (module docstring).

    Exactly one of ``segment_ids`` (with optional ``branch_ids``) and ``attn_mask`` may be given;
    with neither, attention is causal over the whole row.
    """
    gpt = unwrap(model)
    b, S = input_ids.shape
    device = input_ids.device
    if segment_ids is not None and attn_mask is not None:
        raise ValueError("forward_hidden: give segment_ids or attn_mask, not both")
    if branch_ids is not None and segment_ids is None:
        raise ValueError("forward_hidden: branch_ids needs segment_ids")
    if segment_ids is not None and tuple(segment_ids.shape) != (b, S):
        raise ValueError(f"segment_ids shape {tuple(segment_ids.shape)} != input_ids shape {(b, S)}")
    if positions is None:
        positions = torch.arange(S, device=device)
    positions = positions.to(device)
    if (
        positions.shape[-1] != S
        or positions.dim() not in (1, 2)
        or (positions.dim() == 2 and positions.shape[0] != b)
    ):
        raise ValueError(f"positions shape {tuple(positions.shape)}: expected ({S},) or ({b}, {S})")

    tp = parallel_state.get_tensor_model_parallel_world_size()
    extra = (-S) % tp if gpt.config.sequence_parallel else 0
    if extra:  # pad the sequence to a multiple of TP with tokens no real token sees
        input_ids = _sp_pad(input_ids, extra, 0)
        positions = _sp_pad(positions, extra, 0)
        if segment_ids is None and attn_mask is None:
            segment_ids = torch.zeros(b, S, dtype=torch.long, device=device)
        segment_ids = _sp_pad(segment_ids, extra, -1)
        branch_ids = _sp_pad(branch_ids, extra, 0)
        if attn_mask is not None:
            attn_mask = _sp_pad(_sp_pad(attn_mask, extra, True, dim=-1), extra, True, dim=-2)

    packed = None
    rope = rotary_table(gpt.rotary_pos_emb, positions)
    if segment_ids is not None:
        if is_te_model(gpt):
            packed = thd_packed_seq_params(segment_ids, branch_ids, positions)
            rope = rotary_freqs(gpt.rotary_pos_emb, torch.arange(input_ids.shape[1], device=device))
        else:
            packed = segment_attention(segment_ids, branch_ids)
    elif attn_mask is not None:
        attn_mask = attn_mask.to(device)
    position_ids = positions if positions.dim() == 2 else positions[None].expand(b, -1)
    hidden = gpt.embedding(input_ids=input_ids, position_ids=position_ids)
    hidden = gpt.decoder(
        hidden_states=hidden, attention_mask=attn_mask, rotary_pos_emb=rope, packed_seq_params=packed
    )
    if gpt.config.sequence_parallel:
        # Every rank gets all positions; the backward takes this rank's slice of the full gradient,
        # which ``output_logits`` has already summed over TP.
        hidden = tensor_parallel.gather_from_sequence_parallel_region(
            hidden, tensor_parallel_output_grad=False
        )
    return hidden[:S] if extra else hidden


def thd_packed_seq_params(
    segment_ids: torch.Tensor, branch_ids: torch.Tensor | None, positions: torch.Tensor
):
    """Megatron's THD ``PackedSeqParams`` for one packed row (Transformer-Engine spec only; untested
    here: TE is not installable on the CPU machines). Each run of equal ids is one sequence (a run of
    padding too); RoPE positions must restart at 0 with each run (THD applies RoPE per sequence)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    if branch_ids is not None or segment_ids.shape[0] != 1:
        raise NotImplementedError(
            "with the Transformer-Engine spec, packed segments need one row [1, T] and no shared prefix"
        )
    seg = segment_ids[0]
    starts = torch.nonzero(torch.diff(seg, prepend=seg[:1] - 1)).flatten()
    cu = torch.cat([starts, starts.new_tensor([seg.numel()])]).to(torch.int32)
    idx = torch.arange(seg.numel(), device=seg.device)
    expected = idx - torch.repeat_interleave(starts, (cu[1:] - cu[:-1]).long())
    if not torch.equal(positions.reshape(-1).to(expected.device), expected):
        raise ValueError("THD packing (TE spec): positions must restart at 0 with every segment")
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest
    )


def output_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel LM-head logits [N, padded_vocab / TP] of ``hidden`` [N, H] (selected positions).

    ``hidden`` is replicated over TP (``forward_hidden`` gathers it under sequence parallelism); its
    gradient is summed over TP, as Megatron's column-parallel output layer does.
    """
    gpt = unwrap(model)
    weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
    if weight is None:
        weight = gpt.output_layer.weight
    return F.linear(tensor_parallel.copy_to_tensor_model_parallel_region(hidden), weight)


def forward_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    pad_mask: torch.Tensor | None = None,
    *,
    attn_mask: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    branch_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Vocab-parallel logits [B, S, padded_vocab / TP] at every position (padded columns NOT masked).

    ``attn_mask`` [B, 1, S, S] (True = masked) replaces the causal + ``pad_mask`` one; ``positions``
    [S] or [B, S] are the RoPE positions (default ``0..S-1``); ``segment_ids`` / ``branch_ids`` as in
    ``forward_hidden`` (then ``pad_mask`` and ``attn_mask`` are not used).
    """
    if segment_ids is None and attn_mask is None:
        if pad_mask is None:
            pad_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attn_mask = attention_mask(pad_mask)
    hidden = forward_hidden(
        model, input_ids, positions, segment_ids=segment_ids, branch_ids=branch_ids, attn_mask=attn_mask
    )
    S, B, H = hidden.shape
    logits = output_logits(model, hidden.transpose(0, 1).reshape(B * S, H))
    return logits.view(B, S, -1)


def gather_hf_state_dict(
    model: torch.nn.Module, cfg: QwenConfig, grads: bool = False
) -> dict[str, torch.Tensor]:
    """The full HF state dict (or, with ``grads``, the gradients) gathered over TP, on every rank.

    Gradients come from Megatron DDP's ``main_grad`` when present, else ``.grad``.
    """
    from models.qwen.hf_mapping import mcore_full_to_hf, merge_tp_shards, rules, to_local_name
    from parallel.collectives import gather_tp_shards

    params = {to_local_name(n): p for n, p in unwrap(model).named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for rule in rules(cfg):
        p = params[rule.mcore]
        t = p.detach()
        if grads:
            g = getattr(p, "main_grad", None)
            t = g if g is not None else p.grad
            if t is None:
                t = torch.zeros_like(p)
        full = merge_tp_shards(rule, gather_tp_shards(t.detach()))
        out.update(mcore_full_to_hf(cfg, rule, full))
    return out
