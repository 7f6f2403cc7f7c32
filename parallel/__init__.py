"""Distributed setup, parallel state and collective helpers (Megatron-Core parallel_state underneath)."""

from parallel.distributed import ParallelConfig, destroy_distributed, init_distributed

__all__ = ["ParallelConfig", "init_distributed", "destroy_distributed"]
