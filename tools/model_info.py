"""Print parameter count and per-rank training memory for an HF Qwen2 config.

python tools/model_info.py --config configs/models/deepseek-r1-distill-qwen-1.5b.json --tp 2 --dp 2 --dtype bf16
"""

from __future__ import annotations

import argparse

from models.qwen.config import QwenConfig, parse_dtype
from models.qwen.memory import estimate, format_table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="HF config.json or a model dir")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--no-distributed-optimizer", action="store_true")
    a = p.parse_args(argv)
    cfg = QwenConfig.from_file(a.config)
    rows = [estimate(cfg, tp, a.dp, parse_dtype(a.dtype), not a.no_distributed_optimizer) for tp in a.tp]
    print(f"{a.config}: {rows[0].params_total:,} parameters, dtype {a.dtype}")
    print(format_table(rows))


if __name__ == "__main__":
    main()
