"""Model FLOPs per token, a measured peak, and MFU.

Dense decoder (Qwen2) count, matmuls only (norms, RoPE, softmax, SwiGLU's elementwise product,
residual adds and the embedding lookup are left out: they are O(h) per token against O(h^2)).
With ``L`` layers, hidden ``h``, ``n_q`` query heads and ``n_kv`` KV heads of size ``d``, FFN
width ``f``, vocab ``V`` and a sequence (context) length ``s``::

    N_mm  = L * ( h*(n_q*d + 2*n_kv*d)      # Q, K, V projections (GQA: K and V are n_kv*d wide)
                + n_q*d*h                   # attention output projection
                + 3*h*f )                   # SwiGLU MLP: gate, up, down
          + h*V                             # LM head (counted even when tied to the embedding)

    forward  FLOPs/token = 2*N_mm + 2*2*L*s*n_q*d   # a multiply-add is 2 FLOPs; attention:
                                                  # Q.K^T and P.V, each 2*s*n_q*d per layer
    training FLOPs/token = 3 * forward              # backward = 2x forward (grads wrt inputs and weights)

The attention term follows the PaLM / Megatron convention of the full ``s`` (a causal kernel does
about half). For DeepSeek-R1-Distill-Qwen-1.5B, ``N_mm`` = 1.544e9 (of its 1.777e9 parameters,
the rest is the 0.233e9-parameter embedding and the biases/norms), so the forward is
~3.1e9 FLOPs/token at short context, ~2 x 1.78e9 as the usual ``2N`` rule of thumb says.

MFU = achieved model FLOP/s / peak FLOP/s, where the model FLOPs are the count above (not what
the hardware executed: recomputation, padding and the padded vocab are not credited).
"""

from __future__ import annotations

import time

import torch

from models.qwen.config import QwenConfig

__all__ = ["flops_per_token", "matmul_params", "measure_peak_flops", "mfu"]


def matmul_params(cfg: QwenConfig) -> int:
    """Weights that take part in a matmul per token (``N_mm`` in the module docstring)."""
    h, d, f = cfg.hidden_size, cfg.kv_channels, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * f
    return cfg.num_hidden_layers * per_layer + h * cfg.vocab_size


def flops_per_token(cfg: QwenConfig, seq_len: float, training: bool) -> float:
    """Model FLOPs for one token at context ``seq_len``: forward, or forward + backward (x3)."""
    if seq_len < 0:
        raise ValueError(f"seq_len must be >= 0, got {seq_len}")
    attn = 2 * 2 * cfg.num_hidden_layers * seq_len * cfg.num_attention_heads * cfg.kv_channels
    fwd = 2 * matmul_params(cfg) + attn
    return float(3 * fwd if training else fwd)


def measure_peak_flops(
    dtype: torch.dtype = torch.float32,
    n: int = 2048,
    repeats: int = 10,
    device: str | torch.device | None = None,
    threads: int | None = None,
) -> float:
    """Peak FLOP/s of this device as the best of ``repeats`` timed ``n x n @ n x n`` matmuls.

    CPU: with ``threads`` torch threads (all cores if None; restored afterwards). GPU: the current
    CUDA device, synchronised around each timing. The best of several runs is taken: a peak, not
    an average.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    prev_threads = torch.get_num_threads()
    if device.type == "cpu":
        import os

        torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, device=device, generator=gen).to(dtype)
        b = torch.randn(n, n, device=device, generator=gen).to(dtype)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        a @ b  # warm-up (kernel selection, page-in)
        sync()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(prev_threads)
    return 2.0 * n**3 / best


def mfu(model_flops: float, seconds: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: (model_flops / seconds) / peak (all three totals over the same devices)."""
    if seconds <= 0 or peak_flops_per_s <= 0:
        raise ValueError(f"seconds ({seconds}) and peak ({peak_flops_per_s}) must be > 0")
    return model_flops / seconds / peak_flops_per_s
