"""Throughput profile of the GRPO engine: seconds per phase, tokens/s, model FLOPs, MFU, peak memory.

torchrun --standalone --nproc_per_node 4 tools/profile_throughput.py --config configs/demo_cpu.yaml \
    [--steps 5] [--warmup 1] [--mode all|train|generate] [--peak-tflops F] [--profile-steps 2] \
    [--synthetic-completions N --synthetic-prompt-length P] [--trace-dir D] [--out D] [key=value ...]

python tools/profile_throughput.py --config configs/open_rs_exp3.yaml --mode train \
    --synthetic-completions 3584 --synthetic-prompt-length 512 --steps 1 --warmup 0 --profile-steps 0 \
    model.config=configs/models/narrow-real-vocab.json model.dtype=fp32 parallel.tensor_parallel=1 \
    rollout.prompts_per_step=1 batching.pack_sequences=true

Modes (each step runs the phase scheduler's cycle ROLLOUT -> REWARD -> LOGPROBS -> TRAIN -> SYNC, so a
co-located vLLM engine sleeps and wakes as in training, and calls the trainer's own phase methods):
  all       full GRPO steps (``GRPOTrainer.train_step``)
  generate  rollouts only (``GRPOTrainer.rollout`` on a fresh prompt batch each step; SYNC wakes the
            generator again)
  train     the training passes only: ``stored_logprobs`` (reference logprobs when beta > 0, old
            ones when num_iterations > 1) and ``policy_update`` (forward/backward over all
            micro-batches, DP grad sync, optimizer step) on fixed completions with fixed random
            advantages: the numbers do not depend on the values. The completions come from one
            rollout, or with ``--synthetic-completions N`` from no rollout at all: every completion
            is N random tokens (no EOS) after a prompt of ``--synthetic-prompt-length P`` random
            tokens; the count is the config's (``rollout.prompts_per_step`` x ``num_generations``).
            The dataset is then not read beyond the tokenizer (a non-local ``data.path`` is replaced
            by the bundled offline file) and the reward pool is not started.

Sequence: ``--warmup`` steps (not measured), ``--steps`` measured steps (no profiler attached),
then ``--profile-steps`` steps under ``torch.profiler`` on rank 0 (CPU activities, plus CUDA on a
GPU), written with ``tensorboard_trace_handler`` to ``--trace-dir`` (default
``<logging.dir>/profile/trace``; ``tensorboard --logdir <logging.dir>`` shows the scalars and, with
the torch-tb-profiler plugin, the trace; chrome://tracing or Perfetto open the JSON directly).

Outputs (rank 0): per-step scalars through the trainer's MetricsLogger (``<logging.dir>/tb``) plus
``profile/*`` summary scalars, and ``summary.md`` (a markdown table, also printed) and
``summary.json`` in ``--out`` (default ``<logging.dir>/profile``).

Accounting (see engine/flops.py for FLOPs per token):
* generation tokens = completion tokens sampled; generation tokens/s = those / rollout seconds.
* training tokens = prompt + completion tokens (no padding) of every row trained on; training
  tokens/s = those / TRAIN phase seconds (forward, backward, optimizer; the reference/old logprob
  passes are the LOGPROBS phase, reported beside it).
* model FLOPs: rollout = training tokens x forward (prefill of the prompt + one decode per completion
  token); train = training tokens x forward x (3 per iteration + 1 for the reference model when
  beta > 0 + 1 for old logprobs when num_iterations > 1). Counts are totals over DP replicas.
* peak: ``--peak-tflops`` (per device), else measured on rank 0 with a large matmul in the model
  dtype (engine.flops.measure_peak_flops). Devices: GPUs = world size; on CPU the ranks share one
  machine, so the peak is the whole machine's (all cores) and counts once.
* peak memory: GPU ``torch.cuda.max_memory_allocated``; CPU max RSS (``resource``), per rank, the
  max over ranks and the sum.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from engine.config import load_config  # noqa: E402
from engine.flops import flops_per_token, measure_peak_flops  # noqa: E402
from engine.phases import peak_memory_bytes  # noqa: E402
from engine.train_config import TrainConfig  # noqa: E402
from parallel.collectives import all_reduce, all_reduce_dp, barrier, broadcast_object  # noqa: E402
from parallel.distributed import is_main_rank, world_size  # noqa: E402
from tools.machine import describe_machine  # noqa: E402

MODES = ("all", "train", "generate")
OFFLINE_DATA = (
    Path(__file__).resolve().parents[1] / "assets/data/deepscaler_style_aime_math.jsonl"
)  # offline prompts


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", "-c", required=True, help="training YAML (TrainConfig)")
    p.add_argument("--steps", type=int, default=5, help="measured steps (warm-up excluded)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps, not measured")
    p.add_argument("--mode", choices=MODES, default="all")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="peak TFLOP/s per device; measured if unset"
    )
    p.add_argument("--profile-steps", type=int, default=2, help="steps traced by torch.profiler (0 = none)")
    p.add_argument(
        "--trace-dir", default=None, help="profiler trace dir (default <logging.dir>/profile/trace)"
    )
    p.add_argument("--out", default=None, help="summary dir (default <logging.dir>/profile)")
    p.add_argument(
        "--synthetic-completions", type=int, default=None, metavar="N",
        help="train mode without a rollout: every completion is N random tokens (no EOS)",
    )  # fmt: skip
    p.add_argument(
        "--synthetic-prompt-length", type=int, default=None, metavar="P", help="synthetic prompt tokens"
    )
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if "=" not in a]
    if bad:
        p.error(f"unexpected arguments {bad}: expected key=value config overrides")
    if args.steps < 1 or args.warmup < 0 or args.profile_steps < 0:
        p.error("--steps must be >= 1, --warmup and --profile-steps >= 0")
    synthetic = (args.synthetic_completions, args.synthetic_prompt_length)
    if (synthetic[0] is None) != (synthetic[1] is None):
        p.error("--synthetic-completions and --synthetic-prompt-length go together")
    if synthetic[0] is not None:
        if args.mode != "train":
            p.error(f"--synthetic-completions needs --mode train, got --mode {args.mode}")
        if synthetic[0] < 1 or synthetic[1] < 1:
            p.error(f"--synthetic-completions and --synthetic-prompt-length must be >= 1, got {synthetic}")
    return args, rest


# ---- machine facts --------------------------------------------------------------------------------


# ---- collectives (plain torch.distributed; no-ops on one process) --------------------------------
def reduce_all(x: float, op: str = "sum", group=None) -> float:
    t = torch.tensor([float(x)], dtype=torch.float64)
    return float(all_reduce(t, dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group)[0])


def dp_sum(x: float) -> float:
    return float(all_reduce_dp(torch.tensor([float(x)], dtype=torch.float64))[0])


PHASES = ("rollout", "reward", "logprobs", "train", "sync")
ZERO_PHASES = {f"{p}_s": 0.0 for p in PHASES}


def step_accounting(m: dict[str, float]) -> dict[str, float]:
    """Phase seconds and DP-total token counts from ``GRPOTrainer.train_step``'s metrics.

    Reads ``phase/<name>_s`` (the phase scheduler's timings) and falls back to the older
    ``perf/<name>_s``; token counts are recovered as the reported DP-summed rates x their seconds.
    """
    out = {}
    for p in PHASES:
        out[f"{p}_s"] = float(m.get(f"phase/{p}_s", m.get(f"perf/{p}_s", 0.0)))
    gen = m["perf/gen_tokens_per_s"] * out["rollout_s"]
    if "perf/train_tokens_per_s" in m:
        train = m["perf/train_tokens_per_s"] * out["train_s"]
    else:  # older trainer: tokens_per_s counted generated + trained tokens over the step
        train = m["perf/tokens_per_s"] * m["perf/step_s"] - gen
    out["gen_tokens"], out["train_tokens"] = float(round(gen)), float(round(train))
    return out


# ---- one step per mode ------------------------------------------------------------------------------
class Runner:
    """Runs one step of the chosen mode through the trainer's phase scheduler and its phase methods;
    returns phase seconds, token counts and metrics to log."""

    def __init__(self, trainer, mode: str, synthetic: tuple[int, int] | None = None) -> None:
        self.t = trainer
        self.mode = mode
        self.cfg = trainer.cfg
        self.ro = trainer.cfg.rollout
        self.synthetic = synthetic
        self.fixed = None  # train mode: (batch, rollout, advantages) reused every step

    def __call__(self) -> dict[str, float]:
        from engine.phases import Phase
        from engine.trainer import StepRecord

        t = self.t
        if self.mode == "all":
            with torch.profiler.record_function("grpo_step"):
                m = t.train_step()
            return {**m, **step_accounting(m), "rows": self.ro.prompts_per_step * self.ro.num_generations}
        train = self.mode == "train"
        rec = StepRecord(step=t.step, batch=self.fixed[0] if train and self.fixed else next(t.sampler))
        with t.phases.phase(Phase.ROLLOUT), torch.profiler.record_function("rollout"):
            if not train:
                t.rollout(rec)
            elif self.fixed is None:
                self.fixed = self._fixed_rollout(rec)
            if train:
                rec.batch, rec.rollout, rec.advantages = self.fixed
        with t.phases.phase(Phase.REWARD):  # fixed random advantages (train); generate scores nothing
            if train:
                from engine.rewards import RewardResult

                n = len(rec.completions)
                rec.rewards = RewardResult([0.0] * n, {}, 0, 0, failed=[False] * n)
        with t.phases.phase(Phase.LOGPROBS), torch.profiler.record_function("logprobs"):
            if train:
                t.stored_logprobs(rec)
        with t.phases.phase(Phase.TRAIN), torch.profiler.record_function("train"):
            if train:
                t.policy_update(rec)
        with t.phases.phase(Phase.SYNC):
            if not train:  # wake the generator (and its weights) for the next rollout
                t.phases.sync(t.model, t.weight_version)
        t.step += 1
        sec = t.phases.seconds
        n = len(rec.completions)
        gen = sum(len(c) for c in rec.completions)
        rows_tokens = gen + sum(len(p) for p in rec.batch.prompt_ids)
        out = {
            **ZERO_PHASES,
            "rows": dp_sum(n),
            **{f"phase/{p}_peak_gib": v / 2**30 for p, v in t.phases.peak_bytes.items()},
        }
        if not train:
            return {
                **out,
                "rollout_s": sec["rollout"],
                "gen_tokens": dp_sum(gen),
                "train_tokens": dp_sum(rows_tokens),  # rows' tokens; generate mode trains none (FLOPs only)
                "completion/length_mean": dp_sum(gen) / max(out["rows"], 1),
            }
        return {
            **out,
            "logprobs_s": sec["logprobs"],
            "train_s": sec["train"],
            "gen_tokens": 0.0,
            "train_tokens": dp_sum(rows_tokens),
            **{f"loss/{k}": v for k, v in t._dp_mean(rec.loss_metrics).items()},  # DP mean, as train_step
        }

    def _fixed_rollout(self, rec):
        """train mode: the completions (one rollout, or synthetic) and advantages, built once."""
        from engine.rollout.base import GenerationOutput

        if self.synthetic is None:
            self.t.rollout(rec)
            out = rec.rollout
        else:
            C, P = self.synthetic
            t, G = self.t, self.ro.num_generations
            g = torch.Generator().manual_seed(self.cfg.seed + 1000 * (t.step + 1))
            special = {t.eos_id, t.pad_id}
            vocab = len(t.tokenizer)

            def tokens(k: int) -> list[int]:
                ids = torch.randint(0, vocab, (k,), generator=g).tolist()
                return [x if x not in special else (x + 1) % vocab for x in ids]

            # the global batch (every DP rank's rows, the same at any layout), then this rank's share
            from parallel.distributed import dp_rank, dp_size

            n = len(rec.batch.prompt_ids)
            prompts = [tokens(P) for _ in range(n * dp_size() // G)]
            comps = [tokens(C) for _ in range(n * dp_size())]
            lo = dp_rank() * n
            rec.batch.prompt_ids = [p for p in prompts for _ in range(G)][lo : lo + n]
            comps = comps[lo : lo + n]
            out = GenerationOutput(comps, [[0.0] * C for _ in comps], [False] * n, t.weight_version)
        from parallel.distributed import dp_rank, dp_size

        n = len(out.completion_ids)  # this rank's slice of the global batch's advantages
        adv = torch.randn(n * dp_size(), generator=torch.Generator().manual_seed(self.cfg.seed))
        adv = adv[dp_rank() * n : (dp_rank() + 1) * n]
        return rec.batch, out, adv


# ---- the summary ------------------------------------------------------------------------------
def summarise(
    cfg: TrainConfig, qcfg, mode: str, steps: list[dict], walls: list[float], peak: dict, mem: dict
) -> dict:
    n = len(steps)
    keys = [f"{p}_s" for p in PHASES] + ["gen_tokens", "train_tokens", "rows"]
    tot = {k: float(sum(s[k] for s in steps)) for k in keys}
    wall = sum(walls)
    seq = tot["train_tokens"] / max(tot["rows"], 1)  # mean row length (prompt + completion)
    fwd = flops_per_token(qcfg, seq, training=False)
    mu = cfg.loss.num_iterations
    lp_passes = (1 if cfg.loss.beta > 0 else 0) + (1 if mu > 1 else 0)  # reference, old
    flops = {
        "rollout": tot["train_tokens"] * fwd if mode in ("all", "generate") else 0.0,
        "logprobs": tot["train_tokens"] * fwd * lp_passes if mode in ("all", "train") else 0.0,
        "train": tot["train_tokens"] * fwd * 3 * mu if mode in ("all", "train") else 0.0,
    }
    step_flops = sum(flops.values())
    peak_total = peak["per_device_flops"] * peak["devices"]

    def rate(x: float, sec: float) -> float:
        return x / sec if sec > 0 else 0.0

    out = {
        "machine": describe_machine(),
        "loadavg_1m": os.getloadavg()[0],  # other work on the machine skews CPU timings
        "mode": mode,
        "world_size": world_size(),
        "tp": cfg.parallel.tensor_parallel,
        "dp": world_size() // cfg.parallel.tensor_parallel,
        "dtype": cfg.model.dtype,
        "model": cfg.model.architecture_file,
        "prompts_per_step": cfg.rollout.prompts_per_step,
        "num_generations": cfg.rollout.num_generations,
        "max_completion_length": cfg.rollout.max_completion_length,
        "micro_batch_size": cfg.batching.micro_batch_size,
        "steps": n,
        "wall_s_per_step": wall / n,
        "wall_s_median": statistics.median(walls),
        "wall_s_total": wall,
        **{f"{p}_s_per_step": tot[f"{p}_s"] / n for p in PHASES},
        **{f"{p}_s_total": tot[f"{p}_s"] for p in PHASES},
        "gen_tokens": tot["gen_tokens"],
        "train_tokens": tot["train_tokens"],
        "rows": tot["rows"],
        "gen_tokens_per_s": rate(tot["gen_tokens"], tot["rollout_s"]),
        "train_tokens_per_s": rate(tot["train_tokens"], tot["train_s"]),
        "mean_seq_len": seq,
        "flops_per_token_fwd": fwd,
        "flops_per_token_train": flops_per_token(qcfg, seq, training=True),
        "model_flops_per_step": step_flops / n,
        "achieved_tflops": rate(step_flops, wall) / 1e12,
        "peak_tflops_per_device": peak["per_device_flops"] / 1e12,
        "peak_devices": peak["devices"],
        "peak_source": peak["source"],
        "mfu": rate(step_flops, wall) / peak_total,
        **mem,
    }
    out["last_step_loss"] = {k: v for k, v in steps[-1].items() if k.startswith("loss/")}  # may be < 0
    out["last_step_phase_peak_gib"] = {k: v for k, v in steps[-1].items() if k.endswith("_peak_gib")}
    for p in ("rollout", "train"):
        out[f"achieved_tflops_{p}"] = rate(flops[p], tot[f"{p}_s"]) / 1e12
        out[f"mfu_{p}"] = rate(flops[p], tot[f"{p}_s"]) / peak_total
    return out


def format_table(s: dict) -> str:
    gib = 1024**3
    phases = ", ".join(f"{p} {s[f'{p}_s_per_step']:.4f}" for p in PHASES)
    rows = [
        ("machine", f"{s['machine']}, 1-min load average {s['loadavg_1m']:.1f} at the end"),
        ("layout", f"TP{s['tp']} x DP{s['dp']} ({s['world_size']} ranks), {s['dtype']}"),
        ("model", s["model"]),
        ("batch", f"{s['prompts_per_step']} prompts x G={s['num_generations']}, max completion "
                  f"{s['max_completion_length']}, micro-batch {s['micro_batch_size']}"),
        ("mode / measured steps", f"{s['mode']} / {s['steps']} (warm-up excluded)"),
        ("wall s/step", f"{s['wall_s_per_step']:.4f} mean, {s['wall_s_median']:.4f} median"),
        ("phase s/step", phases),
        ("generation tokens/s", f"{s['gen_tokens_per_s']:.1f} ({s['gen_tokens']:.0f} completion tokens / "
                                f"{s['rollout_s_total']:.3f} s rollout)" if s["rollout_s_total"] else "- (no rollout timed)"),
        ("training tokens/s", f"{s['train_tokens_per_s']:.1f} ({s['train_tokens']:.0f} prompt+completion tokens / "
                              f"{s['train_s_total']:.3f} s train)" if s["train_s_total"] else "- (no training)"),
        ("mean sequence length", f"{s['mean_seq_len']:.2f}"),
        ("model FLOPs/token", f"{s['flops_per_token_fwd']:.4g} fwd, {s['flops_per_token_train']:.4g} fwd+bwd"),
        ("model FLOPs/step", f"{s['model_flops_per_step']:.4g}"),
        ("achieved TFLOP/s", f"{s['achieved_tflops']:.4g} step, {s['achieved_tflops_rollout']:.4g} rollout, "
                             f"{s['achieved_tflops_train']:.4g} train"),
        ("peak TFLOP/s", f"{s['peak_tflops_per_device']:.4g} x {s['peak_devices']} ({s['peak_source']})"),
        ("MFU", f"{100 * s['mfu']:.3f}% step, {100 * s['mfu_rollout']:.3f}% rollout, {100 * s['mfu_train']:.3f}% train"),
        ("peak memory", f"{s['peak_mem_max_bytes'] / gib:.3f} GiB max/rank, {s['peak_mem_sum_bytes'] / gib:.3f} GiB "
                        f"all ranks ({s['peak_mem_kind']})"),
    ]  # fmt: skip
    return "\n".join(["| quantity | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def resolve_peak(args, cfg: TrainConfig) -> dict:
    on_gpu = torch.cuda.is_available()
    devices = world_size() if on_gpu else 1
    if args.peak_tflops is not None:
        return {"per_device_flops": args.peak_tflops * 1e12, "devices": devices, "source": "given"}
    from models.qwen.config import parse_dtype

    dtype = parse_dtype(cfg.model.dtype)
    barrier()
    flops = measure_peak_flops(dtype, n=4096 if on_gpu else 2048) if is_main_rank() else 0.0
    barrier()
    flops = broadcast_object(flops)
    what = (
        f"measured: {'GPU' if on_gpu else f'{os.cpu_count()}-thread CPU'} {str(dtype).split('.')[-1]} matmul"
    )
    return {"per_device_flops": flops, "devices": devices, "source": what}


def main(argv: list[str] | None = None) -> dict | None:
    args, overrides = parse_args(argv)
    cfg = load_config(TrainConfig, args.config, overrides)
    synthetic = None
    if args.synthetic_completions is not None:
        synthetic = (args.synthetic_completions, args.synthetic_prompt_length)
        extra = [f"rollout.max_completion_length={synthetic[0]}", "rewards.num_workers=0"]
        if not Path(cfg.data.path).exists():  # a hub dataset: the prompts are synthetic anyway
            extra += [f"data.path={OFFLINE_DATA}", "data.answer_column=answer"]
        overrides = [*extra, *overrides]
        cfg = load_config(TrainConfig, args.config, overrides)
    total = args.warmup + args.steps + args.profile_steps
    if cfg.max_steps < total:  # the LR schedule length must cover the steps we run
        cfg = load_config(TrainConfig, args.config, [*overrides, f"max_steps={total}"])

    from engine.trainer import GRPOTrainer
    from parallel.distributed import destroy_distributed

    trainer = GRPOTrainer(cfg)
    rank0 = is_main_rank()
    log = trainer.logger
    out_dir = Path(args.out or Path(cfg.logging.dir) / "profile")
    trace_dir = Path(args.trace_dir or out_dir / "trace")
    try:
        peak = resolve_peak(args, cfg)
        runner = Runner(trainer, args.mode, synthetic)
        step_no = 0

        def one(measure: bool):
            nonlocal step_no
            barrier()
            t0 = time.perf_counter()
            m = runner()
            barrier()
            wall = time.perf_counter() - t0
            step_no += 1
            scalars = {k: v for k, v in m.items() if "/" in k}
            for p in PHASES:
                scalars.setdefault(f"phase/{p}_s", m[f"{p}_s"])
            log.log(step_no, {**scalars, "perf/wall_s": wall})
            return m, wall

        for _ in range(args.warmup):
            one(False)
        measured, walls = [], []
        for _ in range(args.steps):
            m, w = one(True)
            measured.append(m)
            walls.append(w)

        if args.profile_steps:
            from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            ctx = (
                profile(
                    activities=acts,
                    on_trace_ready=tensorboard_trace_handler(str(trace_dir), worker_name="rank0"),
                    profile_memory=True,
                    record_shapes=False,
                )
                if rank0
                else nullcontext()
            )
            with ctx:
                for _ in range(args.profile_steps):
                    with torch.profiler.record_function(f"step_{step_no + 1}"):
                        one(False)

        mem_local = float(peak_memory_bytes())
        mem = {
            "peak_mem_max_bytes": reduce_all(mem_local, "max"),
            "peak_mem_sum_bytes": reduce_all(mem_local, "sum"),
            "peak_mem_kind": "torch.cuda.max_memory_allocated" if torch.cuda.is_available() else "max RSS",
        }
        summary = summarise(cfg, trainer.qcfg, args.mode, measured, walls, peak, mem)
        if rank0:
            table = format_table(summary)
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "summary.md").write_text(table + "\n")
            (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            if log.writer is not None:
                for k, v in summary.items():
                    if isinstance(v, (int, float)) and math.isfinite(v):
                        log.writer.add_scalar(f"profile/{k}", v, step_no)
                log.writer.flush()
            print(table, flush=True)
            print(f"summary: {out_dir / 'summary.md'}  trace: {trace_dir}", flush=True)
        return summary
    finally:
        trainer.close()
        destroy_distributed()


if __name__ == "__main__":  # the reward process pool spawns workers that re-import this file
    main()
