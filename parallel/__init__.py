"""Distributed setup, parallel state and collective helpers (Megatron-Core parallel_state underneath)."""

from parallel.distributed import destroy_distributed, init_distributed

__all__ = ["init_distributed", "destroy_distributed"]
