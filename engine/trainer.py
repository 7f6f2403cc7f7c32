"""GRPO on Megatron-Core, one optimizer step top to bottom: ``GRPOTrainer.train_step``.

    ROLLOUT   sample G completions per prompt with the generator (built-in Megatron or vLLM)
    REWARD    score them (reward functions in a process pool on TP rank 0), gather over DP, and
              group-normalise: A = (r - mean_g) / (std_g + 1e-4)
    LOGPROBS  micro-batches (padded rows, or packed sequences in token budgets), then reference
              (frozen initial model) and old (only when mu > 1) log-probabilities
    TRAIN     per micro-batch: policy logprobs (chunked LM head) -> GRPO loss -> backward; DDP grad
              all-reduce, clip, AdamW step, LR schedule
    SYNC      bump the weight version and hand the new weights to the generator

Each phase runs inside ``engine.phases.PhaseScheduler``, which enforces the order and moves memory
between the trainer and a co-located generator; a ``StepRecord`` carries the step from phase to phase.
Loss normalisation (as open-rs / TRL at the pinned commit): token-mean per *logical* micro-batch of
``batching.micro_batch_size`` completions per rank, averaged over them and over DP ranks (Megatron DDP
averages grads), whatever the physical batching (``engine.batching.normalisation``).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state

from engine.advantages import group_advantages
from engine.batching.logprobs import DEFAULT_CHUNK_TOKENS, completion_logprobs
from engine.batching.micro_batches import MicroBatch, build_micro_batches, pad_rows
from engine.batching.normalisation import assign_loss_slices, fit, row_indices
from engine.checkpointing import TrainCheckpointer
from engine.data import PromptBatch, PromptSampler, load_tokenizer, prepare_prompts
from engine.evaluation import eval_progress_table
from engine.logger import MetricsLogger
from engine.loss import LossConfig, grpo_loss, masked_mean
from engine.model_loading import activation_options, load_model, resolve_model_config
from engine.optimizer import build_optimizer, build_scheduler
from engine.phases import Phase, PhaseScheduler, TrainerOffload
from engine.rewards import RewardResult, RewardScorer
from engine.rollout.base import GenerationOutput, SamplingConfig
from engine.rollout.megatron_generator import MegatronGenerator
from engine.seeds import step_seed
from engine.train_config import TrainConfig
from models.qwen.config import HF_DTYPE_NAMES, ActivationOptions, parse_dtype
from models.qwen.model import build_model
from parallel.collectives import all_gather_dp, all_reduce, all_reduce_dp, broadcast_object
from parallel.ddp import wrap_ddp
from parallel.distributed import dp_rank, dp_size, init_distributed, tp_rank


class TrainingError(RuntimeError):
    """A run-stopping problem (non-finite loss, stale rollout weights); the message says what and where."""


def accumulate_policy_grads(
    model: torch.nn.Module,
    mbs: list[MicroBatch],
    loss_cfg: LossConfig,
    vocab_size: int,
    temperature: float = 1.0,
    check_finite=None,
    sampling_temperature: float | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> dict[str, float]:
    """Forward/backward every physical micro-batch (each carries its advantages and stored logprobs);
    grads accumulate in DDP's buffers as the step's objective, defined on the logical micro-batches
    that ``mb.loss_slices`` describe (``engine.batching.normalisation``; without them each micro-batch
    is its own logical one: the mean over micro-batches of each one's GRPO loss). Returns the loss
    metrics aggregated the same way. Every rank runs as many micro-batches (empty ones included), so
    ``check_finite``'s collective stays in step."""
    if any(mb.loss_slices is None for mb in mbs):
        assign_loss_slices(mbs, loss_cfg.loss_agg, seq_mean_denominator=loss_cfg.seq_mean_denominator)
    sums: dict[str, float] = {}

    def add(k: str, v, w: float) -> None:
        sums[k] = sums.get(k, 0.0) + float(v) * w

    for i, mb in enumerate(mbs):
        if not mb.loss_slices:  # an empty micro-batch (token budgets balanced over DP): nothing to run
            if check_finite is not None:
                check_finite(torch.zeros(()), i)
            continue
        lp, ent = completion_logprobs(
            model, mb, vocab_size, temperature, chunk_tokens=chunk_tokens, with_entropy=True
        )
        total = 0.0
        same_dist = mb.rollout_logprobs is not None and temperature == sampling_temperature
        for sl in mb.loss_slices:
            rows, w, whole = sl.rows, sl.width, sl.whole
            mask = fit(mb.completion_mask, rows, w, whole)
            loss, m = grpo_loss(
                fit(lp, rows, w, whole), fit(mb.old_logprobs, rows, w, whole),
                fit(mb.ref_logprobs, rows, w, whole), fit(mb.advantages, rows, w, whole), mask, loss_cfg,
                rollout_logprobs=fit(mb.rollout_logprobs, rows, w, whole) if loss_cfg.tis_cap else None,
                loss_scale_tokens=sl.loss_scale_tokens,
            )  # fmt: skip
            total = total + loss * sl.loss_weight
            with torch.no_grad():
                add("loss", loss, sl.loss_weight)
                for k, v in m.items():
                    add(k, v, sl.loss_weight if k == "pg_loss" else sl.metric_weight)
                add("entropy", masked_mean(fit(ent, rows, w, whole), mask), sl.metric_weight)
                if same_dist:  # the generator sampled from the distribution scored here
                    diff = (fit(lp, rows, w, whole).detach() - fit(mb.rollout_logprobs, rows, w, whole)).abs()
                    add("logp_diff", masked_mean(diff, mask), sl.metric_weight)
        if check_finite is not None:
            check_finite(total.detach(), i)
        total.backward()
    return sums


@dataclass
class StepRecord:
    """What one GRPO step carries from phase to phase (this DP rank's share of the global batch)."""

    step: int
    batch: PromptBatch  # prompts (G copies each, group-contiguous) and gold answers
    rollout: GenerationOutput | None = None  # completions, generator logprobs, finished flags
    texts: list[str] = field(default_factory=list)  # decoded completions
    rewards: RewardResult | None = None  # this rank's rewards, per function and total
    all_rewards: torch.Tensor | None = None  # [global completions] total rewards over DP
    advantages: torch.Tensor | None = None  # [completions] this rank's slice
    micro_batches: list[MicroBatch] = field(default_factory=list)  # each with its advantages/logprobs
    loss_metrics: dict[str, float] = field(default_factory=dict)
    grad_norm: float = 0.0

    @property
    def completions(self) -> list[list[int]]:
        return self.rollout.completion_ids


class GRPOTrainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        par = cfg.parallel
        init_distributed(par.tensor_parallel, par.pipeline_parallel, cfg.seed, par.timeout_minutes)
        self.qcfg = resolve_model_config(cfg.model)
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        if len(self.tokenizer) > self.qcfg.vocab_size:
            raise ValueError(
                f"tokenizer {cfg.data.tokenizer} has {len(self.tokenizer)} tokens but the model vocab "
                f"({cfg.model.architecture_file}) is {self.qcfg.vocab_size}"
            )
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id

        # Data first: bad input fails before any model memory is spent.
        ro = cfg.rollout
        dataset = prepare_prompts(
            cfg.data,
            self.tokenizer,
            vocab_size=self.qcfg.vocab_size,
            max_completion_length=ro.max_completion_length,
            max_context=self.qcfg.max_position_embeddings,
        )
        self.sampler = PromptSampler(
            dataset, ro.prompts_per_step, ro.num_generations, dp_rank(), dp_size(), seed=cfg.data.shuffle_seed
        )

        activations = activation_options(cfg.parallel)
        self.memory_plan = self._memory_plan(activations)  # stops here when a GPU cannot hold a micro-batch
        dtype = parse_dtype(cfg.model.dtype)
        if cfg.model.hf_checkpoint:
            model, _ = load_model(
                cfg.model.hf_checkpoint,
                dtype,
                qcfg=self.qcfg,
                perform_initialization=True,
                activations=activations,
            )
        else:
            model = build_model(self.qcfg, dtype, activations=activations)
        # The KL reference: a frozen copy of the initial policy (a second model: Megatron modules
        # hold process groups, which deepcopy cannot copy).
        self.ref_model = None
        if cfg.loss.beta > 0:
            self.ref_model = build_model(self.qcfg, dtype, perform_initialization=False)
            self.ref_model.load_state_dict(model.state_dict())
            self.ref_model.eval().requires_grad_(False)
        self.model = wrap_ddp(model, cfg.optim.use_distributed_optimizer and torch.cuda.is_available())
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.max_steps * cfg.loss.num_iterations)

        if ro.backend == "vllm":
            from engine.rollout.vllm_generator import VLLMGenerator

            # vLLM's own "auto" turns a float32 config into bf16 on CPU (measured: |dlogp| ~1e-3):
            # the engine must run in the trainer's dtype for its logprobs to match.
            vcfg = cfg.vllm
            if vcfg.dtype == "auto":
                vcfg = dataclasses.replace(vcfg, dtype=HF_DTYPE_NAMES[parse_dtype(cfg.model.dtype)])
            self.generator = VLLMGenerator(self.qcfg, [self.eos_id], vcfg)
        else:
            self.generator = MegatronGenerator(
                self.model, self.qcfg.vocab_size, [self.eos_id], self.pad_id, ro.decode
            )
        self.weight_version = 0
        self.generator.sync_weights(self.model, self.weight_version)
        self.phases = PhaseScheduler(self.generator, TrainerOffload(self.model, self.optimizer, enabled=True))
        # Reward functions run once per DP replica (TP rank 0) and are broadcast to the TP peers.
        self.scorer = RewardScorer(cfg.rewards) if tp_rank() == 0 else None
        self.logger = MetricsLogger(cfg.logging.dir, cfg.max_steps)
        self.logger.info("memory plan:\n" + self.memory_plan.format())
        self.step = 0
        self.checkpointer = TrainCheckpointer(
            cfg.checkpoint.dir or Path(cfg.logging.dir) / "checkpoints",
            cfg.checkpoint.keep_last,
            hf_assets_from=cfg.model.hf_checkpoint or cfg.data.tokenizer,
            log=self.logger.info,
        )
        self.checkpointer.remove_stale_partials()  # a killed run's step_N.tmp-PID (10+ GB each at 1.5B)
        resume = self._resume_path(cfg.checkpoint.resume)
        if resume is not None:
            self.checkpointer.load(self, resume)
            self.logger.info(
                f"resumed from {resume} at step {self.step} (weight version {self.weight_version})"
            )

    # ------------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One GRPO step: the five phases below, in order, each inside the phase scheduler."""
        t_start = time.time()
        rec = StepRecord(step=self.step, batch=next(self.sampler))
        with self.phases.phase(Phase.ROLLOUT):
            self.rollout(rec)
        with self.phases.phase(Phase.REWARD):
            self.score(rec)
        with self.phases.phase(Phase.LOGPROBS):
            self.stored_logprobs(rec)
        with self.phases.phase(Phase.TRAIN):
            self.policy_update(rec)
        with self.phases.phase(Phase.SYNC):
            self.weight_version += 1
            self.phases.sync(self.model, self.weight_version)
        self.step += 1
        return self._step_metrics(rec, time.time() - t_start)

    @property
    def logprob_temperature(self) -> float:
        ro = self.cfg.rollout
        return ro.temperature if ro.scale_logprobs_by_temperature else 1.0

    def sampling(self, step: int) -> SamplingConfig:
        ro = self.cfg.rollout
        return SamplingConfig(
            ro.temperature, ro.top_p, ro.top_k, ro.max_completion_length, seed=step_seed(self.cfg.seed, step)
        )

    # 1. ROLLOUT: G completions per prompt from the generator (weights of version `weight_version`).
    def rollout(self, rec: StepRecord) -> None:
        G = self.cfg.rollout.num_generations
        rec.rollout = self.generator.generate(rec.batch.prompt_ids[::G], G, self.sampling(rec.step))
        if rec.rollout.weight_version != self.weight_version:
            raise TrainingError(
                f"step {rec.step}: rollout used weight version {rec.rollout.weight_version}, trainer is at "
                f"{self.weight_version} (stale generator weights)"
            )

    # 2. REWARD: score on TP rank 0, broadcast to TP peers; group advantages over the global batch
    #    (groups never straddle DP ranks; gathering gives exact global statistics).
    def score(self, rec: StepRecord) -> None:
        cfg, G = self.cfg, self.cfg.rollout.num_generations
        completions = rec.completions
        rec.texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        res = None
        if self.scorer is not None:
            res = self.scorer(
                rec.texts, rec.batch.answers, completion_lengths=[len(c) for c in completions], group_size=G
            )
        rec.rewards = broadcast_object(res, parallel_state.get_tensor_model_parallel_group())
        rec.all_rewards = all_gather_dp(torch.tensor(rec.rewards.total, dtype=torch.float32))
        valid = None  # rewards.on_failure=exclude: a failed completion leaves its group's statistics
        if cfg.rewards.on_failure == "exclude":
            valid = all_gather_dp(torch.tensor([not f for f in rec.rewards.failed], dtype=torch.uint8)).bool()
        all_adv = group_advantages(
            rec.all_rewards, G, scale_by_std=cfg.advantages.scale_rewards, baseline=cfg.advantages.baseline,
            valid=valid,
        )  # fmt: skip
        n = len(completions)
        rec.advantages = all_adv[dp_rank() * n : (dp_rank() + 1) * n]

    # 3. LOGPROBS: micro-batches (the training pass's, by batching.train_max_tokens), their loss
    #    masks and normalisation, then reference (frozen initial policy) and old (only when mu > 1:
    #    else ratio == 1) log-probabilities (passes of batching.logprob_max_tokens), stored on each
    #    training micro-batch with the generator's own.
    def stored_logprobs(self, rec: StepRecord) -> None:
        cfg, ro, bc = self.cfg, self.cfg.rollout, self.cfg.batching
        out = rec.rollout
        n = len(out.completion_ids)
        rec.micro_batches = mbs = self._micro_batches(rec, bc.train_max_tokens, "batching.train_max_tokens")
        keep = torch.ones(n, dtype=torch.bool)
        if ro.mask_truncated_completions:
            keep &= torch.tensor(out.finished, dtype=torch.bool)
        if cfg.rewards.on_failure == "exclude":  # a failed reward: out of the loss (advantage 0)
            keep &= ~torch.tensor(rec.rewards.failed, dtype=torch.bool)
        for mb in mbs:
            rows = row_indices(mb)
            mb.completion_mask &= keep[rows][:, None]
            mb.advantages = rec.advantages[rows]
            mb.rollout_logprobs = pad_rows([out.logprobs[i] for i in rows], mb.completion_mask.shape[1])
        assign_loss_slices(
            mbs, cfg.loss.loss_agg, bc.micro_batch_size, global_tokens=self._dp_sum, dp=dp_size(),
            seq_mean_denominator=cfg.loss.seq_mean_denominator,
        )  # fmt: skip
        passes = {"ref_logprobs": self.ref_model} if self.ref_model is not None else {}
        if cfg.loss.num_iterations > 1:
            passes["old_logprobs"] = self.model
        if not passes:
            return
        lp_mbs = mbs
        if bc.logprob_max_tokens != bc.train_max_tokens:
            lp_mbs = self._micro_batches(rec, bc.logprob_max_tokens, "batching.logprob_max_tokens")
        V, T = self.qcfg.vocab_size, self.logprob_temperature
        for name, model in passes.items():
            per_row: list[torch.Tensor | None] = [None] * n
            for lmb in lp_mbs:
                if not lmb.completion_mask.shape[0]:
                    continue  # an empty micro-batch
                with torch.no_grad():
                    lp = completion_logprobs(model, lmb, V, T, chunk_tokens=bc.logprob_chunk_tokens)[0]
                if lp_mbs is mbs:
                    setattr(lmb, name, lp)
                    continue
                for j, i in enumerate(row_indices(lmb)):
                    per_row[i] = lp[j]
            if lp_mbs is not mbs:
                for mb in mbs:
                    C = mb.completion_mask.shape[1]
                    rows = [per_row[i][:C] for i in row_indices(mb)]
                    setattr(mb, name, torch.stack([F.pad(r, (0, C - len(r))) for r in rows]))

    def _micro_batches(self, rec: StepRecord, max_tokens: int | None, key: str) -> list[MicroBatch]:
        """This rank's micro-batches under a token budget (``key``); as many on every DP rank."""
        bc, G = self.cfg.batching, self.cfg.rollout.num_generations
        return build_micro_batches(
            rec.batch.prompt_ids, rec.rollout.completion_ids, bc.micro_batch_size, self.pad_id, G,
            bc.shared_prefix, pack_sequences=bc.pack_sequences, max_tokens=max_tokens, budget_key=key,
            agree=lambda k: int(self._dp_max(k)),
        )  # fmt: skip

    def _memory_plan(self, activations: ActivationOptions):
        """The run's memory plan (``engine.batching.memory_plan``) against this GPU; on CPU logged only."""
        from engine.batching.memory_plan import plan_memory

        device_gib = None
        if torch.cuda.is_available():
            device_gib = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
        plan = plan_memory(self.cfg, self.qcfg, dp_size(), device_gib, activations)
        if plan.problems():
            raise TrainingError("the run does not fit in GPU memory:\n" + plan.format())
        return plan

    # 4. TRAIN: mu optimizer steps over the batch; each = all micro-batches' grads, DP all-reduce,
    #    clip, AdamW, LR schedule.
    def policy_update(self, rec: StepRecord) -> None:
        cfg = self.cfg
        mu = cfg.loss.num_iterations
        sums: dict[str, float] = {}
        for _ in range(mu):
            self.model.zero_grad_buffer()
            it = accumulate_policy_grads(
                self.model, rec.micro_batches, cfg.loss, self.qcfg.vocab_size, self.logprob_temperature,
                check_finite=self._check_finite, sampling_temperature=cfg.rollout.temperature,
                chunk_tokens=cfg.batching.logprob_chunk_tokens,
            )  # fmt: skip
            self.model.finish_grad_sync()
            stepped, gnorm = self.optimizer.step()
            if not stepped:
                raise TrainingError(f"step {rec.step}: non-finite gradient norm ({gnorm}); stopping")
            self.scheduler.step(increment=1)
            for k, v in it.items():
                sums[k] = sums.get(k, 0.0) + v / mu
        rec.loss_metrics, rec.grad_norm = sums, gnorm

    # 5. SYNC: in train_step (bump the weight version, hand the new weights to the generator).

    def _step_metrics(self, rec: StepRecord, step_s: float) -> dict[str, float]:
        """Per-rank means averaged over DP (values are identical on the TP ranks of a replica)."""
        out, sums, rewards = rec.rollout, rec.loss_metrics, rec.rewards
        n = len(out.completion_ids)
        lengths = [len(c) for c in out.completion_ids]
        gen_tokens = float(sum(lengths))
        train_tokens = float(sum(mb.attn.sum() for mb in rec.micro_batches))
        local = {
            **{f"loss/{k}": v for k, v in sums.items() if k not in ("entropy", "logp_diff")},
            "policy/entropy": sums["entropy"],
            **({"rollout/logp_diff_mean": sums["logp_diff"]} if "logp_diff" in sums else {}),
            **{f"reward/{k}/mean": sum(v) / len(v) for k, v in rewards.per_function.items()},
            "advantages/abs_mean": float(rec.advantages.abs().mean()),
            "completion/length_mean": gen_tokens / n,
            "completion/truncated_frac": 1.0 - sum(out.finished) / n,
            "reward/timeouts": float(rewards.num_timeouts),
            "reward/errors": float(rewards.num_errors),
        }
        metrics = self._dp_mean(local)
        if "rollout/logp_diff_mean" in metrics:
            # NeMo-RL's health metric: ~1.0 when generator and trainer agree (> 1.05: a bug).
            metrics["rollout/token_mult_prob_error"] = math.exp(metrics["rollout/logp_diff_mean"])
            limit = self.cfg.rollout.max_logprob_diff
            if limit is not None and metrics["rollout/logp_diff_mean"] > limit:
                raise TrainingError(
                    f"step {rec.step}: mean |logp_generator - logp_trainer| = "
                    f"{metrics['rollout/logp_diff_mean']:.3g} exceeds rollout.max_logprob_diff={limit} "
                    "(stale weights, a temperature/top-p mismatch or a mapping bug)"
                )
        ph = self.phases.seconds
        all_rewards = rec.all_rewards
        metrics.update(
            {
                "reward/mean": float(all_rewards.mean()),
                "reward/std": float(all_rewards.std()) if len(all_rewards) > 1 else 0.0,
                "completion/length_max": self._dp_max(max(lengths)),
                "optim/lr": float(self.optimizer.param_groups[0]["lr"]),
                "optim/grad_norm": rec.grad_norm,
                "perf/step_s": step_s,
                "perf/gen_tokens_per_s": self._dp_sum(gen_tokens) / max(ph["rollout"], 1e-9),
                "perf/train_tokens_per_s": self._dp_sum(train_tokens) / max(ph["train"], 1e-9),
                "perf/tokens_per_s": self._dp_sum(gen_tokens + train_tokens) / max(step_s, 1e-9),
                "weights/version": float(self.weight_version),
                **self.phases.metrics(),
            }
        )
        if self.cfg.logging.log_completions and self.logger.enabled:
            b = rec.batch
            for j in range(min(self.cfg.logging.log_completions, n)):
                self.logger.info(
                    f"  [{b.problems[j]!r} -> {rec.texts[j]!r} | gold {b.answers[j]!r} | r={rewards.total[j]:.2f}]"
                )
        return metrics

    # ------------------------------------------------------------------------------------------
    def train(self) -> list[dict[str, float]]:
        """Steps until ``max_steps``; checkpoints every ``save_every`` and at the end, then (when due)
        evaluates: the step's checkpoint is on disk before its evaluation starts, and a failed
        evaluation is logged and skipped (:meth:`evaluate_safely`). An exception in a training step
        (e.g. a non-finite loss) stops the run without saving: the last good checkpoint stays."""
        cfg = self.cfg
        history = []
        evals: dict[int, dict[str, float]] = {}  # step -> eval scalars, for the closing table
        start = self.step
        try:
            if cfg.eval.at_start and self.step == 0:
                evals[0] = self.evaluate_safely()
                self.logger.log_scalars(0, evals[0])
            while self.step < cfg.max_steps:
                metrics = self.train_step()
                every = cfg.checkpoint.save_every
                if (every and self.step % every == 0) or self.step == cfg.max_steps:
                    path = self.checkpointer.save(self)
                    self.logger.info(f"saved checkpoint {path}")
                if cfg.eval.due(self.step):
                    evals[self.step] = self.evaluate_safely()
                    metrics.update(evals[self.step])
                history.append(metrics)
                self.logger.log(self.step, metrics, self.step - start)
            if len(evals) > 1:
                self.logger.info(eval_progress_table(evals))
        finally:
            self.close()
        return history

    def evaluate_safely(self) -> dict[str, float]:
        """:meth:`evaluate`, where a failure costs neither a checkpoint nor the run: the failing rank
        prints its error, every rank learns that one failed (an all-reduce, so all skip together),
        ``eval/failed`` is 1 and training continues; the next due evaluation tries again. A failure
        that leaves a rank inside one of the evaluation's collectives cannot be agreed on: that run
        stops at the collective timeout (``parallel.timeout_minutes``), its checkpoint already saved."""
        err: Exception | None = None
        try:
            metrics = self.evaluate()
        except Exception as e:  # noqa: BLE001 - reported below; KeyboardInterrupt still stops the run
            err, metrics = e, {}
        if err is not None:
            print(
                f"[rank {dist.get_rank()}] evaluation at step {self.step} failed: {type(err).__name__}: {err}",
                file=sys.stderr,
                flush=True,
            )
        failed = all_reduce(torch.tensor([0.0 if err is None else 1.0]), dist.ReduceOp.MAX).item() > 0
        if failed:
            self.logger.info(f"evaluation at step {self.step} failed and was skipped; training continues")
            return {"eval/failed": 1.0}
        return {**metrics, "eval/failed": 0.0}

    def evaluate(self) -> dict[str, float]:
        """Benchmark pass@1 / avg@k with the current generator (collective)."""
        from engine.evaluation import run_periodic_eval

        return run_periodic_eval(
            self.generator, self.tokenizer, self.cfg.eval, self.step,
            max_context=self.qcfg.max_position_embeddings, log=self.logger.info,
        )  # fmt: skip

    def _resume_path(self, resume: str) -> Path | None:
        if not resume:
            return None
        if resume == "latest":
            return self.checkpointer.latest()
        p = Path(resume)
        if not p.is_dir():
            raise FileNotFoundError(f"checkpoint.resume={resume!r}: no such checkpoint dir")
        return p

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()
            self.scorer = None
        close = getattr(self.generator, "close", None)
        if close is not None:
            close()
        self.logger.close()

    # ---- helpers -----------------------------------------------------------------------------
    def _check_finite(self, loss: torch.Tensor, micro: int) -> None:
        """Stop every rank together (no rank left waiting in a collective) on a NaN/inf loss."""
        bad = all_reduce(torch.tensor([0.0 if math.isfinite(float(loss)) else 1.0]), dist.ReduceOp.MAX)
        if bad.item():
            raise TrainingError(
                f"step {self.step}: non-finite loss in micro-batch {micro} (rank {dist.get_rank()} saw "
                f"{float(loss)}); stopping without saving, the last good checkpoint is kept"
            )

    @staticmethod
    def _dp_mean(d: dict[str, float]) -> dict[str, float]:
        keys = sorted(d)
        t = torch.tensor([d[k] for k in keys], dtype=torch.float64)
        all_reduce_dp(t)
        return {k: float(v) / dp_size() for k, v in zip(keys, t, strict=True)}

    @staticmethod
    def _dp_sum(x: float) -> float:
        return float(all_reduce_dp(torch.tensor([x], dtype=torch.float64))[0])

    @staticmethod
    def _dp_max(x: float) -> float:
        return float(all_reduce_dp(torch.tensor([float(x)], dtype=torch.float64), op=dist.ReduceOp.MAX)[0])
