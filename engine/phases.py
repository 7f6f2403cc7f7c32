"""The GRPO phase scheduler: which engine holds the accelerator's memory in each phase of a step.

One step is the fixed cycle

    ROLLOUT -> REWARD -> LOGPROBS -> TRAIN -> SYNC -> (next step's ROLLOUT)

and each transition does the memory moves that make co-locating a vLLM engine with the Megatron
trainer on the same GPUs fit (verl / NeMo-RL order, and the OOM fixes their users needed):

- ROLLOUT   generator awake (weights + KV cache); trainer grads and optimizer state offloaded.
- REWARD    generator put to sleep: its weights and KV cache are released for training.
- LOGPROBS  trainer forward passes (reference, old) with the parameters resident.
- TRAIN     grads and optimizer state reloaded; forward/backward/step.
- SYNC      grads and optimizer state offloaded, allocator cache emptied, then the generator wakes
            its *weights only*, receives the new weights (version + 1), and only then wakes its KV
            cache: peak memory never holds both KV cache and training state (NeMo-RL #191,
            verl #6912).

On CPU every memory move is a no-op and the built-in generator shares the trainer's weights, so
the same scheduler drives the CPU tests end to end. Phase order is enforced: a phase out of
order is a bug in the caller and raises. Wall time and peak memory per phase are recorded.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class Phase(enum.Enum):
    ROLLOUT = "rollout"
    REWARD = "reward"
    LOGPROBS = "logprobs"
    TRAIN = "train"
    SYNC = "sync"


ORDER = [Phase.ROLLOUT, Phase.REWARD, Phase.LOGPROBS, Phase.TRAIN, Phase.SYNC]


def peak_memory_bytes() -> int:
    """Peak memory of this process: allocated GPU memory on CUDA, else peak RSS."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


class TrainerOffload:
    """Moves the trainer's grads and optimizer state off the GPU and back (no-op on CPU)."""

    def __init__(self, ddp_model: Any, optimizer: Any, enabled: bool) -> None:
        self.ddp, self.optimizer = ddp_model, optimizer
        self.enabled = enabled and torch.cuda.is_available()
        self.offloaded = False

    def offload(self) -> None:
        if self.enabled and not self.offloaded:
            self.ddp.offload_grad_buffers()
            inner = getattr(self.optimizer, "optimizer", None)
            if hasattr(inner, "offload_to_cpu"):
                inner.offload_to_cpu()
            self.offloaded = True

    def onload(self) -> None:
        if self.enabled and self.offloaded:
            self.ddp.restore_grad_buffers()
            inner = getattr(self.optimizer, "optimizer", None)
            if hasattr(inner, "restore_from_cpu"):
                inner.restore_from_cpu()
            self.offloaded = False


class PhaseScheduler:
    """Drives the phase cycle, its memory moves and the generator's sleep/wake/sync calls."""

    def __init__(self, generator: Any, offload: TrainerOffload, sleep_generator: bool = True) -> None:
        self.generator = generator
        self.offload = offload
        self.sleep_generator = sleep_generator
        self.current: Phase | None = None
        self._last: Phase = Phase.SYNC  # a run starts as if a sync just happened
        self.seconds: dict[str, float] = {}
        self.peak_bytes: dict[str, int] = {}
        self.calls: list[str] = []  # the ordered log of memory/engine actions (tests read it)

    def _act(self, name: str, fn) -> None:
        self.calls.append(name)
        fn()

    @contextmanager
    def phase(self, p: Phase) -> Iterator[None]:
        expected = ORDER[(ORDER.index(self._last) + 1) % len(ORDER)]
        if self.current is not None or p != expected:
            raise RuntimeError(
                f"phase {p.value} entered out of order: expected {expected.value} after {self._last.value}"
            )
        self._enter(p)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        self.current = p
        try:
            yield
        finally:
            self.current = None
        self.seconds[p.value] = time.perf_counter() - t0
        self.peak_bytes[p.value] = peak_memory_bytes()
        self._last = p

    def _enter(self, p: Phase) -> None:
        gen = self.generator
        if p is Phase.ROLLOUT:
            self._act("trainer.offload", self.offload.offload)
        elif p is Phase.REWARD and self.sleep_generator:
            self._act("generator.sleep", getattr(gen, "sleep", lambda: None))
        elif p is Phase.TRAIN:
            self._act("trainer.onload", self.offload.onload)

    def sync(self, model: torch.nn.Module, version: int) -> None:
        """Inside SYNC: free training memory, wake weights, push them, then wake the KV cache."""
        if self.current is not Phase.SYNC:
            raise RuntimeError("PhaseScheduler.sync() must run inside the SYNC phase")
        self._act("trainer.offload", self.offload.offload)
        self._act("empty_cache", torch.cuda.empty_cache if torch.cuda.is_available() else lambda: None)
        wake = getattr(self.generator, "wake_up", None)
        if self.sleep_generator and wake is not None:
            self._act("generator.wake_up(weights)", lambda: wake(tags=["weights"]))
        self._act("generator.sync_weights", lambda: self.generator.sync_weights(model, version))
        if self.sleep_generator and wake is not None:
            self._act("generator.wake_up(kv_cache)", lambda: wake(tags=["kv_cache"]))

    def metrics(self) -> dict[str, float]:
        out = {f"phase/{k}_s": v for k, v in self.seconds.items()}
        out.update({f"phase/{k}_peak_gib": v / 2**30 for k, v in self.peak_bytes.items()})
        return out
