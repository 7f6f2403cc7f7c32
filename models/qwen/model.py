"""Model provider: a Megatron-Core GPTModel configured as Qwen2, plus its input helpers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec

from models.qwen.config import QwenConfig
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
) -> GPTModel:
    """A GPTModel for this Qwen2 config on the current TP group (parallel_state must be set up)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tcfg = cfg.transformer_config(tp, params_dtype, perform_initialization=perform_initialization)
    model = GPTModel(
        config=tcfg,
        transformer_layer_spec=layer_spec(use_te),
        vocab_size=cfg.padded_vocab_size(tp),
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=True,
        post_process=True,
        parallel_output=True,  # logits stay vocab-parallel: logprobs use vocab-parallel CE
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.rope_theta),
    )
    if torch.cuda.is_available():
        model.cuda()
    return model


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


def forward_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    pad_mask: torch.Tensor | None = None,
    *,
    attn_mask: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Vocab-parallel logits [B, S, padded_vocab / TP] (padded columns are NOT masked here).

    ``attn_mask`` [B, 1, S, S] (True = masked) replaces the causal + ``pad_mask`` one; ``positions``
    [S] are the RoPE positions of every row (default ``0..S-1``).
    """
    S = input_ids.shape[1]
    if attn_mask is None:
        if pad_mask is None:
            pad_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attn_mask = attention_mask(pad_mask)
    if positions is None:
        position_ids = torch.arange(S, device=input_ids.device)[None].expand_as(input_ids)
        return model(input_ids, position_ids, attn_mask)
    positions = positions.to(input_ids.device)
    with rotary_positions(model, positions):
        return model(input_ids, positions[None].expand_as(input_ids), attn_mask)


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
