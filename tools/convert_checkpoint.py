"""Convert Qwen2 checkpoints between HF safetensors and Megatron-Core dist_checkpointing.

  python tools/convert_checkpoint.py hf-to-mcore --hf DIR --out DIR --tp N [--dtype bf16|fp16|fp32]
  python tools/convert_checkpoint.py mcore-to-hf --ckpt DIR --out DIR [--max-shard-gb G]
  python tools/convert_checkpoint.py reshard     --ckpt DIR --out DIR --tp M
  python tools/convert_checkpoint.py verify      --hf DIR --ckpt DIR [--tp N] [--dtype fp32]

Each runs as a single process or under ``torchrun --nproc_per_node N`` (hf-to-mcore / reshard at
TP=N: each rank reads only its shard; verify: the Megatron model runs at TP=N). Outputs are
written to ``OUT.tmp-<pid>`` and renamed when complete; an existing OUT needs ``--overwrite``.
Exit status: 0 ok, 1 verify found logits above tolerance, 2 bad input (message on stderr).

The stored Megatron tensors do not depend on TP (see models/qwen/checkpoint.py), so a checkpoint
converted by one process for --tp 2 loads at TP=2 exactly like one converted under torchrun.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

# Tolerance on max |logit difference| / max(1, max |HF logit|), by the dtype both models compute in.
# fp32: both sides are fp32 implementations of the same math and differ by summation order only.
#   Measured: 2e-7 on the tiny test models; 8.7e-6 absolute (2e-6 relative) on the full-size 1.5B
#   with random weights, 28 layers: rtol 1e-4 leaves a 50x margin.
# bf16 / fp16: every matmul output, norm and residual add is rounded to 8 (bf16) or 11 (fp16)
#   mantissa bits at different points in HF and Megatron, and the drift compounds over the layers.
#   Measured bf16: 4.4e-3 on the tiny models, 0.16 absolute (0.036 relative) on the random 1.5B;
#   rtol 0.1 leaves ~3x margin. fp16 (not measured) rounds 8x finer: 0.02. These catch a missing, permuted or
#   transposed tensor (O(1) logit changes) but not a subtle perturbation: that is what the fp32
#   default is for (upcasting bf16 weights is exact, so it checks the conversion, not kernel noise).
VERIFY_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1e-1, torch.float16: 2e-2}


@dataclass
class VerifyResult:
    max_abs_diff: float
    scale: float  # max(1, max |HF logit|)
    tol: float  # absolute tolerance = rtol * scale
    dtype: torch.dtype

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tol


def prompt_batch(vocab_size: int, batch: int = 3, seq: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed token ids (seeded) with 0, 2, 4 ... left-padding tokens per row."""
    g = torch.Generator().manual_seed(20240611)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=g)
    pad = torch.ones(batch, seq, dtype=torch.bool)
    for b in range(batch):
        pad[b, : min(2 * b, seq - 1)] = False
    ids[~pad] = 0
    return ids, pad


