"""Rollout: the generator interface, sampling, the built-in Megatron generator and the vLLM one.

``engine.rollout.base`` is torch-free at import (configs and evaluation read it); the generators
import Megatron / vLLM and are imported where they are built.
"""

from engine.rollout.base import DecodeConfig, GenerationOutput, Generator, SamplingConfig

__all__ = ["DecodeConfig", "GenerationOutput", "Generator", "SamplingConfig"]
