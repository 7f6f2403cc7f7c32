"""GRPO on Megatron-Core, one optimizer step top to bottom: ``GRPOTrainer.train_step``.

    ROLLOUT   sample G completions per prompt with the generator (built-in Megatron or vLLM)
    REWARD    score them (reward functions in a process pool on TP rank 0), gather over DP, and
              group-normalise: A = (r - mean_g) / (std_g + 1e-4)
    LOGPROBS  reference (frozen initial model) and old (only when mu > 1) log-probabilities
    TRAIN     per micro-batch: policy logprobs -> GRPO loss -> backward; DDP grad all-reduce,
              clip, AdamW step, LR schedule
    SYNC      bump the weight version and hand the new weights to the generator

Each phase runs inside ``engine.phases.PhaseScheduler``, which enforces the order and moves memory
between the trainer and a co-located generator. Loss normalisation (as open-rs / TRL at the pinned
commit): token-mean per micro-batch per rank, averaged over the micro-batches (loss / n_micro) and
over DP ranks (Megatron DDP averages grads).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.dot_product_attention import DotProductAttention

from engine.advantages import group_advantages
from engine.checkpointing import TrainCheckpointer
from engine.data import PromptBatch, PromptSampler, load_tokenizer, prepare_prompts
from engine.generator import GenerationOutput, MegatronGenerator, SamplingConfig
from engine.logger import MetricsLogger
from engine.logprobs import token_entropy, token_logprobs
from engine.loss import LossConfig, check_whole_groups, grpo_loss, masked_mean
from engine.optimizer import build_optimizer, build_scheduler
from engine.phases import Phase, PhaseScheduler, TrainerOffload
from engine.rewards import RewardScorer
from engine.train_config import TrainConfig
from models.qwen.config import HF_DTYPE_NAMES, QwenConfig, parse_dtype
from models.qwen.model import build_model, forward_logits, prefix_tree_attention_mask, unwrap
from parallel.collectives import all_gather_dp, all_reduce, all_reduce_dp, broadcast_object
from parallel.ddp import wrap_ddp
from parallel.distributed import dp_rank, dp_size, init_distributed, tp_rank


class TrainingError(RuntimeError):
    """A run-stopping problem (non-finite loss, stale rollout weights); the message says what and where."""


@dataclass
class MicroBatch:
    """One forward's rows. Unpacked (``group_size == 0``): rows [left-padded prompt | right-padded
    completion], completion tokens from column P. Packed (shared prefix, ``group_size == G``): one row
    per group, [left-padded prompt (P) | completion 1 (C) | ... | completion G (C)], each completion
    right-padded to C. ``completion_mask`` (and every logprob tensor) is [completions, C] in both."""

    input_ids: torch.Tensor  # [b, S]
    attn: torch.Tensor  # [b, S] True = real token
    completion_mask: torch.Tensor  # [completions, C] True = token in the loss (up to and including EOS)
    P: int
    rows: slice  # completion rows of the step's batch
    group_size: int = 0  # G when packed; 0 = one row per completion


def build_micro_batch(
    prompts: list[list[int]], completions: list[list[int]], rows: slice, pad_id: int
) -> MicroBatch:
    P = max(len(p) for p in prompts)
    C = max(1, max(len(c) for c in completions))
    ids = torch.full((len(prompts), P + C), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids[i, P - len(p) : P] = torch.tensor(p)
        ids[i, P : P + len(c)] = torch.tensor(c, dtype=torch.long)
        attn[i, P - len(p) : P + len(c)] = True
    return MicroBatch(ids, attn, attn[:, P:].clone(), P, rows)


def build_packed_micro_batch(
    prompts: list[list[int]], completions: list[list[int]], rows: slice, pad_id: int, group_size: int
) -> MicroBatch:
    """Shared-prefix packing: each run of ``group_size`` rows (one prompt, G completions) -> one row.

    P and C are the micro-batch's longest prompt and completion, as in :func:`build_micro_batch`, so
    the completion mask, and with it the token-mean loss, is the unpacked one.
    """
    G = group_size
    if len(prompts) % G:
        raise ValueError(f"{len(prompts)} rows do not split into whole groups of {G} (shared prefix)")
    P = max(len(p) for p in prompts)
    C = max(1, max(len(c) for c in completions))
    ids = torch.full((len(prompts) // G, P + G * C), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids, dtype=torch.bool)
    cmask = torch.zeros(len(prompts), C, dtype=torch.bool)
    for g in range(len(prompts) // G):
        p = prompts[g * G]
        if any(q != p for q in prompts[g * G : (g + 1) * G]):
            raise ValueError(f"rows {g * G}..{(g + 1) * G - 1} are not one group (their prompts differ)")
        ids[g, P - len(p) : P] = torch.tensor(p)
        attn[g, P - len(p) : P] = True
        for j, c in enumerate(completions[g * G : (g + 1) * G]):
            lo = P + j * C
            ids[g, lo : lo + len(c)] = torch.tensor(c, dtype=torch.long)
            attn[g, lo : lo + len(c)] = True
            cmask[g * G + j, : len(c)] = True
    return MicroBatch(ids, attn, cmask, P, rows, group_size=G)


def build_micro_batches(
    prompts: list[list[int]],
    completions: list[list[int]],
    micro_batch_size: int,
    pad_id: int,
    num_generations: int,
    shared_prefix: bool = False,
) -> list[MicroBatch]:
    """Consecutive micro-batches of ``micro_batch_size`` completions (the last may be shorter); with
    ``shared_prefix`` each holds whole groups, packed by :func:`build_packed_micro_batch`."""
    build = build_micro_batch
    if shared_prefix:
        check_whole_groups(micro_batch_size, num_generations)
        build = functools.partial(build_packed_micro_batch, group_size=num_generations)
    m = micro_batch_size
    return [
        build(prompts[s : s + m], completions[s : s + m], slice(s, s + m), pad_id)
        for s in range(0, len(completions), m)
    ]


def shared_prefix_layout(P: int, G: int, C: int) -> tuple[torch.Tensor, ...]:
    """(RoPE positions [S], segments [S], logit columns [G, C], target columns [G, C]) of the packed
    layout, S = P + G C.

    Slot j (0-based) covers columns P + jC .. P + (j+1)C - 1 with positions P .. P+C-1, where the
    unpacked row has them, so every attention score is the unpacked one. Completion token t of slot j
    (column P + jC + t) is predicted by the logits at column P + jC + t - 1, token 0 of every slot by
    the shared last prompt column P - 1.
    """
    t = torch.arange(C)
    positions = torch.cat([torch.arange(P), (P + t).repeat(G)])
    segments = torch.cat([torch.zeros(P, dtype=torch.long), torch.arange(1, G + 1).repeat_interleave(C)])
    targets = P + torch.arange(G)[:, None] * C + t[None, :]
    sources = targets - 1
    sources[:, 0] = P - 1
    return positions, segments, sources, targets


def completion_logprobs(
    model: torch.nn.Module, mb: MicroBatch, vocab_size: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each completion token [completions, C], its vocab-parallel logits [completions, C, V/TP])."""
    device = next(model.parameters()).device
    ids = mb.input_ids.to(device)
    if not mb.group_size:
        logits = forward_logits(model, ids, mb.attn.to(device))
        logits = logits[:, mb.P - 1 : -1]  # position t predicts token t + 1
        return token_logprobs(logits, ids[:, mb.P :], vocab_size, temperature).cpu(), logits
    core = type(unwrap(model).decoder.layers[0].self_attention.core_attention)
    if core is not DotProductAttention:
        # Packed rows need the explicit mask applied; only the local spec is verified to (TE was not
        # installable in CI or on the lent GPU), so refuse rather than risk slots seeing each other.
        raise NotImplementedError(f"loss.shared_prefix needs the local attention spec, model has {core}")
    G, C = mb.group_size, mb.completion_mask.shape[1]
    positions, segments, sources, targets = shared_prefix_layout(mb.P, G, C)
    mask = prefix_tree_attention_mask(mb.attn.to(device), segments)
    logits = forward_logits(model, ids, attn_mask=mask, positions=positions)
    logits = logits[:, sources.to(device)].flatten(0, 1)  # [groups * G, C, V/TP], unpacked row order
    tokens = ids[:, targets.to(device)].flatten(0, 1)
    return token_logprobs(logits, tokens, vocab_size, temperature).cpu(), logits


