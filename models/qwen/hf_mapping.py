"""The one HF <-> Megatron-Core weight mapping for Qwen2, both directions, any TP size.

Megatron layouts (local or Transformer-Engine spec; TE fuses the norms into the next linear):

- ``linear_qkv`` rows are grouped per query group: for each KV group g,
  ``[q heads of g (heads_per_group * head_dim rows); k_g (head_dim); v_g (head_dim)]``. TP rank r
  holds groups ``[r*G/tp, (r+1)*G/tp)``, so its shard is a contiguous chunk of the full tensor.
- ``linear_fc1`` (SwiGLU) on each TP rank is ``[its gate rows; its up rows]``: the full (TP=1) tensor
  is ``[all gate; all up]`` and a shard is NOT a chunk of it (gate and up are chunked separately).
- Column-parallel weights are chunked on dim 0, row-parallel (``linear_proj``, ``linear_fc2``) on
  dim 1; the word embedding and output layer on dim 0 over the padded vocab (padding rows are zero
  on import and stripped on export). Norm weights are replicated.

Readers take an ``index`` so that a lazily opened safetensors file (``safe_open(...).get_slice``)
reads only the rows one TP rank needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from models.qwen.config import QwenConfig

# reader(hf_name, index) -> tensor[index]; index is a tuple of slices.
HFReader = Callable[[str, tuple[slice, ...]], torch.Tensor]

ALL = slice(None)

# Transformer-Engine fuses the pre-attention / pre-MLP norms into the following linear layer.
TE_RENAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


@dataclass(frozen=True)
class Rule:
    """How one Megatron parameter is made of HF tensors."""

    mcore: str  # canonical (local-spec) Megatron name
    hf: tuple[str, ...]  # the HF tensors it is built from
    kind: str  # replicated | column | row | vocab | qkv | fc1


def rules(cfg: QwenConfig) -> list[Rule]:
    """Every Megatron parameter of the model, in model order, with its HF sources."""
    out = [Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")]
    for i in range(cfg.num_hidden_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        att = h + "self_attn."
        out += [
            Rule(m + "input_layernorm.weight", (h + "input_layernorm.weight",), "replicated"),
            Rule(
                m + "self_attention.linear_qkv.weight",
                (att + "q_proj.weight", att + "k_proj.weight", att + "v_proj.weight"),
                "qkv",
            ),
            Rule(
                m + "self_attention.linear_qkv.bias",
                (att + "q_proj.bias", att + "k_proj.bias", att + "v_proj.bias"),
                "qkv",
            ),
            Rule(m + "self_attention.linear_proj.weight", (att + "o_proj.weight",), "row"),
            Rule(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",), "replicated"),
            Rule(
                m + "mlp.linear_fc1.weight",
                (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"),
                "fc1",
            ),
            Rule(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), "row"),
        ]
    out.append(Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"))
    if not cfg.tie_word_embeddings:
        out.append(Rule("output_layer.weight", ("lm_head.weight",), "vocab"))
    return out


def hf_names(cfg: QwenConfig) -> list[str]:
    """The HF tensor names a checkpoint of this config holds (tied: no lm_head)."""
    return [n for r in rules(cfg) for n in r.hf]


def to_te_name(name: str) -> str:
    for local, te in TE_RENAMES.items():
        if name.endswith(local):
            return name[: -len(local)] + te
    return name


def to_local_name(name: str) -> str:
    for local, te in TE_RENAMES.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


# ---- shapes -----------------------------------------------------------------------------
def hf_shape(cfg: QwenConfig, hf_name: str) -> tuple[int, ...]:
    """Expected shape of an HF tensor (used to name both shapes on a mismatch)."""
    H, F, hd = cfg.hidden_size, cfg.intermediate_size, cfg.kv_channels
    nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    leaf = hf_name.split(".")[-2] + "." + hf_name.split(".")[-1]
    table = {
        "embed_tokens.weight": (cfg.vocab_size, H),
        "lm_head.weight": (cfg.vocab_size, H),
        "q_proj.weight": (nq * hd, H),
        "q_proj.bias": (nq * hd,),
        "k_proj.weight": (nkv * hd, H),
        "k_proj.bias": (nkv * hd,),
        "v_proj.weight": (nkv * hd, H),
        "v_proj.bias": (nkv * hd,),
        "o_proj.weight": (H, nq * hd),
        "gate_proj.weight": (F, H),
        "up_proj.weight": (F, H),
        "down_proj.weight": (H, F),
    }
    return table.get(leaf, (H,))


def mcore_shard_shape(cfg: QwenConfig, rule: Rule, tp: int) -> tuple[int, ...]:
    """Shape of one TP rank's shard of a Megatron parameter."""
    H, F, hd = cfg.hidden_size, cfg.intermediate_size, cfg.kv_channels
    nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    qkv_rows = (nq + 2 * nkv) * hd // tp
    if rule.kind == "vocab":
        return (cfg.padded_vocab_size(tp) // tp, H)
    if rule.kind == "qkv":
        return (qkv_rows, H) if rule.mcore.endswith("weight") else (qkv_rows,)
    if rule.kind == "fc1":
        return (2 * F // tp, H)
    if rule.kind == "row":
        return (H, nq * hd // tp) if "linear_proj" in rule.mcore else (H, F // tp)
    return (H,)


# ---- HF -> Megatron ---------------------------------------------------------------------
def hf_to_mcore_shard(cfg: QwenConfig, rule: Rule, read: HFReader, tp: int, rank: int) -> torch.Tensor:
    """Build TP rank ``rank``'s shard of one Megatron parameter, reading only the rows it needs."""
    kind = rule.kind
    if kind == "replicated":
        return read(rule.hf[0], (ALL,))
    if kind == "row":
        cols = hf_shape(cfg, rule.hf[0])[1] // tp
        return read(rule.hf[0], (ALL, slice(rank * cols, (rank + 1) * cols)))
    if kind == "column":
        rows = hf_shape(cfg, rule.hf[0])[0] // tp
        return read(rule.hf[0], (slice(rank * rows, (rank + 1) * rows),))
    if kind == "vocab":
        padded = cfg.padded_vocab_size(tp)
        rows = padded // tp
        lo, hi = rank * rows, (rank + 1) * rows
        real = read(rule.hf[0], (slice(lo, min(hi, cfg.vocab_size)),)) if lo < cfg.vocab_size else None
        out = torch.zeros((rows, cfg.hidden_size), dtype=real.dtype if real is not None else torch.float32)
        if real is not None:
            out[: real.shape[0]] = real
        return out
    if kind == "fc1":
        F = cfg.intermediate_size // tp
        rows = (slice(rank * F, (rank + 1) * F),)
        return torch.cat([read(rule.hf[0], rows), read(rule.hf[1], rows)], dim=0)
    if kind == "qkv":
        hd, hpg = cfg.kv_channels, cfg.heads_per_group
        groups = cfg.num_key_value_heads // tp
        g0 = rank * groups
        q = read(rule.hf[0], (slice(g0 * hpg * hd, (g0 + groups) * hpg * hd),))
        k = read(rule.hf[1], (slice(g0 * hd, (g0 + groups) * hd),))
        v = read(rule.hf[2], (slice(g0 * hd, (g0 + groups) * hd),))
        tail = q.shape[1:]
        fused = torch.cat(
            [q.reshape(groups, hpg * hd, *tail), k.reshape(groups, hd, *tail), v.reshape(groups, hd, *tail)],
            dim=1,
        )
        return fused.reshape(groups * (hpg + 2) * hd, *tail)
    raise ValueError(f"unknown rule kind {kind!r} for {rule.mcore}")


# ---- Megatron -> HF ---------------------------------------------------------------------
def merge_tp_shards(rule: Rule, shards: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate TP shards into the full (TP=1) Megatron tensor."""
    if rule.kind == "replicated":
        return shards[0]
    if rule.kind == "row":
        return torch.cat(shards, dim=1)
    if rule.kind == "fc1":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=0)  # column, vocab, qkv (whole query groups per rank)


def split_tp(rule: Rule, full: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """Inverse of :func:`merge_tp_shards` (used to reshard a Megatron checkpoint)."""
    if rule.kind == "replicated":
        return [full] * tp
    if rule.kind == "row":
        return list(full.chunk(tp, dim=1))
    if rule.kind == "fc1":
        gate, up = full.chunk(2, dim=0)
        return [torch.cat([g, u], dim=0) for g, u in zip(gate.chunk(tp), up.chunk(tp), strict=True)]
    return list(full.chunk(tp, dim=0))


def mcore_full_to_hf(cfg: QwenConfig, rule: Rule, full: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Split one full (TP-merged) Megatron tensor into its HF tensors (vocab padding stripped)."""
    kind = rule.kind
    if kind == "vocab":
        yield rule.hf[0], full[: cfg.vocab_size]
    elif kind == "fc1":
        gate, up = full.chunk(2, dim=0)
        yield rule.hf[0], gate
        yield rule.hf[1], up
    elif kind == "qkv":
        hd, hpg, G = cfg.kv_channels, cfg.heads_per_group, cfg.num_key_value_heads
        tail = full.shape[1:]
        grouped = full.reshape(G, (hpg + 2) * hd, *tail)
        q, k, v = grouped.split([hpg * hd, hd, hd], dim=1)
        yield rule.hf[0], q.reshape(G * hpg * hd, *tail)
        yield rule.hf[1], k.reshape(G * hd, *tail)
        yield rule.hf[2], v.reshape(G * hd, *tail)
    else:
        yield rule.hf[0], full


# ---- checkpoint validation ---------------------------------------------------------------
# Non-weight buffers some older HF exports contain; never needed, never an error.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def check_hf_tensors(
    cfg: QwenConfig, shapes: Mapping[str, Sequence[int]], source: str = "HF checkpoint"
) -> None:
    """Raise one ValueError listing every missing / unexpected / wrongly shaped HF tensor.

    A tied checkpoint may still carry ``lm_head.weight`` (a copy of the embedding): it is ignored.
    """
    expected = hf_names(cfg)
    known = set(expected)
    if cfg.tie_word_embeddings:
        known.add("lm_head.weight")
    missing = [n for n in expected if n not in shapes]
    unexpected = sorted(n for n in shapes if n not in known and not n.endswith(IGNORED_HF_SUFFIXES))
    bad = [
        f"tensor {n!r} has shape {tuple(shapes[n])}, expected {hf_shape(cfg, n)}"
        for n in expected
        if n in shapes and tuple(shapes[n]) != hf_shape(cfg, n)
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_head(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_head(unexpected)}")
    problems += bad[:8] + ([f"... and {len(bad) - 8} more shape mismatches"] if len(bad) > 8 else [])
    if problems:
        raise ValueError(f"{source}: does not match its config: " + "; ".join(problems))


def _head(names: list[str], n: int = 8) -> str:
    return ", ".join(repr(x) for x in names[:n]) + (
        f", ... ({len(names) - n} more)" if len(names) > n else ""
    )


# ---- in-memory helpers ------------------------------------------------------------------
def state_dict_reader(sd: dict[str, torch.Tensor], cfg: QwenConfig) -> HFReader:
    """A reader over an in-memory HF state dict that checks names and shapes."""

    def read(name: str, index: tuple[slice, ...]) -> torch.Tensor:
        if name not in sd:
            raise KeyError(f"HF checkpoint is missing tensor {name!r}")
        t = sd[name]
        want = hf_shape(cfg, name)
        if tuple(t.shape) != want:
            raise ValueError(f"HF tensor {name!r} has shape {tuple(t.shape)}, expected {want}")
        return t[index]

    return read


def hf_to_mcore_state_dict(
    cfg: QwenConfig, read: HFReader, tp: int, rank: int, te_names: bool = False
) -> dict[str, torch.Tensor]:
    """All of rank ``rank``'s Megatron parameters (local-spec names unless ``te_names``)."""
    out = {}
    for rule in rules(cfg):
        name = to_te_name(rule.mcore) if te_names else rule.mcore
        out[name] = hf_to_mcore_shard(cfg, rule, read, tp, rank).contiguous()
    return out


def mcore_shards_to_hf(cfg: QwenConfig, shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-rank Megatron state dicts (local or TE names) -> one HF state dict."""
    normalized = [{to_local_name(k): v for k, v in sd.items()} for sd in shards]
    out = {}
    for rule in rules(cfg):
        full = merge_tp_shards(rule, [sd[rule.mcore] for sd in normalized])
        out.update(mcore_full_to_hf(cfg, rule, full))
    return out