@torch.no_grad()
def verify(hf_dir: str | Path, ckpt_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> VerifyResult:
    """Logits of the Megatron checkpoint (at the current TP size) vs HF transformers on ``hf_dir``."""
    from transformers import AutoModelForCausalLM

    from engine.batching.logprobs import gather_vocab
    from models.qwen.checkpoint import (
        CheckpointError,
        checkpoint_config,
        load_mcore_checkpoint,
        read_checkpoint_metadata,
    )
    from models.qwen.config import QwenConfig
    from models.qwen.model import build_model, forward_logits

    cfg = checkpoint_config(read_checkpoint_metadata(ckpt_dir))
    hf_cfg = QwenConfig.from_file(hf_dir)
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    diff = [
        f"{f}: HF {getattr(hf_cfg, f)} vs checkpoint {getattr(cfg, f)}"
        for f in fields
        if getattr(hf_cfg, f) != getattr(cfg, f)
    ]
    if diff:
        raise CheckpointError(f"{hf_dir} and {ckpt_dir} are different models: " + "; ".join(diff))

    model = build_model(cfg, params_dtype=dtype, perform_initialization=False)
    load_mcore_checkpoint(model, ckpt_dir)
    model.eval()
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype, attn_implementation="eager").eval()

    ids, pad = prompt_batch(cfg.vocab_size)
    ref = hf(input_ids=ids, attention_mask=pad.long()).logits.float()[pad]
    got = gather_vocab(forward_logits(model, ids, pad), cfg.vocab_size).float()[pad]
    scale = max(1.0, float(ref.abs().max()))
    return VerifyResult(float((got - ref).abs().max()), scale, VERIFY_RTOL[dtype] * scale, dtype)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _layout_tp(tp: int) -> int:
    """TP of the process group: ``tp`` under torchrun, 1 for a single process."""
    world = _world_size()
    if world == 1:
        return 1
    if world % tp:
        raise ValueError(f"torchrun world size {world} is not a multiple of --tp {tp}")
    return tp


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    a = sub.add_parser("hf-to-mcore", help="HF safetensors dir -> Megatron checkpoint")
    a.add_argument("--hf", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--tp", type=int, required=True)
    a.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: the HF tensors' dtype)")

    b = sub.add_parser("mcore-to-hf", help="Megatron checkpoint -> HF safetensors dir")
    b.add_argument("--ckpt", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--max-shard-gb", type=float, default=2.0, help="max bytes per safetensors file, in GiB")

    c = sub.add_parser("reshard", help="rewrite a Megatron checkpoint for another TP size")
    c.add_argument("--ckpt", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--tp", type=int, required=True)

    v = sub.add_parser("verify", help="compare logits of a Megatron checkpoint and an HF dir")
    v.add_argument("--hf", required=True)
    v.add_argument("--ckpt", required=True)
    v.add_argument("--tp", type=int, default=None, help="default: the torchrun world size")
    v.add_argument("--dtype", default="fp32", help="compute dtype of both models (default fp32)")

    for s in (a, b, c):
        s.add_argument(
            "--overwrite", action="store_true", help="replace OUT (only once the new one is complete)"
        )
    return p


def run(args: argparse.Namespace) -> int:
    """Execute a parsed command (distributed must not be initialised yet)."""
    from models.qwen import checkpoint as ck
    from models.qwen.config import parse_dtype
    from parallel.distributed import init_distributed, is_main_rank

    if args.cmd == "hf-to-mcore":
        init_distributed(_layout_tp(args.tp))
        out = ck.hf_to_mcore_checkpoint(
            args.hf, args.out, tp=args.tp, dtype=args.dtype, overwrite=args.overwrite
        )
    elif args.cmd == "mcore-to-hf":
        init_distributed(1)
        max_bytes = int(args.max_shard_gb * 1024**3)
        out = ck.mcore_to_hf_checkpoint(
            args.ckpt, args.out, overwrite=args.overwrite, max_shard_bytes=max_bytes
        )
    elif args.cmd == "reshard":
        init_distributed(_layout_tp(args.tp))
        out = ck.reshard_mcore_checkpoint(args.ckpt, args.out, tp=args.tp, overwrite=args.overwrite)
    else:
        tp = args.tp or _world_size()
        if _world_size() != tp:
            raise ValueError(
                f"verify --tp {tp} needs torchrun --nproc_per_node {tp} (world size is {_world_size()})"
            )
        init_distributed(tp)
        res = verify(args.hf, args.ckpt, dtype=parse_dtype(args.dtype))
        if is_main_rank():
            print(
                json.dumps(
                    {
                        "max_abs_logit_diff": res.max_abs_diff,
                        "tolerance": res.tol,
                        "rtol": VERIFY_RTOL[res.dtype],
                        "logit_scale": res.scale,
                        "dtype": str(res.dtype).removeprefix("torch."),
                        "tp": tp,
                        "ok": res.ok,
                    }
                )
            )
        return 0 if res.ok else 1
    if is_main_rank():
        print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from models.qwen.checkpoint import CheckpointError

    try:
        return run(args)
    except (CheckpointError, ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    finally:
        from parallel.distributed import destroy_distributed

        destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
