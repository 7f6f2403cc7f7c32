"""vLLM rollout backend: an in-process ``vllm.LLM`` co-located with the Megatron trainer.

Placement: one TP=1 engine on EVERY rank (default)
    Each rank holds one engine with the full (TP-gathered) weights, and the prompts of a DP
    replica are split over the replica's TP ranks; the results are all-gathered over the TP group,
    so every TP rank returns the whole replica's completions (as ``MegatronGenerator`` does).
    Why not one engine per DP replica on TP rank 0 only: an in-process engine joins the *existing*
    ``torch.distributed`` world and creates its groups with ``new_group`` over every rank, which is
    collective — a rank that builds no engine leaves the others hanging (measured: a rank-0-only
    build hangs at engine start). Every rank therefore builds one, and rather than leave the TP
    peers idle they generate too: for the 1.5B model (3.1 GiB of bf16 weights) a full copy per
    GPU is cheap, TP=1 decoding has no per-layer all-reduce, and with TP2 x DP2 all four GPUs
    generate. ``tensor_parallel_size`` equal to the Megatron TP size is the other choice (vLLM TP
    over the same ranks, every TP rank gets the same prompts): GPU only, untested here — vLLM's
    CPU TP>1 hung in its shared-memory all-reduce on this 2-core machine.
    The engines run with ``distributed_executor_backend="external_launcher"`` (vLLM's torchrun
    mode, used by verl): each engine lives in its own rank's process, on that rank's device
    (``LOCAL_RANK``), and every rank of the world must construct its generator at the same point of
    the program. vLLM's in-process executor ``"uni"`` would put every rank's engine on GPU 0.

Weight sync (``sync_weights``): the Megatron TP shards are all-gathered over TP one *bucket* at a
time (one collective per bucket of ``bucket_mb``, cast to the engine dtype first), mapped to HF
names and layout by the one mapping (``models.qwen.hf_mapping``: QKV and gate/up split, vocab
padding stripped) and streamed into the engine in place, with no restart: one
``collective_rpc("reload_weights", weights_iterator=..., is_checkpoint_format=True)`` call per
sync consumes a lazy iterator over the buckets, so at most one bucket is resident beyond the model.
vLLM's layer-wise reload must see every tensor of a layer within one call (prime-rl #3175): one
call per bucket would corrupt a fused layer whose q/k/v or weight/bias straddle two buckets.
``model.load_weights`` is not used: it fails on the CPU backend after start-up (repacked linears
have no ``weight_loader``) and bypasses the layer-wise processing on GPU. Every TP rank of a
replica consumes its own iterator in lock step; any failure on any rank is agreed on over the TP
group before the next collective, so all ranks raise ``WeightSyncError`` together instead of one
rank hanging in a gather.

Weight versions, two sides: the generator records the version the trainer asked for, and the
engine carries its own label (``LLMEngine.set_weight_version``); every completion reports the
label of the weights that produced each of its tokens (``CompletionOutput.weight_versions``).
``generate`` raises ``StaleWeightsError`` unless the engine label, every completion's label and the
requested/expected version agree: a rollout from stale, half-loaded (failed sync) or discarded
(level-2 sleep) weights is an error, never a silent run (trl #5312, vllm #29341).

Sleep (``sleep`` / ``wake_up``): ``sleep()`` releases the engine's memory at ``sleep_level``
(1: weights to host memory, KV cache dropped; 2: both dropped, so the weights must be re-synced).
The co-located order is the PhaseScheduler's: empty the allocator cache, ``wake_up(["weights"])``,
``sync_weights``, ``wake_up(["kv_cache"])`` (NeMo-RL #191, verl #6912); ``sync_weights`` wakes the
weights itself if the caller did not. On CPU vLLM rejects ``enable_sleep_mode`` and its
sleep/wake calls are logged no-ops: only the call sequence is exercised there.

Logprobs: the engine runs with ``logprobs_mode="processed_logprobs"``: log p of the sampled token
under the temperature-scaled distribution AFTER top-k/top-p, i.e. renormalised over the nucleus.
With top_p = 1 and top_k = 0 (the open-rs recipe) that is exactly the trainer's convention (the
full temperature-scaled distribution, ``engine.rollout.sampling.sample_next``); with truncation it is
biased (trl #6789), so ``generate`` refuses top_p < 1 / top_k > 0 unless
``allow_renormalized_logprobs`` is set, or the caller needs no logprobs (``SamplingConfig.logprobs =
False``: evaluation, whose open-rs sampling uses top_p 0.95; none are then requested or returned).
Greedy (T=0) reports the T=1 logprob, as the built-in does. vLLM's default ``raw_logprobs`` would
ignore the temperature (trl #4159).

Standalone (``VLLMGenerator.from_hf_dir``, used by ``tools/evaluate.py --backend vllm``): the same
class over an engine of its own, outside any Megatron world (vLLM's own executor and TP), serving
the weights of an HF dir as weight version 0; ``sync_weights`` is refused there.

Sampling seeds: each prompt gets its own vLLM seed, a hash of (sampling.seed, DP rank, the
prompt's index in the replica); its n samples use seed + j (vLLM's child seeds). One seed for all
prompts would give every prompt the same noise (measured: near-identical samples across prompts).
The draw does not depend on how prompts are split over TP ranks.

What differs between the CPU and GPU builds is in ``_platform_engine_kwargs`` (sleep mode, KV cache
sizing, eager mode, vLLM TP); the weight-loading API (and its recovery after a failed load) is in
``_engine_load_weights`` / ``_engine_after_failed_load``. The rest is the same code on both.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from engine.rollout.base import GenerationOutput, SamplingConfig
from engine.seeds import derive_seed
from engine.train_config import VLLMConfig
from engine.weight_sync import HFWeightStream, WeightSyncError
from models.qwen.config import QwenConfig

log = logging.getLogger(__name__)

_INVALID = "invalid"  # engine label while no complete set of weights is loaded
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class StaleWeightsError(RuntimeError):
    """A rollout was requested from weights other than the ones the trainer expects."""


# ---- what differs between platforms / vLLM versions: only here ----------------------------------
def _platform_engine_kwargs(cfg: VLLMConfig, on_cpu: bool, megatron_tp: int) -> dict[str, Any]:
    """Engine arguments that depend on the platform."""
    if cfg.tensor_parallel_size not in (1, megatron_tp):
        raise ValueError(
            f"vllm.tensor_parallel_size={cfg.tensor_parallel_size}: must be 1 (an engine per rank) or the "
            f"Megatron tensor-parallel size {megatron_tp}"
        )
    if on_cpu:
        if cfg.tensor_parallel_size > 1:
            raise NotImplementedError(
                "vllm.tensor_parallel_size > 1 is GPU only: vLLM's CPU tensor parallelism hangs in its "
                "shared-memory all-reduce when co-located; use tensor_parallel_size=1"
            )
        # CPU: sleep mode is rejected ("not supported on current platform") and sleep/wake are logged
        # no-ops; gpu_memory_utilization would reserve that fraction of host RAM, so size the KV cache
        # explicitly; torch.compile on CPU costs minutes at start-up.
        return dict(
            enable_sleep_mode=False,
            kv_cache_memory_bytes=cfg.kv_cache_memory_bytes or int(cfg.cpu_kv_cache_mb * 2**20),
            enforce_eager=True,
        )
    return dict(
        enable_sleep_mode=cfg.enable_sleep_mode,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        kv_cache_memory_bytes=cfg.kv_cache_memory_bytes,
        enforce_eager=cfg.enforce_eager,
    )


def _engine_load_weights(llm: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Load HF-named full tensors into the engine in place (the one weight-loading API call).

    ``reload_weights`` (vLLM >= 0.2x, GPU and CPU builds alike) runs the model's own
    ``load_weights`` inside vLLM's layer-wise reload, which restores the checkpoint layout first and
    re-runs the kernel-format processing (CPU weight repacking, quantisation) afterwards. Older vLLM
    without it: ``load_weights`` on the model directly (what TRL/verl did; GPU, unquantised only).
    """
    it = iter(weights)
    try:
        llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=it, is_checkpoint_format=True))
    except (NotImplementedError, AttributeError) as e:  # the worker has no reload_weights
        if "reload_weights" not in str(e):
            raise
        llm.apply_model(lambda model: model.load_weights(it))


