"""Silence the library warnings every run prints and no user can act on, once per process at start-up.

Filtered (each is printed once per rank, ~50 lines for `make demo`):
- megatron-core: "Transformer Engine and Apex are not installed. Falling back to ..." and "Apex is not
  installed. Falling back to Torch Norm" (the CPU and TE-less GPU paths use the local spec on purpose);
- megatron-core TransformerConfig: "full scope is deprecated" (its own default cuda_graph_scope);
- megatron-core tensor_parallel: "set the environment variable CUDA_DEVICE_MAX_CONNECTIONS" (a GPU
  tuning hint, also printed on CPU);
- torch.distributed: "all_gather_into_tensor is deprecated" (called inside megatron-core).
Everything else stays visible. Call before importing megatron.
"""

from __future__ import annotations

import warnings

KNOWN = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"full scope is deprecated",
    r".*CUDA_DEVICE_MAX_CONNECTIONS",
    r".*all_gather_into_tensor. is deprecated",
)


def filter_known_warnings() -> None:
    for pattern in KNOWN:
        warnings.filterwarnings("ignore", message=pattern)
