"""Prefill and one-token decode steps over a Megatron-Core ``GPTModel``'s own modules, with a slot KV cache.

Megatron-Core 0.16.1's static inference path (``StaticInferenceContext``) stores *un-rotated* keys,
re-applies RoPE to the whole cache and rebuilds the cached K/V views every step
(``Attention._adjust_key_value_for_inference``); its dynamic engine needs flash-attn. This module
runs the same layer modules in the same order (``input_layernorm``, ``linear_qkv`` through
``get_query_key_value_tensors``, ``linear_proj``, ``pre_mlp_layernorm``, ``mlp``, ``final_layernorm``,
``output_layer``; TE's fused norm+linear modules work unchanged) and replaces only the core attention:

- keys are rotated once, when written to the cache, and written in place (``KVCache``);
- grouped-query attention through a grouped view: the ``g`` query heads of a KV group are ``g`` query
  rows of one SDPA call against that group's K/V, never a repeated copy;
- RoPE's cos/sin are computed once per step for all layers; every row has its own positions (no
  padding in the cache), so rows of different lengths decode together;
- the LM head runs on the last prompt position only at prefill.

Logits stay vocab-parallel (``[rows, padded_vocab / TP]``); ``engine.rollout.sampling`` reduces over TP.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from engine.rollout.kv_cache import KVCache
from models.qwen.model import rotary_freqs, unwrap


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class DecodeModel:
    """Prefill / decode over ``gpt``'s modules (TP-sharded or not; every TP rank calls in lock step)."""

    def __init__(self, model: torch.nn.Module) -> None:
        gpt = unwrap(model)
        cfg = gpt.config
        problems = []
        if type(getattr(gpt, "rotary_pos_emb", None)) is not RotaryEmbedding:
            problems.append(f"position embedding {type(getattr(gpt, 'rotary_pos_emb', None)).__name__}")
        if cfg.rotary_interleaved:
            problems.append("interleaved RoPE")
        if cfg.sequence_parallel:
            problems.append("sequence_parallel")
        if cfg.context_parallel_size > 1 or cfg.pipeline_model_parallel_size > 1:
            problems.append("context / pipeline parallelism")
        if getattr(cfg, "apply_query_key_layer_scaling", False):
            problems.append("apply_query_key_layer_scaling")
        if cfg.fp32_residual_connection or cfg.apply_residual_connection_post_layernorm:
            problems.append("fp32 / post-layernorm residual")
        if not (gpt.pre_process and gpt.post_process):
            problems.append("a model without embedding or output layer")
        if problems:
            raise NotImplementedError(f"built-in decode supports plain pre-norm GPT models; got {problems}")
        self.gpt = gpt
        self.layers = list(gpt.decoder.layers)
        attn = self.layers[0].self_attention
        self.heads = attn.num_attention_heads_per_partition
        self.kv_heads = attn.num_query_groups_per_partition
        self.head_dim = attn.hidden_size_per_attention_head
        self.group = self.heads // self.kv_heads
        self.scale = cfg.softmax_scale or 1.0 / math.sqrt(self.head_dim)

    @property
    def device(self) -> torch.device:
        return next(self.gpt.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.gpt.embedding.word_embeddings.weight.dtype

    def allocate(self, slots: int, max_len: int) -> KVCache:
        return KVCache.allocate(
            len(self.layers), slots, self.kv_heads, max_len, self.head_dim, self.dtype, self.device
        )

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [S, B, 1, dim] for per-row ``positions`` [B, S]; the trainer's RoPE values exactly."""
        B, S = positions.shape
        freqs = rotary_freqs(self.gpt.rotary_pos_emb, positions.T.reshape(-1)).view(S, B, 1, -1)
        return torch.cos(freqs).to(self.dtype), torch.sin(freqs).to(self.dtype)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel logits [B, V/TP] of hidden states [1, B, H] (before the final norm)."""
        gpt = self.gpt
        h = gpt.decoder.final_layernorm(h)
        w = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
        logits, _ = gpt.output_layer(h, weight=w, runtime_gather_output=False)
        return logits[0]

    def _layers(self, h: torch.Tensor, attend) -> torch.Tensor:
        """The transformer layers; ``attend(i, layer, normed)`` is layer i's core attention."""
        for i, layer in enumerate(self.layers):
            h = self._layer(i, layer, h, attend)
        return h

    def _layer(self, i: int, layer, h: torch.Tensor, attend) -> torch.Tensor:
        """One transformer layer (eval: dropout off, so bias-dropout-add is ``residual + (out + bias)``)."""
        out, bias = layer.self_attention.linear_proj(attend(i, layer, layer.input_layernorm(h)))
        h = h + (out + bias if bias is not None else out)
        out, bias = layer.mlp(layer.pre_mlp_layernorm(h))
        return h + (out + bias if bias is not None else out)

    def _qkv(self, layer, hn: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        q, k, v = layer.self_attention.get_query_key_value_tensors(hn)  # [S, B, heads, dim]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v

    @torch.no_grad()
    def prefill(
        self, cache: KVCache, ids: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor
    ) -> torch.Tensor:
        """Run left-padded prompts ``ids`` [U, S] (real lengths ``lengths`` [U]) and store each prompt's
        K/V at positions ``0 .. len-1`` of each of its slots ``slots`` [U, n] (the shared-prompt fan-out).
        Returns the vocab-parallel logits of each prompt's last token, [U, V/TP]."""
        U, S = ids.shape
        pos = torch.arange(S, device=ids.device)[None] - (S - lengths)[:, None]  # pads < 0
        real = pos >= 0
        cos, sin = self._rope(pos)
        ui, si = real.nonzero(as_tuple=True)
        write_pos = pos[ui, si]
        # [U, 1, S, S] True = attend: causal over real keys (pad queries see themselves: no empty rows).
        eye = torch.eye(S, dtype=torch.bool, device=ids.device)
        causal = torch.ones(S, S, dtype=torch.bool, device=ids.device).tril()
        mask = (causal & real[:, None, :]) | eye
        mask = mask[:, None, None].expand(U, 1, self.group, S, S).reshape(U, 1, self.group * S, S)

        def attend(i: int, layer, hn: torch.Tensor) -> torch.Tensor:
            q, k, v = self._qkv(layer, hn, cos, sin)
            kb, vb = k.transpose(0, 1)[ui, si], v.transpose(0, 1)[ui, si]  # real tokens [N, kv, dim]
            for j in range(slots.shape[1]):
                cache.write(i, slots[ui, j], write_pos, kb, vb)
            # q [S, U, kv*g, d] -> [U, kv, g*S, d]: the group's query rows against its own K/V.
            qg = q.view(S, U, self.kv_heads, self.group, self.head_dim).permute(1, 2, 3, 0, 4)
            qg = qg.reshape(U, self.kv_heads, self.group * S, self.head_dim)
            kk, vv = k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)  # [U, kv, S, d]
            o = F.scaled_dot_product_attention(qg, kk, vv, attn_mask=mask, scale=self.scale)
            o = o.view(U, self.kv_heads, self.group, S, self.head_dim).permute(3, 0, 1, 2, 4)
            return o.reshape(S, U, self.heads * self.head_dim)

        h = self.gpt.embedding(input_ids=ids, position_ids=pos.clamp_min(0))
        h = self._layers(h, attend)
        return self._logits(h[-1:])

    @torch.no_grad()
    def decode(self, cache: KVCache, tokens: torch.Tensor, pos: torch.Tensor, span: int) -> torch.Tensor:
        """One token for slots ``0 .. A-1``: ``tokens`` [A] at positions ``pos`` [A]; attention reads
        cache positions ``< span`` (>= every ``pos + 1``). Returns vocab-parallel logits [A, V/TP]."""
        A = tokens.shape[0]
        cos, sin = self._rope(pos[:, None])
        rows = torch.arange(A, device=tokens.device)
        mask = (torch.arange(span, device=tokens.device)[None] <= pos[:, None])[:, None, None]  # [A,1,1,T]

        def attend(i: int, layer, hn: torch.Tensor) -> torch.Tensor:
            q, k, v = self._qkv(layer, hn, cos, sin)
            cache.write(i, rows, pos, k[0], v[0])
            qg = q[0].view(A, self.kv_heads, self.group, self.head_dim)
            kk, vv = cache.keys[i][:A, :, :span], cache.values[i][:A, :, :span]
            o = F.scaled_dot_product_attention(qg, kk, vv, attn_mask=mask, scale=self.scale)
            return o.reshape(1, A, self.heads * self.head_dim)

        h = self.gpt.embedding(input_ids=tokens[:, None], position_ids=pos[:, None])
        h = self._layers(h, attend)
        return self._logits(h)