def _engine_after_failed_load(llm: Any) -> None:
    """After a load that raised part-way: finish vLLM's layer-wise reload, so that every layer holds
    kernel-format tensors again (old weights where nothing arrived). Without it the next reload
    fails (measured on CPU: ``'Parameter' object has no attribute 'weight_loader'``). The weights are
    a mix of versions afterwards: the version guard keeps them unused until a sync succeeds."""

    def finalize(worker: Any) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        finalize_layerwise_reload(worker.model_runner.get_model(), worker.vllm_config.model_config)

    try:
        llm.collective_rpc(finalize)
    except Exception as e:  # noqa: BLE001 - best effort; the sync already failed
        log.warning("could not finish vLLM's interrupted layer-wise reload (%s: %s)", type(e).__name__, e)


# ---- the generator -----------------------------------------------------------------------------
def _split(n: int, parts: int) -> list[range]:
    """``range(n)`` in ``parts`` contiguous chunks whose sizes differ by at most one."""
    q, r = divmod(n, parts)
    out, lo = [], 0
    for i in range(parts):
        hi = lo + q + (1 if i < r else 0)
        out.append(range(lo, hi))
        lo = hi
    return out


class VLLMGenerator:
    """The ``Generator`` protocol over a co-located in-process vLLM engine (see the module doc)."""

    def __init__(
        self,
        qcfg: QwenConfig,
        eos_token_ids: list[int],
        cfg: VLLMConfig | None = None,
        model_dir: str | os.PathLike | None = None,
        *,
        standalone: bool = False,
    ) -> None:
        """Co-located (default): one engine per rank of the Megatron world, weights from ``sync_weights``.
        ``standalone``: one engine of its own (vLLM's executor and TP, ``cfg.tensor_parallel_size``) over
        the weights in ``model_dir``, served as version 0; see :meth:`from_hf_dir`."""
        self.standalone = standalone
        if standalone:
            if model_dir is None:
                raise ValueError("a standalone VLLMGenerator serves the weights of model_dir: give one")
            self.tp_group, self.tp_size, self.tp_rank, self.dp_rank = None, 1, 0, 0
        else:
            if not dist.is_initialized() or not parallel_state.model_parallel_is_initialized():
                raise RuntimeError(
                    "VLLMGenerator needs torch.distributed and Megatron parallel_state (init_distributed)"
                )
            self.tp_group = parallel_state.get_tensor_model_parallel_group()
            self.tp_size = dist.get_world_size(self.tp_group)
            self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
            self.dp_rank = parallel_state.get_data_parallel_rank()
        self.qcfg = qcfg
        self.cfg = cfg or VLLMConfig()
        self.eos = sorted(set(eos_token_ids))
        self.weight_version: int | None = None  # version the engine holds (None: no valid weights)
        self.target_version: int | None = None  # last version the trainer synced
        self.asleep: set[str] = set()  # released allocations: "weights", "kv_cache"
        self.stats: dict[str, float] = {}

        if not standalone:
            # external_launcher reads the torchrun environment; a single process (no torchrun) has none.
            os.environ.setdefault("RANK", str(dist.get_rank()))
            os.environ.setdefault("LOCAL_RANK", str(dist.get_rank() % max(torch.cuda.device_count(), 1)))
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine
        from vllm import LLM
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        self._tmp = None
        if model_dir is None:  # config only: vLLM's dummy loader needs no weights on disk
            self._tmp = tempfile.TemporaryDirectory(prefix="mcore_grpo_vllm_")
            with open(os.path.join(self._tmp.name, "config.json"), "w") as f:
                json.dump(qcfg.to_hf_dict(), f)
            model_dir = self._tmp.name
        self.model_dir = str(model_dir)
        c = self.cfg
        kwargs = dict(
            model=self.model_dir,
            skip_tokenizer_init=c.skip_tokenizer_init,
            load_format=c.load_format,
            dtype=c.dtype,
            seed=c.seed,
            max_model_len=c.max_model_len,
            tensor_parallel_size=c.tensor_parallel_size,
            # co-located: each rank's engine in its own process of the torchrun world; standalone: vLLM's own
            **({} if standalone else {"distributed_executor_backend": "external_launcher"}),
            logprobs_mode="processed_logprobs",
            generation_config="vllm",  # no sampling defaults or extra stop ids from generation_config.json
            enable_prefix_caching=c.enable_prefix_caching,
            **({"max_num_seqs": c.max_num_seqs} if c.max_num_seqs else {}),
            **_platform_engine_kwargs(c, self.on_cpu, c.tensor_parallel_size if standalone else self.tp_size),
        )
        kwargs.update(c.extra_engine_kwargs)
        t0 = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.stats["vllm/build_s"] = time.perf_counter() - t0
        mc = self.llm.llm_engine.model_config
        self.max_model_len = int(mc.max_model_len)
        self.engine_dtype: torch.dtype = mc.dtype
        self.sleep_mode = bool(c.enable_sleep_mode)  # requested; CPU calls are real vLLM no-ops
        if standalone:  # the weights on disk are the only version this engine will ever serve
            self.weight_version = self.target_version = 0
            self._set_engine_label("0")
        else:
            self._set_engine_label(_INVALID if c.load_format == "dummy" else "initial")

    @classmethod
    def from_hf_dir(
        cls, hf_dir: str | os.PathLike, eos_token_ids: list[int], cfg: VLLMConfig | None = None
    ) -> VLLMGenerator:
        """A standalone engine over the weights of an HF safetensors dir, served as weight version 0
        (``tools/evaluate.py --backend vllm``): no Megatron state needed, vLLM's own TP
        (``cfg.tensor_parallel_size``), no sleep mode, ``sync_weights`` refused."""
        cfg = dataclasses.replace(cfg or VLLMConfig(), load_format="auto", enable_sleep_mode=False)
        return cls(QwenConfig.from_file(hf_dir), eos_token_ids, cfg, model_dir=hf_dir, standalone=True)

    # ---- versions --------------------------------------------------------------------------
    def _set_engine_label(self, label: str) -> None:
        setter = getattr(self.llm.llm_engine, "set_weight_version", None)
        self._label = label
        if setter is not None:
            setter(label)

    def _engine_label(self) -> str:
        getter = getattr(self.llm.llm_engine, "get_weight_version", None)
        return getter() if getter is not None else self._label

    def _check_ready(self, expected: int | None) -> int:
        if expected is None:
            expected = self.target_version
        if self.asleep:
            raise StaleWeightsError(
                f"vLLM engine is asleep ({sorted(self.asleep)} released): "
                "sync_weights / wake_up(tags=...) first"
            )
        label = self._engine_label()
        if expected is None:
            raise StaleWeightsError(
                "no weights synced to the vLLM engine yet: call sync_weights(model, version) first"
            )
        if self.weight_version != expected or label != str(expected):
            raise StaleWeightsError(
                f"vLLM engine holds weight version {self.weight_version} (engine label {label!r}), the "
                f"trainer expects {expected}: sync_weights(model, {expected}) must succeed before generating"
            )
        return expected

    # ---- Generator protocol ------------------------------------------------------------------
    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module, version: int) -> None:
        """Stream the trainer's weights into the engine in place and record ``version`` (all TP ranks)."""
        if self.standalone:
            raise NotImplementedError(f"this vLLM engine serves the fixed weights of {self.model_dir}")
        t0 = time.perf_counter()
        self.target_version = version
        self.weight_version = None
        self._set_engine_label(_INVALID)
        if "weights" in self.asleep:
            self._wake(["weights"])
        stream = HFWeightStream(model, self.qcfg, int(self.cfg.bucket_mb * 2**20), self.engine_dtype)
        err: BaseException | None = None
        try:
            _engine_load_weights(self.llm, stream)
            if not stream.drain():
                raise WeightSyncError("the engine stopped reading weights before the end of the stream")
        except Exception as e:  # noqa: BLE001 - agreed on below, then re-raised on every rank
            err = e
            stream.abort()
            _engine_after_failed_load(self.llm)
        ok = self._agree_tp(err is None)
        if not ok:
            own = err is not None and not isinstance(err, WeightSyncError)
            why = (
                f"rank {dist.get_rank()}: {type(err).__name__}: {err}" if own else "a TP peer (see its error)"
            )
            raise WeightSyncError(
                f"weight sync to version {version} failed on {why}; the engine holds no valid weights until "
                "a sync succeeds"
            ) from err
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self._set_engine_label(str(version))
        self.weight_version = version
        dt = time.perf_counter() - t0
        self.stats.update(
            {
                "vllm/sync_s": dt,
                "vllm/sync_bytes": float(stream.bytes),
                "vllm/sync_buckets": float(len(stream.buckets)),
                "vllm/sync_gbps": stream.bytes / max(dt, 1e-9) / 1e9,
            }
        )

    @torch.no_grad()
    def generate(
        self, prompt_ids: list[list[int]], n: int, sampling: SamplingConfig, weight_version: int | None = None
    ) -> GenerationOutput:
        """``n`` completions per prompt (grouped per prompt), from weights of ``weight_version``
        (default: the last version passed to ``sync_weights``); identical on every TP rank."""
        from vllm import SamplingParams

        version = self._check_ready(weight_version)
        truncated = sampling.top_p < 1.0 or sampling.top_k > 0
        if sampling.logprobs and truncated and not self.cfg.allow_renormalized_logprobs:
            raise ValueError(
                f"top_p={sampling.top_p} / top_k={sampling.top_k}: vLLM's sampling logprobs are renormalised "
                "over the top-p/top-k set, not the full distribution the trainer scores (trl #6789); set "
                "vllm.allow_renormalized_logprobs=true to accept that (evaluation, which needs no "
                "logprobs, sets SamplingConfig.logprobs=false instead)"
            )
        longest = max((len(p) for p in prompt_ids), default=0)
        if longest + sampling.max_new_tokens > self.max_model_len:
            raise ValueError(
                f"prompt length {longest} + max_new_tokens {sampling.max_new_tokens} exceeds the engine's "
                f"max_model_len {self.max_model_len} (vllm.max_model_len)"
            )
        t0 = time.perf_counter()
        split = self.cfg.tensor_parallel_size == 1 and self.tp_size > 1
        mine = _split(len(prompt_ids), self.tp_size)[self.tp_rank] if split else range(len(prompt_ids))
        greedy = sampling.temperature == 0
        requests, params = [], []
        for i in mine:
            seed = derive_seed(sampling.seed, self.dp_rank, i)
            # vLLM needs n=1 for greedy: n identical requests instead.
            for j in range(n if greedy else 1):
                requests.append({"prompt_token_ids": list(prompt_ids[i])})
                params.append(
                    SamplingParams(
                        n=1 if greedy else n,
                        temperature=sampling.temperature,
                        top_p=sampling.top_p,
                        top_k=sampling.top_k,
                        max_tokens=sampling.max_new_tokens,
                        logprobs=0 if sampling.logprobs else None,  # the sampled token's logprob only
                        seed=seed + j,
                        stop_token_ids=self.eos,
                        detokenize=False,
                    )
                )
        outs = self.llm.generate(requests, params, use_tqdm=False) if requests else []
        ids: list[list[int]] = []
        lps: list[list[float]] = []
        fin: list[bool] = []
        for out in outs:
            for c in sorted(out.outputs, key=lambda c: c.index):
                self._check_spans(c, version)
                toks = list(c.token_ids)
                ids.append(toks)
                if sampling.logprobs:
                    lps.append([float(d[t].logprob) for d, t in zip(c.logprobs, toks, strict=True)])
                else:
                    lps.append([])
                fin.append(c.finish_reason == "stop")
        if split:
            parts: list[Any] = [None] * self.tp_size
            dist.all_gather_object(parts, (ids, lps, fin), group=self.tp_group)
            ids = [x for p in parts for x in p[0]]
            lps = [x for p in parts for x in p[1]]
            fin = [x for p in parts for x in p[2]]
        if len(ids) != len(prompt_ids) * n:
            raise RuntimeError(f"vLLM returned {len(ids)} completions for {len(prompt_ids)} prompts x {n}")
        dt = time.perf_counter() - t0
        tokens = float(sum(len(x) for x in ids))
        stats = {"gen_tokens": tokens, "vllm/gen_s": dt, "vllm/gen_tokens_per_s": tokens / max(dt, 1e-9)}
        if sampling.logprobs and truncated:
            stats["vllm/logprobs_renormalized"] = 1.0
        return GenerationOutput(ids, lps, fin, version, stats)

    @staticmethod
    def _check_spans(c: Any, version: int) -> None:
        spans = getattr(c, "weight_versions", None)
        if spans is None:  # vLLM without per-token weight labels
            return
        bad = [(s.version, s.start, s.end) for s in spans if s.version != str(version)]
        if bad:
            raise StaleWeightsError(
                f"completion tokens [start, end) were generated by engine weights {bad}, "
                f"expected version {version}"
            )

    # ---- sleep / wake ------------------------------------------------------------------------
    def sleep(self) -> None:
        """Release the engine's memory (``sleep_level``); level 2 drops the weights (re-sync needed)."""
        if not self.sleep_mode or self.asleep:
            return
        self.llm.sleep(level=self.cfg.sleep_level)
        self.asleep = {"weights", "kv_cache"}
        if self.cfg.sleep_level >= 2:
            self.weight_version = None
            self._set_engine_label(_INVALID)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Re-allocate ``tags`` (default both). Co-located order: weights, sync_weights, kv_cache."""
        tags = [t for t in (tags or ["weights", "kv_cache"]) if t in self.asleep]
        if tags:
            self._wake(tags)

    def _wake(self, tags: list[str]) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # cached free blocks are invisible to vLLM's allocator (verl #6912)
        self.llm.wake_up(tags=tags)
        self.asleep -= set(tags)

    # ---- helpers -----------------------------------------------------------------------------
    def _agree_tp(self, ok: bool) -> bool:
        if self.tp_size == 1:
            return ok
        dev = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.tp_group)
        return bool(flag.item())

    def close(self) -> None:
        """Shut the engine down, keeping the torch.distributed world it shares with the trainer.

        vLLM's shutdown (also run when the ``LLM`` is garbage-collected) ends with
        ``cleanup_dist_env_and_memory()``, which destroys the default process group (measured: the
        trainer's next barrier fails). Here it runs with the default group's destruction skipped;
        vLLM's own groups are released."""
        import gc

        llm, self.llm = self.llm, None
        if llm is not None:
            real = dist.destroy_process_group

            def keep_default_group(group=None):
                if group is not None:
                    real(group)

            dist.destroy_process_group = keep_default_group
            try:
                client = getattr(llm.llm_engine, "engine_core", None)
                if client is not None and hasattr(client, "shutdown"):
                    client.shutdown()
                del llm, client
                gc.unfreeze()  # the engine gc.freeze()s its start-up objects
                gc.collect()
            finally:
                dist.destroy_process_group = real
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
