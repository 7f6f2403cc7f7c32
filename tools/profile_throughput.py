"""Throughput profile of the GRPO engine: seconds per phase, tokens/s, model FLOPs, MFU, peak memory.

torchrun --standalone --nproc_per_node 4 tools/profile_throughput.py --config configs/demo_cpu.yaml \
    [--steps 5] [--warmup 1] [--mode all|train|generate] [--peak-tflops F] [--profile-steps 2] \
    [--trace-dir D] [--out D] [key=value overrides ...]

Modes:
  all       full GRPO steps (``GRPOTrainer.train_step``): rollout, reward, train
  generate  rollouts only (the generator on a fresh prompt batch each step)
  train     one rollout, then training passes (ref logprobs when beta > 0, forward/backward over all
            micro-batches, DP grad sync, optimizer step) on those fixed completions with fixed random
            advantages: the numbers do not depend on the values

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
  tokens/s = those / train seconds (the train phase includes reference/old logprobs).
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
import resource
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
from engine.train_config import TrainConfig  # noqa: E402
from parallel.collectives import all_reduce, all_reduce_dp, barrier, broadcast_object  # noqa: E402
from tools.machine import describe_machine  # noqa: E402

MODES = ("all", "train", "generate")


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
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if "=" not in a]
    if bad:
        p.error(f"unexpected arguments {bad}: expected key=value config overrides")
    if args.steps < 1 or args.warmup < 0 or args.profile_steps < 0:
        p.error("--steps must be >= 1, --warmup and --profile-steps >= 0")
    return args, rest


# ---- machine facts --------------------------------------------------------------------------------


def peak_memory_bytes() -> float:
    if torch.cuda.is_available():
        return float(torch.cuda.max_memory_allocated())
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024.0  # Linux: KiB


# ---- collectives (plain torch.distributed; no-ops on one process) --------------------------------
def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


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
    """Runs one step of the chosen mode; returns (phase seconds, token counts, metrics to log)."""

    def __init__(self, trainer, mode: str) -> None:
        self.t = trainer
        self.mode = mode
        self.cfg = trainer.cfg
        self.ro = trainer.cfg.rollout
        self.step = 0
        self.fixed = None

    def rollout(self, step: int):
        G = self.ro.num_generations
        batch = next(self.t.sampler)
        with torch.profiler.record_function("rollout"):
            out = self.t.generator.generate(batch.prompt_ids[::G], G, self.t.sampling(step))
        return batch, out

    def __call__(self) -> dict[str, float]:
        step = self.step
        self.step += 1
        if self.mode == "all":
            with torch.profiler.record_function("grpo_step"):
                m = self.t.train_step()
            return {**m, **step_accounting(m), "rows": self.ro.prompts_per_step * self.ro.num_generations}
        if self.mode == "generate":
            barrier()
            t0 = time.perf_counter()
            batch, out = self.rollout(step)
            barrier()
            dt = time.perf_counter() - t0
            gen = dp_sum(sum(len(c) for c in out.completion_ids))
            prompt = dp_sum(sum(len(p) for p in batch.prompt_ids))
            return {
                **ZERO_PHASES,
                "rollout_s": dt,
                "gen_tokens": gen,
                "train_tokens": gen + prompt,  # rows' tokens; generate mode trains none (FLOPs only)
                "rows": dp_sum(len(out.completion_ids)),
                "completion/length_mean": gen / max(dp_sum(len(out.completion_ids)), 1),
            }
        return self.train_pass(step)

    def _fixed_rollout(self):
        """train mode: one rollout, micro-batches and advantages built once and reused every step."""
        from engine.batching.micro_batches import build_micro_batches, pad_rows

        batch, out = self.rollout(0)
        n = len(out.completion_ids)
        mbs = build_micro_batches(
            batch.prompt_ids, out.completion_ids, self.cfg.batching.micro_batch_size, self.t.pad_id,
            self.ro.num_generations, self.cfg.batching.shared_prefix,
        )  # fmt: skip
        adv = torch.randn(n, generator=torch.Generator().manual_seed(self.cfg.seed))
        for mb in mbs:
            mb.advantages = adv[mb.rows]
            mb.rollout_logprobs = pad_rows(out.logprobs[mb.rows], mb.completion_mask.shape[1])
        tokens = float(sum(mb.attn.sum() for mb in mbs))
        self.fixed = (mbs, dp_sum(tokens), dp_sum(n))

    def train_pass(self, step: int) -> dict[str, float]:
        from engine.batching.logprobs import completion_logprobs
        from engine.trainer import accumulate_policy_grads

        if self.fixed is None:
            self._fixed_rollout()
        mbs, tokens, rows = self.fixed
        t, cfg = self.t, self.cfg
        T = self.ro.temperature if self.ro.scale_logprobs_by_temperature else 1.0
        vocab = t.qcfg.vocab_size
        ref_model = getattr(t, "ref_model", None)
        optimizer = getattr(t, "optimizer", None)
        barrier()
        t0 = time.perf_counter()
        with torch.profiler.record_function("logprobs"), torch.no_grad():
            for mb in mbs:
                if ref_model is not None and cfg.loss.beta > 0:
                    mb.ref_logprobs = completion_logprobs(ref_model, mb, vocab, T)[0]
                if cfg.loss.num_iterations > 1:
                    mb.old_logprobs = completion_logprobs(t.model, mb, vocab, T)[0]
        barrier()
        t1 = time.perf_counter()
        with torch.profiler.record_function("train"):
            sums: dict[str, float] = {}
            for _ in range(cfg.loss.num_iterations):
                t.model.zero_grad_buffer()
                it = accumulate_policy_grads(
                    t.model, mbs, cfg.loss, vocab, T, sampling_temperature=self.ro.temperature
                )
                t.model.finish_grad_sync()
                if optimizer is not None:
                    optimizer.step()
                for k, v in it.items():
                    sums[k] = sums.get(k, 0.0) + v / cfg.loss.num_iterations
        barrier()
        t2 = time.perf_counter()
        return {
            **ZERO_PHASES,
            "logprobs_s": t1 - t0,
            "train_s": t2 - t1,
            "gen_tokens": 0.0,
            "train_tokens": tokens,
            "rows": rows,
            **{f"loss/{k}": v for k, v in sums.items()},
        }


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
        "world_size": _world(),
        "tp": cfg.parallel.tensor_parallel,
        "dp": _world() // cfg.parallel.tensor_parallel,
        "dtype": cfg.model.dtype,
        "model": cfg.model.config or cfg.model.hf_checkpoint,
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
    devices = _world() if on_gpu else 1
    if args.peak_tflops is not None:
        return {"per_device_flops": args.peak_tflops * 1e12, "devices": devices, "source": "given"}
    from models.qwen.config import parse_dtype

    dtype = parse_dtype(cfg.model.dtype)
    barrier()
    flops = measure_peak_flops(dtype, n=4096 if on_gpu else 2048) if _rank() == 0 else 0.0
    barrier()
    flops = broadcast_object(flops)
    what = (
        f"measured: {'GPU' if on_gpu else f'{os.cpu_count()}-thread CPU'} {str(dtype).split('.')[-1]} matmul"
    )
    return {"per_device_flops": flops, "devices": devices, "source": what}


def main(argv: list[str] | None = None) -> dict | None:
    args, overrides = parse_args(argv)
    cfg = load_config(TrainConfig, args.config, overrides)
    total = args.warmup + args.steps + args.profile_steps
    if cfg.max_steps < total:  # the LR schedule length must cover the steps we run
        cfg = load_config(TrainConfig, args.config, [*overrides, f"max_steps={total}"])

    from engine.trainer import GRPOTrainer
    from parallel.distributed import destroy_distributed

    trainer = GRPOTrainer(cfg)
    rank0 = _rank() == 0
    log = trainer.logger
    out_dir = Path(args.out or Path(cfg.logging.dir) / "profile")
    trace_dir = Path(args.trace_dir or out_dir / "trace")
    try:
        peak = resolve_peak(args, cfg)
        runner = Runner(trainer, args.mode)
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

        mem_local = peak_memory_bytes()
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
