"""The trainer's weights as a stream of full HF tensors, TP-gathered one bucket at a time.

This is the weight-sync path to any engine that loads HF-named tensors (vLLM's ``reload_weights``):
``plan_buckets`` groups the mapping's rules into buckets of a byte budget, ``HFWeightStream``
all-gathers each bucket over the TP group, maps it to HF names and layout through the one mapping
(``models.qwen.hf_mapping``), and keeps the TP ranks in agreement so a failing consumer on one rank
makes every rank raise instead of one hanging in a gather.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from models.qwen.config import QwenConfig
from models.qwen.hf_mapping import Rule, hf_shape, mcore_full_to_hf, merge_tp_shards, rules, to_local_name
from models.qwen.model import unwrap


class WeightSyncError(RuntimeError):
    """Loading new weights into the engine failed on some rank (the engine holds no valid weights)."""


def _hf_bytes(cfg: QwenConfig, rule: Rule, itemsize: int) -> int:
    n = 0
    for name in rule.hf:
        numel = 1
        for d in hf_shape(cfg, name):
            numel *= d
        n += numel * itemsize
    return n


def plan_buckets(cfg: QwenConfig, bucket_bytes: int, itemsize: int) -> list[list[Rule]]:
    """Group the mapping's rules, in model order, into buckets of at most ``bucket_bytes`` of HF
    tensors (a rule larger than a bucket travels alone)."""
    buckets: list[list[Rule]] = []
    cur: list[Rule] = []
    size = 0
    for r in rules(cfg):
        b = _hf_bytes(cfg, r, itemsize)
        if cur and size + b > bucket_bytes:
            buckets.append(cur)
            cur, size = [], 0
        cur.append(r)
        size += b
    if cur:
        buckets.append(cur)
    return buckets


class HFWeightStream:
    """Iterates the model's full HF (name, tensor) pairs, TP-gathered one bucket at a time.

    Every TP rank of a replica must iterate its own stream in lock step (each bucket is one
    all-gather over the TP group). Before each bucket, and once at the end, the ranks agree over TP
    that nobody failed; a rank whose consumer failed calls :meth:`abort`, which makes the peers'
    streams raise at their next agreement instead of hanging in a gather.
    """

    def __init__(
        self, model: torch.nn.Module, cfg: QwenConfig, bucket_bytes: int, dtype: torch.dtype
    ) -> None:
        self.cfg, self.dtype = cfg, dtype
        self.params = {to_local_name(n): p for n, p in unwrap(model).named_parameters()}
        self.buckets = plan_buckets(cfg, bucket_bytes, torch.tensor([], dtype=dtype).element_size())
        self.group = parallel_state.get_tensor_model_parallel_group()
        self.tp = dist.get_world_size(self.group)
        self.device = next(iter(self.params.values())).device
        self.bytes = 0  # HF bytes handed to the consumer
        self.collectives = 0
        self._state = "new"  # new | running | done | aborted
        self._started = False  # the generator body has run (it owns the agreements from then on)
        self._gen: Iterator[tuple[str, torch.Tensor]] | None = None

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self._state != "new":
            raise RuntimeError("HFWeightStream can be iterated once")
        self._state = "running"
        self._gen = self._run()
        return self._gen

    def _agree(self, ok: bool) -> bool:
        if self.tp == 1:
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())

    def _run(self) -> Iterator[tuple[str, torch.Tensor]]:
        self._started = True
        try:
            for bucket in self.buckets:
                if not self._agree(True):
                    self._state = "aborted"
                    raise WeightSyncError(
                        "weight sync aborted: a TP peer's engine failed to load its weights"
                    )
                for name, t in self._gather(bucket):
                    self.bytes += t.numel() * t.element_size()
                    yield name, t
            if not self._agree(True):
                self._state = "aborted"
                raise WeightSyncError("weight sync aborted: a TP peer's engine failed to load its weights")
            self._state = "done"
        finally:
            if self._state == "running":  # closed mid-stream by a failing consumer
                self._state = "aborted"
                self._agree(False)

    def abort(self) -> None:
        """Call when the consumer failed: lets the TP peers fail at their next agreement."""
        if self._state in ("done", "aborted"):
            return
        if self._started and self._gen is not None:
            self._gen.close()  # runs the generator's finally, which agrees on the failure
            return
        self._state = "aborted"  # never pulled from: agree here, as the peers' next agreement expects
        self._agree(False)
        if self._gen is not None:
            self._gen.close()

    def drain(self) -> bool:
        """Finish a stream the consumer stopped reading early (keeps the peers in lock step).
        Returns False if there was anything left, which means the engine skipped weights."""
        if self._state == "new":
            iter(self)
        if self._state != "running" or self._gen is None:
            return True
        left = sum(1 for _ in self._gen)
        return left == 0

    @torch.no_grad()
    def _gather(self, bucket: list[Rule]) -> list[tuple[str, torch.Tensor]]:
        """One bucket: one all-gather of the TP-sharded parameters (flattened, in the engine dtype),
        then merge + map to HF. Transient memory is about twice the bucket's HF size."""
        sharded = [i for i, r in enumerate(bucket) if r.kind != "replicated" and self.tp > 1]
        shards: dict[int, list[torch.Tensor]] = {
            i: [self.params[r.mcore].detach().to(self.dtype)]
            for i, r in enumerate(bucket)
            if i not in sharded
        }
        if sharded:
            shapes = [self.params[bucket[i].mcore].shape for i in sharded]
            flat = torch.cat(
                [self.params[bucket[i].mcore].detach().to(self.dtype).reshape(-1) for i in sharded]
            )
            out = [torch.empty_like(flat) for _ in range(self.tp)]
            dist.all_gather(out, flat, group=self.group)
            del flat
            self.collectives += 1
            for i in sharded:
                shards[i] = []
            for buf in out:
                off = 0
                for i, shape in zip(sharded, shapes, strict=True):
                    n = shape.numel()
                    shards[i].append(buf[off : off + n].view(shape))
                    off += n
        pairs: list[tuple[str, torch.Tensor]] = []
        for i, r in enumerate(bucket):
            full = merge_tp_shards(r, shards.pop(i))
            pairs.extend(mcore_full_to_hf(self.cfg, r, full))
        return pairs
