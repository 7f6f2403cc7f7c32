"""Evaluate a model on the open-rs math benchmarks (pass@1 from one sample, avg@k over k samples).

    python tools/evaluate.py --model HF_DIR_or_CKPT --tasks aime24,amc23,math500,minerva,olympiadbench
    torchrun --nproc_per_node 4 tools/evaluate.py --model CKPT --tp 2 --k 8 --out runs/eval/exp3
    python tools/evaluate.py --model HF_DIR --backend vllm --tp 1 --k 8      # GPU, one process

``--model`` is an HF safetensors dir (``config.json``) or an mcore-grpo Megatron checkpoint
(``mcore_grpo.json``, e.g. a trainer checkpoint; its ``hf_assets/`` supplies the tokenizer). The
prompt, sampling (T=0.6, top_p=0.95) and scoring follow open-rs; see ``engine/evaluation.py``.
Writes ``<out>/<task>.jsonl`` (one record per problem: id, prompt, completions, extracted answers,
gold, correct flags) and ``<out>/summary.{json,md}``, each atomically.

Backends: ``megatron`` (built-in generator over the Megatron model; CPU or GPU; single process or
torchrun with TP x DP, problems sharded over DP) and ``vllm`` (the engine's own vLLM generator,
``VLLMGenerator.from_hf_dir``: one process, vLLM's own TP; a Megatron checkpoint is exported to a
temporary HF dir first). Both load models through ``engine.model_loading``, as the trainer does.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from engine.evaluation import TASKS, EvalTask, resolve_tasks  # noqa: E402

# torch-free: argument errors come before torch is imported. METADATA_FILE and ASSETS_DIR repeat
# models.qwen.checkpoint's names (tests/test_evaluation.py checks they agree).
from engine.model_loading import METADATA_FILE, checkpoint_kind  # noqa: E402, F401

ASSETS_DIR = "hf_assets"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Evaluate a Qwen2 model on math benchmarks (open-rs setup).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="HF safetensors dir or mcore-grpo Megatron checkpoint dir")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the model dir / hf_assets)")
    p.add_argument(
        "--tasks",
        default=None,
        help=f"comma-separated: {','.join(TASKS)} (default: all, unless --task-file is given)",
    )
    p.add_argument("--task-file", action="append", default=[], help="extra .jsonl task (problem/answer/id)")
    p.add_argument(
        "--task-file-gold", choices=["latex", "expr"], default="latex", help="gold parse of --task-file"
    )
    p.add_argument("--k", type=int, default=1, help="samples per problem (pass@1 uses the first)")
    p.add_argument("--max-new-tokens", type=int, default=32768)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="first N problems of each task")
    p.add_argument("--backend", choices=["megatron", "vllm"], default="megatron")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="sequences (prompts x k) per generate call per DP rank (default: 32 megatron, all for vllm)",
    )
    p.add_argument("--scoring", choices=["lighteval", "recipe"], default="lighteval")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="vllm only")
    p.add_argument("--out", default=None, help="output dir (default: runs/eval/<model dir name>)")
    return p


def detect_model(path: str) -> str:
    """``"mcore"`` (mcore_grpo.json), ``"hf"`` (config.json), else a clear error."""
    return checkpoint_kind(path, "--model")


def resolve_tokenizer(model: str, kind: str, tokenizer: str | None) -> str:
    if tokenizer is not None:
        if not Path(tokenizer).is_dir():
            raise FileNotFoundError(f"--tokenizer {tokenizer} is not a directory")
        return tokenizer
    cand = Path(model) / ASSETS_DIR if kind == "mcore" else Path(model)
    if (cand / "tokenizer.json").is_file() or (cand / "tokenizer_config.json").is_file():
        return str(cand)
    raise FileNotFoundError(f"no tokenizer in {cand}: pass --tokenizer DIR")


def validate(args: argparse.Namespace) -> tuple[str, str, list[EvalTask]]:
    """Everything checkable before torch / Megatron start: (model kind, tokenizer dir, tasks)."""
    kind = detect_model(args.model)
    tok = resolve_tokenizer(args.model, kind, args.tokenizer)
    if args.tasks is None and not args.task_file:
        args.tasks = ",".join(TASKS)
    tasks = resolve_tasks(args.tasks or "")
    tasks += [EvalTask.from_file(f, gold_mode=args.task_file_gold) for f in args.task_file]
    if not tasks:
        raise ValueError("no tasks: give --tasks and/or --task-file")
    if len({t.name for t in tasks}) != len(tasks):
        raise ValueError(f"duplicate task names: {[t.name for t in tasks]}")
    for name in ("k", "max_new_tokens", "tp"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    if args.backend == "vllm" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--backend vllm runs as one process (vLLM does its own TP): do not use torchrun")
    return kind, tok, tasks


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


def _dtype(name: str) -> Any:
    """``auto``: bf16 on GPU, fp32 on CPU; else the named dtype."""
    import torch

    from models.qwen.config import parse_dtype

    return parse_dtype(("bf16" if torch.cuda.is_available() else "fp32") if name == "auto" else name)


def build_megatron_generator(model_dir: str, dtype_name: str, tokenizer: Any) -> tuple[Any, Any]:
    """(MegatronGenerator, QwenConfig) over the loaded model (parallel state must be initialised)."""
    from engine.model_loading import load_model
    from engine.rollout.megatron_generator import MegatronGenerator

    model, cfg = load_model(model_dir, _dtype(dtype_name))
    model.eval()
    _check_vocab(tokenizer, cfg.vocab_size)
    eos, pad = _eos_pad(tokenizer)
    return MegatronGenerator(model, cfg.vocab_size, eos, pad), cfg


def build_vllm_generator(hf_dir: str, args: argparse.Namespace, tokenizer: Any, max_model_len: int) -> Any:
    """The engine's vLLM generator, standalone over ``hf_dir`` (vLLM's own TP, one process)."""
    from engine.rollout.vllm_generator import VLLMGenerator
    from engine.train_config import VLLMConfig
    from models.qwen.config import HF_DTYPE_NAMES

    cfg = VLLMConfig(
        dtype=HF_DTYPE_NAMES[_dtype(args.dtype)],
        tensor_parallel_size=args.tp,
        max_model_len=max_model_len,
        seed=args.seed,
        gpu_memory_utilization=args.gpu_memory_utilization,
    )
    return VLLMGenerator.from_hf_dir(hf_dir, _eos_pad(tokenizer)[0], cfg)


def _check_vocab(tokenizer: Any, vocab_size: int) -> None:
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model vocab is {vocab_size}")


def _eos_pad(tokenizer: Any) -> tuple[list[int], int]:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return [int(tokenizer.eos_token_id)], int(pad)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace, kind: str, tok_dir: str, tasks: list[EvalTask]) -> int:
    import torch.distributed as dist

    from engine.data import load_tokenizer
    from engine.evaluation import (
        evaluate,
        format_summary_table,
        load_problems,
        tokenize_eval_prompts,
        write_results,
    )
    from engine.rollout.base import SamplingConfig

    tokenizer = load_tokenizer(tok_dir)
    sampling = SamplingConfig(args.temperature, args.top_p, args.top_k, args.max_new_tokens, args.seed)
    out_dir = Path(args.out or Path("runs") / "eval" / Path(args.model).resolve().name)
    t0 = time.time()
    tmp_hf: tempfile.TemporaryDirectory | None = None
    if args.backend == "megatron":
        from parallel.distributed import destroy_distributed, init_distributed

        init_distributed(args.tp, seed=args.seed)
        generator, cfg = build_megatron_generator(args.model, args.dtype, tokenizer)
        max_context = cfg.max_position_embeddings
        batch_size = args.batch_size or 32
    else:
        from models.qwen.config import QwenConfig

        hf_dir = args.model
        if kind == "mcore":
            from models.qwen.checkpoint import mcore_to_hf_checkpoint

            tmp_hf = tempfile.TemporaryDirectory(prefix="eval-hf-")
            hf_dir = str(Path(tmp_hf.name) / "hf")
            _say(f"exporting {args.model} to {hf_dir} for vLLM")
            mcore_to_hf_checkpoint(args.model, hf_dir)
        cfg = QwenConfig.from_file(hf_dir)
        _check_vocab(tokenizer, cfg.vocab_size)
        longest = max(
            len(ids)
            for t in tasks
            for ids in tokenize_eval_prompts(
                tokenizer, [p.problem for p in load_problems(t, args.limit)], t.query_template
            )[1]
        )
        max_context = min(cfg.max_position_embeddings, longest + args.max_new_tokens)
        generator = build_vllm_generator(hf_dir, args, tokenizer, max_context)
        batch_size = args.batch_size
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    try:
        result = evaluate(
            generator,
            tokenizer,
            tasks,
            k=args.k,
            sampling=sampling,
            limit=args.limit,
            batch_size=batch_size,
            scoring=args.scoring,
            max_context=max_context,
            log=_say if rank0 else None,
        )
        if rank0:
            meta = {
                "model": str(Path(args.model).resolve()),
                "model_kind": kind,
                "tokenizer": str(Path(tok_dir).resolve()),
                "backend": args.backend,
                "tp": args.tp,
                "dtype": args.dtype,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "wall_s": time.time() - t0,
                "argv": sys.argv[1:],
            }
            write_results(result, out_dir, meta)
            print(format_summary_table(result.summary), end="")
            files = ", ".join(f"{t}.jsonl" for t in result.records)
            print(f"wrote {files}, summary.json, summary.md to {out_dir}", flush=True)
    finally:
        if args.backend == "megatron":
            destroy_distributed()
        else:
            generator.close()
        if tmp_hf is not None:
            tmp_hf.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        kind, tok_dir, tasks = validate(args)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))  # exits 2 with the message
    return run(args, kind, tok_dir, tasks)


if __name__ == "__main__":
    sys.exit(main())
