"""Weight sync: the trainer's Megatron shards -> full HF tensors for a generation engine."""

from engine.weight_sync.hf_stream import HFWeightStream, WeightSyncError, plan_buckets

__all__ = ["HFWeightStream", "WeightSyncError", "plan_buckets"]
