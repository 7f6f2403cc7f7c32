"""The decode KV cache: one slot per sequence, keys stored already rotated, written in place.

Per layer, keys and values are ``[slots, kv_heads, max_len, head_dim]`` (the layout attention reads:
one contiguous ``[len, head_dim]`` matrix per slot and KV head; query heads of a group attend to
their KV head through a grouped view, never a repeated copy). Active sequences occupy slots
``0 .. active-1``; when one finishes, a sequence from the end moves into its slot (``move``), so the
decode batch is always a prefix of the slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    keys: list[torch.Tensor]  # per layer [slots, kv_heads, max_len, head_dim], RoPE applied
    values: list[torch.Tensor]

    @classmethod
    def allocate(
        cls,
        layers: int,
        slots: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> KVCache:
        # Zeros, not empty: masked-out keys get weight 0, and 0 * NaN garbage would still be NaN.
        shape = (slots, kv_heads, max_len, head_dim)
        return cls(
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
        )

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def write(
        self, layer: int, slots: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Store ``k``/``v`` [N, kv_heads, head_dim] at (``slots``[i], ``pos``[i]) in place.

        ``index_copy_`` on a flat [slots * kv_heads * max_len, head_dim] view: on CPU ~20x faster than
        advanced-index assignment across the non-adjacent slot and position dims."""
        kv, T, d = self.keys[layer].shape[1:]
        idx = ((slots * kv)[:, None] + torch.arange(kv, device=slots.device)) * T + pos[:, None]
        idx = idx.reshape(-1)
        self.keys[layer].view(-1, d).index_copy_(0, idx, k.reshape(-1, d))
        self.values[layer].view(-1, d).index_copy_(0, idx, v.reshape(-1, d))

    def move(self, src: torch.Tensor, dst: torch.Tensor, length: int) -> None:
        """Copy the first ``length`` positions of slots ``src`` into slots ``dst`` (disjoint sets)."""
        for t in self.keys + self.values:
            t[dst, :, :length] = t[src, :, :length]
