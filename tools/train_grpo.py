"""GRPO training entry point.

torchrun --nproc_per_node 4 tools/train_grpo.py --config configs/open_rs_exp3.yaml [key=value ...]
torchrun --nproc_per_node 4 tools/train_grpo.py --config configs/demo_cpu.yaml max_steps=20
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from engine.config import load_config_from_cli  # noqa: E402
from engine.train_config import TrainConfig  # noqa: E402
from engine.trainer import GRPOTrainer  # noqa: E402
from parallel.distributed import destroy_distributed  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    cfg = load_config_from_cli(TrainConfig, argv)
    trainer = GRPOTrainer(cfg)
    try:
        trainer.train()
    finally:
        destroy_distributed()


if __name__ == "__main__":  # the reward process pool spawns workers that re-import this file
    main()
