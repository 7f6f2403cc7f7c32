"""Side-by-side GRPO step time on CPU: TRL's GRPOTrainer vs this engine, same model/batch/lengths.

python tools/bench_vs_trl.py [--setup] [--steps 8] [--warmup 2] [--model tiny|small|PATH]
    [--prompts 16] [--generations 16] [--max-completion 2] [--micro-batch 128] [--beta 0.0]
    [--layouts tp1dp1,tp2dp2] [--ours-set KEY=VALUE ...] [--json OUT]

One invocation runs, one after the other on the same machine:
  * TRL   ``trl.GRPOTrainer`` on 1 process (CPU, torch using every core), in a subprocess with the
          python of a separate venv (``.venv-trl``; ``--setup`` creates it: TRL is a benchmark-only
          tool, not a dependency of the engine). No vLLM: HF ``generate`` with a KV cache.
  * ours  ``engine.trainer.GRPOTrainer.train_step`` under torchrun, once per layout: ``tp1dp1`` (one
          process, every core), ``tp2dp2`` (4 ranks, 1 thread each, as ``make demo``), ``tp1dp2``...

Both sides get: the same Qwen2 architecture (random init, fp32), the demo task's prompts, tokenizer
and rewards (exact 1.0 + closeness 0.5), ``prompts x G`` completions per optimizer step, the same
maximum completion length, temperature 1, top-p 1, the same beta and LR (1e-6 by default), one optimizer step per
generation (TRL: ``per_device_train_batch_size = micro-batch``, ``gradient_accumulation_steps =
prompts * G / micro-batch``; ours: ``batching.micro_batch_size = micro-batch / DP``), token-mean loss
per micro-batch (TRL ``loss_type="bnpo"``), AdamW, constant LR, grad clip 1.0.

Step time: wall seconds between consecutive optimizer steps (TRL: ``on_step_end`` callbacks; ours:
around ``train_step`` + the TensorBoard log, on rank 0). The first ``--warmup`` steps are dropped;
the median and the minimum of the rest (pooled over ``--rounds`` interleaved rounds) are reported,
with the ratios ours / TRL (target: <= 0.5). The 1-minute load average before/after each run is
recorded: on a shared machine the minimum is the steadier estimate. CPU seconds per step (process
time, summed over our ranks; OpenMP spin-waits count) are reported beside the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRL_VENV = REPO / ".venv-trl"
# Pinned so the benchmark venv has the project's torch (the CPU wheel) and transformers.
TRL_PINS = ["torch==2.13.0", "transformers==5.19.*", "trl==1.16.0"]
DEMO_CONFIG = REPO / "configs" / "demo_cpu.yaml"
DEMO_TOKENIZER = REPO / "assets" / "demo" / "tokenizer"
DEMO_DATA = REPO / "assets" / "demo" / "train.jsonl"
MODELS = {
    "tiny": REPO / "configs" / "models" / "tiny-demo.json",
    # "small": the tiny config scaled up (written to a temp file at run time)
}
SMALL = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4}


# ---------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", choices=["trl", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--setup", action="store_true", help="create .venv-trl (pinned) before running")
    p.add_argument("--trl-python", default=str(TRL_VENV / "bin" / "python"))
    p.add_argument("--steps", type=int, default=8, help="measured steps")
    p.add_argument("--warmup", type=int, default=2, help="dropped steps")
    p.add_argument("--model", default="tiny", help="tiny | small | path to an HF Qwen2 config.json")
    p.add_argument("--prompts", type=int, default=16, help="prompts per optimizer step")
    p.add_argument("--generations", type=int, default=16, help="G: completions per prompt")
    p.add_argument("--max-completion", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=128, help="completions per forward/backward (global)")
    p.add_argument("--beta", type=float, default=0.0)
    # open-rs's LR: over a few steps the policy stays at its random init on both sides, so the
    # completion-length distributions (and the work per step) stay the same; the demo's 2e-3 lets
    # the two runs learn different lengths.
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layouts", default="tp1dp1,tp2dp2", help="ours: comma list of tp<T>dp<D>")
    p.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads of a 1-process run"
    )
    p.add_argument("--rounds", type=int, default=2, help="repeat all runs, interleaved; steps are pooled")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument(
        "--ours-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for our runs only, after the benchmark's own (repeatable), "
        "e.g. batching.shared_prefix=true",
    )
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)  # worker result file
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if (args.prompts * args.generations) % args.micro_batch:
        p.error("--micro-batch must divide prompts * generations")
    return args


def resolve_model(spec: str, tmp: Path) -> Path:
    if spec in MODELS:
        return MODELS[spec]
    if spec == "small":
        d = json.loads(MODELS["tiny"].read_text())
        d.update(SMALL)
        path = tmp / "small-qwen2.json"
        path.write_text(json.dumps(d, indent=2))
        return path
    return Path(spec)


def step_times(ends: list[float], warmup: int) -> list[float]:
    """Seconds per step from the timestamps [start, end_1, end_2, ...], the first ``warmup`` dropped."""
    return [b - a for a, b in zip(ends, ends[1:], strict=False)][warmup:]


# ---- TRL worker (runs in .venv-trl) -----------------------------------------------------------------
def trl_worker(args) -> None:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, str(REPO))
    from tools.demo_task import demo_closeness, demo_exact

    torch.manual_seed(args.seed)
    tok = PreTrainedTokenizerFast.from_pretrained(str(DEMO_TOKENIZER))
    d = json.loads(Path(args.model).read_text())
    model = Qwen2ForCausalLM(Qwen2Config(**d)).float()

    rows = [json.loads(x) for x in DEMO_DATA.read_text().splitlines() if x.strip()]
    ds = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["problem"]}], "answer": r["answer"]} for r in rows]
    )

    def exact(completions, answer, **_):
        return [demo_exact(c[0]["content"], a) for c, a in zip(completions, answer, strict=True)]

    def closeness(completions, answer, **_):
        return [demo_closeness(c[0]["content"], a) for c, a in zip(completions, answer, strict=True)]

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.cpu: list[float] = []
            self.logs: list[dict] = []

        def on_train_begin(self, *a, **k):
            self.ends.append(time.perf_counter())
            self.cpu.append(time.process_time())

        def on_step_end(self, *a, **k):
            self.ends.append(time.perf_counter())
            self.cpu.append(time.process_time())

        def on_log(self, _args, _state, _control, logs=None, **k):
            self.logs.append(dict(logs or {}))

    n = args.prompts * args.generations
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(
            output_dir=out,
            use_cpu=True,
            bf16=False,
            fp16=False,
            per_device_train_batch_size=args.micro_batch,
            gradient_accumulation_steps=n // args.micro_batch,
            num_generations=args.generations,
            max_completion_length=args.max_completion,
            temperature=1.0,
            top_p=1.0,
            beta=args.beta,
            loss_type="bnpo",
            num_iterations=1,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            max_steps=total,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            seed=args.seed,
            dataloader_num_workers=0,
            reward_weights=[1.0, 0.5],
            log_completions=False,
            disable_tqdm=True,
        )
        clock = Clock()
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=[exact, closeness],
            args=cfg,
            train_dataset=ds,
            processing_class=tok,
            callbacks=[clock],
        )
        trainer.train()
    lens = [x["completions/mean_length"] for x in clock.logs if "completions/mean_length" in x]
    result = {
        "name": "TRL GRPOTrainer (1 process)",
        "threads": torch.get_num_threads(),
        "trl_version": __import__("trl").__version__,
        "step_s": step_times(clock.ends, args.warmup),
        "cpu_s": step_times(clock.cpu, args.warmup),
        "completion_length_mean": statistics.mean(lens) if lens else None,
    }
    Path(args.out).write_text(json.dumps(result))


# ---- our worker (runs under torchrun, project venv) -------------------------------------------------
def ours_worker(args) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(REPO))
    from engine.config import load_config
    from engine.train_config import TrainConfig
    from engine.trainer import GRPOTrainer
    from parallel.distributed import destroy_distributed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dp = world // args.tp
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as logdir:
        overrides = [
            f"seed={args.seed}",
            f"max_steps={total}",
            f"model.config={args.model}",
            "model.dtype=fp32",
            f"parallel.tensor_parallel={args.tp}",
            f"rollout.num_generations={args.generations}",
            f"rollout.prompts_per_step={args.prompts}",
            f"batching.micro_batch_size={max(1, args.micro_batch // dp)}",
            f"rollout.max_completion_length={args.max_completion}",
            "rollout.temperature=1.0",
            "rollout.top_p=1.0",
            "rollout.top_k=0",
            f"loss.beta={args.beta}",
            f"optim.lr={args.lr}",
            f"logging.dir={logdir}",
            "logging.log_completions=0",
            *args.ours_set,
        ]
        cfg = load_config(TrainConfig, DEMO_CONFIG, overrides)
        trainer = GRPOTrainer(cfg)
        rank0 = dist.get_rank() == 0
        ends, cpu, lens = [], [], []
        try:
            dist.barrier()
            ends.append(time.perf_counter())
            cpu.append(time.process_time())
            for _ in range(total):
                m = trainer.train_step()
                trainer.logger.log(trainer.step, m)
                cpu.append(time.process_time())
                dist.barrier()
                ends.append(time.perf_counter())
                lens.append(m["completion/length_mean"])
            cpu_t = torch.tensor(step_times(cpu, args.warmup), dtype=torch.float64)
            dist.all_reduce(cpu_t)  # CPU seconds of all ranks together
        finally:
            trainer.close()
            destroy_distributed()
    if rank0:
        result = {
            "name": f"ours TP{args.tp} x DP{dp} ({world} process{'es' if world > 1 else ''})"
            + "".join(f" {o}" for o in args.ours_set),
            "threads": torch.get_num_threads(),
            "step_s": step_times(ends, args.warmup),
            "cpu_s": cpu_t.tolist(),
            "completion_length_mean": statistics.mean(lens),
        }
        Path(args.out).write_text(json.dumps(result))


# ---- driver ----------------------------------------------------------------------------------------
def setup_trl_venv(python: str) -> None:
    venv = Path(python).parents[1]
    if not Path(python).exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", *TRL_PINS], check=True)


def run_worker(cmd: list[str], env: dict, label: str) -> dict:
    print(f"[bench] {label}: {' '.join(cmd[:6])} ...", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-6000:])
        raise SystemExit(f"[bench] {label} failed (exit {proc.returncode})")
    print(f"[bench] {label}: done in {time.time() - t0:.0f}s", flush=True)
    return json.loads(Path(cmd[cmd.index("--out") + 1]).read_text())


def common_args(args, model: Path) -> list[str]:
    return [
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--model", str(model),
        "--prompts", str(args.prompts), "--generations", str(args.generations),
        "--max-completion", str(args.max_completion), "--micro-batch", str(args.micro_batch),
        "--beta", str(args.beta), "--lr", str(args.lr), "--seed", str(args.seed),
    ]  # fmt: skip


def parse_layout(s: str) -> tuple[int, int]:
    s = s.strip().lower()
    if not (s.startswith("tp") and "dp" in s):
        raise SystemExit(f"bad layout {s!r}: expected tp<T>dp<D>, e.g. tp2dp2")
    tp, dp = s[2:].split("dp")
    return int(tp), int(dp)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.worker == "trl":
        return trl_worker(args)
    if args.worker == "ours":
        return ours_worker(args)

    cores = os.cpu_count() or 1
    base_env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    base_env.update(PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    runs: dict[str, dict] = {}  # label -> pooled result
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = resolve_model(args.model, tmp)
        jobs = []  # (label, cmd, env)
        if not args.skip_trl:
            if args.setup or not Path(args.trl_python).exists():
                setup_trl_venv(args.trl_python)
            cmd = [
                args.trl_python,
                __file__,
                "--worker",
                "trl",
                "--out",
                str(tmp / "trl.json"),
                *common_args(args, model),
            ]
            jobs.append(("TRL", cmd, {**base_env, "OMP_NUM_THREADS": str(args.threads)}))
        for layout in args.layouts.split(","):
            tp, dp = parse_layout(layout)
            world = tp * dp
            cmd = [
                sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                __file__, "--worker", "ours", "--tp", str(tp), "--out", str(tmp / f"ours_{layout}.json"),
                *common_args(args, model), *(a for o in args.ours_set for a in ("--ours-set", o)),
            ]  # fmt: skip
            threads = max(1, args.threads // world)  # no oversubscription of threads within a rank
            jobs.append((f"ours {layout}", cmd, {**base_env, "OMP_NUM_THREADS": str(threads)}))
        # Rounds interleave the runs so that load from elsewhere on the machine hits all of them alike.
        for rnd in range(args.rounds):
            for label, cmd, env in jobs:
                load0 = os.getloadavg()[0]
                r = run_worker(cmd, env, f"{label} (round {rnd + 1}/{args.rounds})")
                r["loadavg_1m"] = [load0, os.getloadavg()[0]]
                if label not in runs:
                    runs[label] = {
                        **r,
                        "step_s": [],
                        "cpu_s": [],
                        "loadavg_1m": [],
                        "completion_length_mean": [],
                    }
                runs[label]["step_s"] += r["step_s"]
                runs[label]["cpu_s"] += r["cpu_s"]
                runs[label]["loadavg_1m"] += r["loadavg_1m"]
                runs[label]["completion_length_mean"].append(r["completion_length_mean"])
    results = list(runs.values())
    for r in results:
        lens = [x for x in r["completion_length_mean"] if x is not None]
        r["completion_length_mean"] = statistics.mean(lens) if lens else None

    for r in results:
        r["median_step_s"] = statistics.median(r["step_s"])
        r["min_step_s"] = min(r["step_s"])
        r["median_cpu_s"] = statistics.median(r["cpu_s"])
    trl = next((r for r in results if r["name"].startswith("TRL")), None)
    loads = [x for r in results for x in r["loadavg_1m"]]
    lines = [
        f"model {args.model} ({model.name}), {args.prompts} prompts x G={args.generations}, "
        f"max completion {args.max_completion}, micro-batch {args.micro_batch}, beta {args.beta}, "
        f"{args.rounds} round(s) x {args.steps} measured steps (after {args.warmup} warm-up each), "
        f"{cores} CPU cores, 1-min load average {min(loads):.1f}..{max(loads):.1f} during the runs",
        "",
        "| run | threads/rank | median s/step | min s/step | CPU s/step (all ranks) | mean completion len "
        "| ours / TRL (median) | ours / TRL (min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ours = trl and r is not trl
        med = f"{r['median_step_s'] / trl['median_step_s']:.3f}x" if ours else "-"
        low = f"{r['min_step_s'] / trl['min_step_s']:.3f}x" if ours else "-"
        clen = r["completion_length_mean"]
        lines.append(
            f"| {r['name']} | {r['threads']} | {r['median_step_s']:.4f} | {r['min_step_s']:.4f} | "
            f"{r['median_cpu_s']:.4f} | "
            f"{'-' if clen is None else f'{clen:.2f}'} | {med} | {low} |"
        )
    table = "\n".join(lines)
    print(table, flush=True)
    summary = {
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "out")},
        "results": results,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
