"""Megatron-Core 0.16.1 on a machine without CUDA: every shim in one place.

Applied by :func:`apply_cpu_compat` only when ``torch.cuda.is_available()`` is False, so nothing
that runs on a GPU is ever patched. Each point below was met running GPTModel / DDP /
dist_checkpointing with gloo on CPU:

1. ``torch.cuda.current_device()`` is called to choose tensor devices (rotary ``inv_freq``,
   DDP grad buffers, dist_checkpointing flags). On CPU it must name the CPU.
2. ``torch.cuda.synchronize()`` (dist_checkpointing save, DDP buffer release) and
   ``torch.cuda.current_stream()/default_stream()`` (DDP grad sync) must be harmless no-ops.
3. The CUDA RNG tracker (``tensor_parallel.random``) reads/sets CUDA generator state, even with
   dropout 0 because attention always forks it. It is replaced by a tracker over the CPU
   generator with the same seeds Megatron would use (data-parallel seed, TP-offset seed).
   Activation recomputation (``tensor_parallel.checkpoint``) saves and restores the "CUDA" RNG
   state around the recomputed forward: on CPU that state is the CPU generator's, already saved.
4. The default causal mask is built on device "cuda" when no mask is given: callers always pass an
   explicit boolean mask (``models.qwen.model.attention_mask``), nothing to patch.
5. Megatron's optimizer wrappers allocate with ``device='cuda'``: not patched; the trainer uses
   ``torch.optim.AdamW`` over the DDP ``main_grad`` buffers and a TP-aware grad-norm clip on CPU
   (``engine.optimizer``).
6. Not Megatron's, but what CPU decode at a real vocabulary meets: glibc's *dynamic* mmap threshold
   lets the heap shrink back (trim) between decode steps, so every step's ~15 MB logits and sampling
   buffers come back as fresh pages: 2.7M page faults and +30% time in a 24-row x 256-token decode at
   vocab 151,936. Fixed thresholds (mmap above 32 MiB, trim above 64 MiB free) keep those pages; the
   user's own ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` win.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

import torch

_APPLIED = False


class _NullStream:
    """Stands in for a CUDA stream: waits and syncs are no-ops on CPU."""

    def wait_stream(self, *_args, **_kwargs) -> None:
        return None

    def synchronize(self) -> None:
        return None


MMAP_THRESHOLD = 32 << 20  # glibc's own upper bound for its dynamic threshold
TRIM_THRESHOLD = 64 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h


def fix_malloc_thresholds() -> bool:
    """Point 6: fixed glibc malloc thresholds. False where not glibc, or the user set their own."""
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def apply_cpu_compat() -> bool:
    """Install the CPU shims once. Returns True if they are (now) active."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    fix_malloc_thresholds()
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.current_stream = lambda *a, **k: _NullStream()  # type: ignore[assignment]
    torch.cuda.default_stream = lambda *a, **k: _NullStream()  # type: ignore[assignment]
    torch.cuda.empty_cache = lambda: None  # type: ignore[assignment]
    _APPLIED = True
    return True


def _cpu_tracker_class():
    from megatron.core.tensor_parallel import random as mp_random

    class CpuRNGStatesTracker(mp_random.CudaRNGStatesTracker):
        """Megatron's RNG tracker over the CPU default generator (same names, same seeds)."""

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise RuntimeError(f"rng seed {seed} already exists")
            if name in self.states_:
                raise RuntimeError(f"rng state {name} already exists")
            self.seeds_.add(seed)
            gen = torch.Generator()
            gen.manual_seed(seed)
            self.states_[name] = gen.get_state()

        @contextlib.contextmanager
        def fork(self, name: str = mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise RuntimeError(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    return CpuRNGStatesTracker


def cpu_model_parallel_seed(seed: int, tp_rank: int) -> None:
    """CPU twin of ``tensor_parallel.model_parallel_cuda_manual_seed`` (same seed offsets)."""
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = lambda *_a, **_k: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda *_a, **_k: None
    tracker = _cpu_tracker_class()()
    mp_random._CUDA_RNG_STATE_TRACKER = tracker
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    torch.manual_seed(seed)
    tracker.add(mp_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)  # ep=etp=0
