"""Qwen2 (DeepSeek-R1-Distill-Qwen) on Megatron-Core: config, model provider, HF weight mapping."""

from models.qwen.config import QwenConfig

__all__ = ["QwenConfig"]