def accumulate_policy_grads(
    model: torch.nn.Module,
    mbs: list[MicroBatch],
    advantages: torch.Tensor,
    ref_lp: list[torch.Tensor] | None,
    old_lp: list[torch.Tensor] | None,
    rollout_lp: list[torch.Tensor] | None,
    loss_cfg: LossConfig,
    vocab_size: int,
    temperature: float = 1.0,
    check_finite=None,
    sampling_temperature: float | None = None,
) -> dict[str, float]:
    """Forward/backward every micro-batch; grads accumulate in DDP's buffers as the mean over
    micro-batches of each micro-batch's GRPO loss. Returns the loss metrics averaged the same way."""
    sums: dict[str, float] = {}
    for i, mb in enumerate(mbs):
        lp, logits = completion_logprobs(model, mb, vocab_size, temperature)
        loss, m = grpo_loss(
            lp, old_lp[i] if old_lp else None, ref_lp[i] if ref_lp else None,
            advantages[mb.rows], mb.completion_mask, loss_cfg,
            rollout_logprobs=rollout_lp[i] if (loss_cfg.tis_cap and rollout_lp) else None,
        )  # fmt: skip
        if check_finite is not None:
            check_finite(loss, i)
        (loss / len(mbs)).backward()
        mask = mb.completion_mask
        with torch.no_grad():
            extra = {
                "loss": loss.detach(),
                "entropy": masked_mean(token_entropy(logits.detach(), vocab_size, temperature).cpu(), mask),
            }
            if rollout_lp is not None and temperature == sampling_temperature:  # same distribution scored
                extra["logp_diff"] = masked_mean((lp.detach() - rollout_lp[i]).abs(), mask)
        for k, v in {**m, **extra}.items():
            sums[k] = sums.get(k, 0.0) + float(v) / len(mbs)
    return sums


class GRPOTrainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        init_distributed(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, seed=cfg.seed)
        self.qcfg = QwenConfig.from_file(cfg.model.config or cfg.model.hf_checkpoint)
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        if len(self.tokenizer) > self.qcfg.vocab_size:
            raise ValueError(
                f"tokenizer {cfg.data.tokenizer} has {len(self.tokenizer)} tokens but the model vocab "
                f"({cfg.model.config or cfg.model.hf_checkpoint}) is {self.qcfg.vocab_size}"
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

        dtype = parse_dtype(cfg.model.dtype)
        model = build_model(self.qcfg, dtype)
        if cfg.model.hf_checkpoint:
            from models.qwen.checkpoint import SafetensorsReader
            from models.qwen.model import load_hf_weights

            load_hf_weights(model, self.qcfg, SafetensorsReader(cfg.model.hf_checkpoint))
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
            from engine.vllm_generator import VLLMGenerator

            # vLLM's own "auto" turns a float32 config into bf16 on CPU (measured: |dlogp| ~1e-3):
            # the engine must run in the trainer's dtype for its logprobs to match.
            vcfg = cfg.vllm
            if vcfg.dtype == "auto":
                vcfg = dataclasses.replace(vcfg, dtype=HF_DTYPE_NAMES[parse_dtype(cfg.model.dtype)])
            self.generator = VLLMGenerator(self.qcfg, [self.eos_id], vcfg)
        else:
            self.generator = MegatronGenerator(self.model, self.qcfg.vocab_size, [self.eos_id], self.pad_id)
        self.weight_version = 0
        self.generator.sync_weights(self.model, self.weight_version)
        self.phases = PhaseScheduler(self.generator, TrainerOffload(self.model, self.optimizer, enabled=True))
        # Reward functions run once per DP replica (TP rank 0) and are broadcast to the TP peers.
        self.scorer = RewardScorer(cfg.rewards) if tp_rank() == 0 else None
        self.logger = MetricsLogger(cfg.logging.dir, cfg.max_steps)
        self.step = 0
        self.checkpointer = TrainCheckpointer(
            cfg.checkpoint.dir or Path(cfg.logging.dir) / "checkpoints",
            cfg.checkpoint.keep_last,
            hf_assets_from=cfg.model.hf_checkpoint or cfg.data.tokenizer,
        )
        resume = self._resume_path(cfg.checkpoint.resume)
        if resume is not None:
            self.checkpointer.load(self, resume)
            self.logger.info(
                f"resumed from {resume} at step {self.step} (weight version {self.weight_version})"
            )

    # ------------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        cfg, ro = self.cfg, self.cfg.rollout
        G = ro.num_generations
        T = ro.temperature if ro.scale_logprobs_by_temperature else 1.0  # trainer's logprob temperature
        t_start = time.time()
        batch: PromptBatch = next(self.sampler)

        # 1. ROLLOUT: G completions per prompt from the generator (weights of version `weight_version`).
        with self.phases.phase(Phase.ROLLOUT):
            sampling = SamplingConfig(
                ro.temperature, ro.top_p, ro.top_k, ro.max_completion_length, seed=cfg.seed * 7919 + self.step
            )
            out: GenerationOutput = self.generator.generate(batch.prompt_ids[::G], G, sampling)
            if out.weight_version != self.weight_version:
                raise TrainingError(
                    f"step {self.step}: rollout used weight version {out.weight_version}, trainer is at "
                    f"{self.weight_version} (stale generator weights)"
                )
            completions = out.completion_ids
            n = len(completions)

        # 2. REWARD: score on TP rank 0, broadcast to TP peers; group advantages over the global batch
        #    (groups never straddle DP ranks; gathering gives exact global statistics).
        with self.phases.phase(Phase.REWARD):
            texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
            lengths = [len(c) for c in completions]
            scored = None
            if self.scorer is not None:
                res = self.scorer(texts, batch.answers, completion_lengths=lengths, group_size=G)
                scored = (res.total, res.per_function, res.num_timeouts, res.num_errors)
            scored = broadcast_object(scored, parallel_state.get_tensor_model_parallel_group())
            rewards = torch.tensor(scored[0], dtype=torch.float32)
            all_rewards = all_gather_dp(rewards)
            all_adv = group_advantages(
                all_rewards, G, scale_by_std=cfg.loss.scale_rewards, baseline=cfg.loss.advantage_baseline
            )
            advantages = all_adv[dp_rank() * n : (dp_rank() + 1) * n]

        # 3. LOGPROBS: reference (frozen initial policy) and old (only when mu > 1: else ratio == 1).
        with self.phases.phase(Phase.LOGPROBS):
            mbs = build_micro_batches(
                batch.prompt_ids, completions, ro.micro_batch_size, self.pad_id, G, cfg.loss.shared_prefix
            )
            if ro.mask_truncated_completions:
                for mb in mbs:
                    mb.completion_mask &= torch.tensor(out.finished[mb.rows])[:, None]
            V = self.qcfg.vocab_size
            with torch.no_grad():
                ref_lp = (
                    [completion_logprobs(self.ref_model, mb, V, T)[0] for mb in mbs]
                    if self.ref_model
                    else None
                )
                old_lp = (
                    [completion_logprobs(self.model, mb, V, T)[0] for mb in mbs]
                    if cfg.loss.num_iterations > 1
                    else None
                )
            rollout_lp = [self._pad_rows(out.logprobs[mb.rows], mb.completion_mask.shape[1]) for mb in mbs]

        # 4. TRAIN: mu optimizer steps over the batch; each = all micro-batches' grads, DP all-reduce,
        #    clip, AdamW, LR schedule.
        with self.phases.phase(Phase.TRAIN):
            sums: dict[str, float] = {}
            for _ in range(cfg.loss.num_iterations):
                self.model.zero_grad_buffer()
                it = accumulate_policy_grads(
                    self.model, mbs, advantages, ref_lp, old_lp, rollout_lp, cfg.loss, V, T,
                    check_finite=self._check_finite, sampling_temperature=ro.temperature,
                )  # fmt: skip
                self.model.finish_grad_sync()
                stepped, gnorm = self.optimizer.step()
                if not stepped:
                    raise TrainingError(f"step {self.step}: non-finite gradient norm ({gnorm}); stopping")
                self.scheduler.step(increment=1)
                for k, v in it.items():
                    sums[k] = sums.get(k, 0.0) + v / cfg.loss.num_iterations

        # 5. SYNC: the generator receives the new weights (version + 1) before the next rollout.
        with self.phases.phase(Phase.SYNC):
            self.weight_version += 1
            self.phases.sync(self.model, self.weight_version)
        t_end = time.time()

        self.step += 1
        metrics = self._step_metrics(
            batch, out, texts, scored, all_rewards, advantages, sums, gnorm, mbs, t_end - t_start
        )
        return metrics

    def _step_metrics(
        self, batch, out, texts, scored, all_rewards, advantages, sums, gnorm, mbs, step_s
    ) -> dict[str, float]:
        """Per-rank means averaged over DP (values are identical on the TP ranks of a replica)."""
        n = len(out.completion_ids)
        lengths = [len(c) for c in out.completion_ids]
        gen_tokens = float(sum(lengths))
        train_tokens = float(sum(mb.attn.sum() for mb in mbs))
        local = {
            **{f"loss/{k}": v for k, v in sums.items() if k not in ("entropy", "logp_diff")},
            "policy/entropy": sums["entropy"],
            **({"rollout/logp_diff_mean": sums["logp_diff"]} if "logp_diff" in sums else {}),
            **{f"reward/{k}/mean": sum(v) / len(v) for k, v in scored[1].items()},
            "advantages/abs_mean": float(advantages.abs().mean()),
            "completion/length_mean": gen_tokens / n,
            "completion/truncated_frac": 1.0 - sum(out.finished) / n,
            "reward/timeouts": float(scored[2]),
            "reward/errors": float(scored[3]),
        }
        metrics = self._dp_mean(local)
        if "rollout/logp_diff_mean" in metrics:
            # NeMo-RL's health metric: ~1.0 when generator and trainer agree (> 1.05: a bug).
            metrics["rollout/token_mult_prob_error"] = math.exp(metrics["rollout/logp_diff_mean"])
            limit = self.cfg.rollout.max_logprob_diff
            if limit is not None and metrics["rollout/logp_diff_mean"] > limit:
                raise TrainingError(
                    f"step {self.step}: mean |logp_generator - logp_trainer| = "
                    f"{metrics['rollout/logp_diff_mean']:.3g} exceeds rollout.max_logprob_diff={limit} "
                    "(stale weights, a temperature/top-p mismatch or a mapping bug)"
                )
        ph = self.phases.seconds
        metrics.update(
            {
                "reward/mean": float(all_rewards.mean()),
                "reward/std": float(all_rewards.std()) if len(all_rewards) > 1 else 0.0,
                "completion/length_max": self._dp_max(max(lengths)),
                "optim/lr": float(self.optimizer.param_groups[0]["lr"]),
                "optim/grad_norm": gnorm,
                "perf/step_s": step_s,
                "perf/gen_tokens_per_s": self._dp_sum(gen_tokens) / max(ph["rollout"], 1e-9),
                "perf/train_tokens_per_s": self._dp_sum(train_tokens) / max(ph["train"], 1e-9),
                "perf/tokens_per_s": self._dp_sum(gen_tokens + train_tokens) / max(step_s, 1e-9),
                "weights/version": float(self.weight_version),
                **self.phases.metrics(),
            }
        )
        if self.cfg.logging.log_completions and self.logger.enabled:
            rewards = scored[0]
            for j in range(min(self.cfg.logging.log_completions, n)):
                self.logger.info(
                    f"  [{batch.problems[j]!r} -> {texts[j]!r} | gold {batch.answers[j]!r} | r={rewards[j]:.2f}]"
                )
        return metrics

    # ------------------------------------------------------------------------------------------
    def train(self) -> list[dict[str, float]]:
        """Steps until ``max_steps``; checkpoints every ``save_every`` and at the end. An exception
        (e.g. a non-finite loss) stops the run without saving: the last good checkpoint stays."""
        cfg = self.cfg
        history = []
        start = self.step
        try:
            if cfg.eval.at_start and self.step == 0:
                self.logger.log_scalars(0, self.evaluate())
            while self.step < cfg.max_steps:
                metrics = self.train_step()
                if cfg.eval.due(self.step):
                    metrics.update(self.evaluate())
                history.append(metrics)
                self.logger.log(self.step, metrics, self.step - start)
                every = cfg.checkpoint.save_every
                if (every and self.step % every == 0) or self.step == cfg.max_steps:
                    path = self.checkpointer.save(self)
                    self.logger.info(f"saved checkpoint {path}")
        finally:
            self.close()
        return history

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
    def _pad_rows(rows: list[list[float]], width: int) -> torch.Tensor:
        t = torch.zeros(len(rows), width)
        for i, r in enumerate(rows):
            t[i, : len(r)] = torch.tensor(r)
        return t

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
