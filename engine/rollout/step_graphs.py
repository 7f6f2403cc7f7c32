"""Decode steps replayed from CUDA graphs: one graph per (rows bucket, attention-span bucket).

An eager decode step of the 1.5B launches hundreds of small kernels from Python (28 layers of norms,
GEMMs, RoPE and attention, then the sampler), while the bytes it must read (3.1 GB of weights plus
the KV cache at 36 rows) take ~1.3 ms at 4.3 TB/s (arithmetic, not yet measured: no GPU so far). A
CUDA graph replays the whole step with one launch. A graph fixes shapes and addresses, so:

- the decode batch is padded up to a rows bucket (vLLM's sizes: 1, 2, 4, then multiples of 8, and the
  slot count). Padding slots are free slots: marked done, they write their K/V at position 0 of their
  own slot (a later prompt's prefill overwrites it) and their outputs to a trash row;
- attention reads a span rounded up to a multiple of ``DecodeConfig.span_bucket`` that covers every
  position written until the next host sync;
- everything a step reads or writes lives in tensors allocated before capture (KV cache, per-slot
  state, outputs, the step counter), so a graph stays valid for one ``generate`` call.

The first step of each shape runs eagerly (a real step, on a side stream as capture requires; it
also initialises the libraries' lazy state), then that shape is captured (capture records kernels
and runs none) and its later steps replay the graph. All graphs share one memory pool; they never
run concurrently and hand nothing to each other except through the persistent tensors. TP
collectives (NCCL) are captured like any other kernel.

``StepGraphs(step, capture=False)`` runs the same padded, bucketed steps without capture: how the CPU
tests check the bucketing against the unpadded eager decode.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from typing import Any

import torch


def row_buckets(slots: int) -> list[int]:
    """Decode batch sizes with a graph: 1, 2, 4, then multiples of 8 (vLLM's), and ``slots`` itself."""
    if slots < 1:
        raise ValueError(f"row_buckets: slots must be >= 1, got {slots}")
    return [b for b in (1, 2, 4) if b < slots] + list(range(8, slots, 8)) + [slots]


def pick_bucket(rows: int, buckets: list[int]) -> int:
    """The smallest bucket holding ``rows`` (1 <= rows <= the largest bucket)."""
    if not 1 <= rows <= buckets[-1]:
        raise ValueError(f"pick_bucket: {rows} rows outside 1..{buckets[-1]}")
    return buckets[bisect_left(buckets, rows)]


def span_bucket(pos_max: int, steps: int, bucket: int, max_len: int) -> int:
    """Attention span for ``steps`` decode steps from next-write position ``pos_max``: step k writes and
    reads up to position ``pos_max + k``, so the span must reach ``pos_max + steps``; rounded up to a
    multiple of ``bucket``, at most ``max_len`` (positions never pass ``max_len - 1``)."""
    need = pos_max + steps
    return min(-(-need // bucket) * bucket, max_len)


class StepGraphs:
    """``graphs(rows, span)`` runs ``step(rows, span)``: eagerly the first time, then from its graph.

    ``step`` must touch only tensors that outlive the graphs and must not read tensors back to the
    host. ``capture=False`` (CPU) always runs ``step`` eagerly; the counters still say what would have
    been captured and replayed.
    """

    def __init__(self, step: Callable[[int, int], None], capture: bool) -> None:
        self.step = step
        self.capture = capture
        self.graphs: dict[tuple[int, int], Any] = {}
        self.captured: list[tuple[int, int]] = []  # in capture order
        self.replays = 0
        self._pool: Any = None
        self._stream: Any = None

    def __call__(self, rows: int, span: int) -> None:
        key = (rows, span)
        graph = self.graphs.get(key)
        if graph is not None:
            self.replays += 1
            if self.capture:
                graph.replay()
            else:
                self.step(rows, span)
            return
        if not self.capture:
            self.step(rows, span)
            self.graphs[key] = True
            self.captured.append(key)
            return
        self.graphs[key] = self._capture(rows, span)
        self.captured.append(key)

    def _capture(self, rows: int, span: int) -> Any:
        """Run one real step eagerly on a side stream, then record it (without running it).

        ``CUDAGraph.capture_begin`` directly rather than ``torch.cuda.graph``: that context manager
        runs ``gc.collect()`` and empties the allocator cache at every capture (tens of ms in a
        training process, for each of a rollout's ~20 shapes)."""
        if self._stream is None:  # one side stream: the allocator caches blocks per stream
            self._stream = torch.cuda.Stream()
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.step(rows, span)
            stream.synchronize()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(pool=self._pool)
            try:
                self.step(rows, span)
            except BaseException:
                try:  # leave capture mode; the step's own error is the one to report
                    graph.capture_end()
                except RuntimeError:
                    pass
                raise
            graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)
        return graph
