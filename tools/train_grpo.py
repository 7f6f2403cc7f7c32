"""GRPO training entry point.

torchrun --nproc_per_node 4 tools/train_grpo.py --config configs/open_rs_exp3.yaml [key=value ...]
torchrun --nproc_per_node 4 tools/train_grpo.py --config configs/demo_cpu.yaml max_steps=20
python tools/train_grpo.py --config configs/open_rs_exp3.yaml [key=value ...] --print-config

``--print-config`` prints the fully resolved config (every section, every default) as YAML and exits
0 without touching data, models, torch or Megatron. A config error (unknown key, bad value, missing
file) ends in one line, ``error: ...``, and exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from engine.config import ConfigError, config_to_dict, load_config_from_cli  # noqa: E402
from engine.train_config import TrainConfig  # noqa: E402

PRINT_CONFIG = "--print-config"


def resolve(argv: list[str]) -> TrainConfig:
    """The config from ``[--config PATH] [key=value ...]``; a user error exits 2 with one line."""
    try:
        return load_config_from_cli(TrainConfig, argv)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    print_config = PRINT_CONFIG in argv
    cfg = resolve([a for a in argv if a != PRINT_CONFIG])
    if print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True), end="")
        return 0

    from engine.trainer import GRPOTrainer  # torch, Megatron: only when training
    from parallel.distributed import destroy_distributed

    trainer = GRPOTrainer(cfg)
    try:
        trainer.train()
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":  # the reward process pool spawns workers that re-import this file
    sys.exit(main())
