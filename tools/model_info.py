"""Parameter counts and per-rank training memory: of a model, or the memory plan of a run config.

python tools/model_info.py --config configs/models/deepseek-r1-distill-qwen-1.5b.json --tp 2 --dp 2 --dtype bf16
python tools/model_info.py --train-config configs/open_rs_exp3.yaml --dp 2 --device-gib 48 [key=value ...]

With ``--train-config`` it prints the memory plan (``engine.batching.memory_plan``) of that run at its
``parallel.tensor_parallel`` and ``--dp``: static memory per rank, the activation and logits peak of one
training micro-batch (token budgets, ``parallel.recompute_*``, ``parallel.sequence_parallel`` as the
config and its overrides give them), the logprob pass,
the generator's share, and whether it fits ``--device-gib`` (exit status 1 when it does not).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from models.qwen.config import QwenConfig, parse_dtype  # noqa: E402
from models.qwen.memory import estimate, format_table  # noqa: E402


def run_plan(a: argparse.Namespace, overrides: list[str]) -> int:
    from engine.batching.memory_plan import plan_memory
    from engine.config import load_config
    from engine.model_loading import activation_options
    from engine.train_config import TrainConfig

    cfg = load_config(TrainConfig, a.train_config, overrides)
    qcfg = QwenConfig.from_file(cfg.model.architecture_file)
    plan = plan_memory(
        cfg,
        qcfg,
        a.dp,
        a.device_gib,
        activation_options(cfg.parallel),
        distributed_optimizer=not a.no_distributed_optimizer,
    )
    print(f"{a.train_config} {' '.join(overrides)}: {cfg.model.architecture_file}")
    print(plan.format())
    return 1 if plan.problems() else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="HF config.json or a model dir: parameter counts and static memory")
    p.add_argument("--train-config", help="training YAML: the run's memory plan (key=value overrides follow)")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--no-distributed-optimizer", action="store_true")
    p.add_argument("--device-gib", type=float, default=None, help="device memory per rank (GiB)")
    a, rest = p.parse_known_args(argv)
    bad = [x for x in rest if "=" not in x]
    if bad or (rest and not a.train_config):
        p.error(f"unexpected arguments {rest}: key=value overrides go with --train-config")
    if bool(a.config) == bool(a.train_config):
        p.error("give one of --config (a model) and --train-config (a run)")
    if a.train_config:
        return run_plan(a, rest)
    cfg = QwenConfig.from_file(a.config)
    rows = [estimate(cfg, tp, a.dp, parse_dtype(a.dtype), not a.no_distributed_optimizer) for tp in a.tp]
    print(f"{a.config}: {rows[0].params_total:,} parameters, dtype {a.dtype}")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
