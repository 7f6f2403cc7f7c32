"""CUDA-graph decode logic on CPU: bucket sizes, attention spans, and capture-once / replay-after
dispatch (``engine.rollout.step_graphs``; the generator's bucketed steps vs eager decode are compared in
tests/workers/generator_worker.py, the real capture in tests/test_gpu.py)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from engine.rollout import step_graphs
from engine.rollout.step_graphs import StepGraphs, pick_bucket, row_buckets, span_bucket


def test_row_buckets():
    assert row_buckets(1) == [1]
    assert row_buckets(3) == [1, 2, 3]
    assert row_buckets(8) == [1, 2, 4, 8]
    assert row_buckets(36) == [1, 2, 4, 8, 16, 24, 32, 36]  # the recipe's 6 x 6 rows per replica
    with pytest.raises(ValueError, match="slots must be >= 1"):
        row_buckets(0)


def test_pick_bucket_is_smallest_holding():
    buckets = row_buckets(36)
    for rows in range(1, 37):
        b = pick_bucket(rows, buckets)
        assert b >= rows and b in buckets and not any(rows <= x < b for x in buckets)
    with pytest.raises(ValueError, match="37 rows outside 1..36"):
        pick_bucket(37, buckets)


def test_span_bucket_covers_the_window_minimally():
    for max_len in (7, 64, 100):
        for bucket in (1, 5, 16):
            for steps in (1, 4, 16):
                for pos in range(max_len):
                    span = span_bucket(pos, steps, bucket, max_len)
                    last = min(pos + steps - 1, max_len - 1)  # the window's last write position
                    assert last < span <= max_len
                    assert span == max_len or span % bucket == 0
                    assert span - bucket <= last or span == max_len  # one bucket less would not do


def test_uncaptured_runs_every_step_and_counts_shapes():
    calls = []
    graphs = StepGraphs(lambda rows, span: calls.append((rows, span)), capture=False)
    keys = [(4, 16), (4, 16), (2, 16), (4, 16), (2, 32)]
    for k in keys:
        graphs(*k)
    assert calls == keys
    assert graphs.captured == [(4, 16), (2, 16), (2, 32)] and graphs.replays == 2


class FakeCuda:
    """Stands in for torch.cuda's stream and graph API: records what runs eagerly, what is captured
    and what is replayed."""

    def __init__(self) -> None:
        self.capturing = False
        self.log: list[tuple[str, object]] = []
        self.pool = object()
        self.streams = 0

    def install(self, monkeypatch) -> None:
        fake = self

        class Stream:
            def __init__(self) -> None:
                fake.streams += 1

            def wait_stream(self, other) -> None: ...

            def synchronize(self) -> None: ...

        class CUDAGraph:
            def capture_begin(self, pool=None) -> None:
                fake.log.append(("begin", pool))
                fake.capturing = True

            def capture_end(self) -> None:
                fake.log.append(("end", None))
                fake.capturing = False

            def replay(self) -> None:
                fake.log.append(("replay", self))

        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        main = Stream()
        fake.streams = 0  # side streams made by the code under test
        monkeypatch.setattr(torch.cuda, "current_stream", lambda: main)
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: fake.pool)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", CUDAGraph)
        assert step_graphs.torch.cuda is torch.cuda


def test_capture_once_per_shape_then_replay(monkeypatch):
    cuda = FakeCuda()
    cuda.install(monkeypatch)
    graphs = StepGraphs(
        lambda r, s: cuda.log.append(("capture" if cuda.capturing else "eager", (r, s))), True
    )
    for k in [(8, 16), (8, 16), (8, 16), (4, 16), (8, 16), (4, 32)]:
        graphs(*k)
    kinds = [k for k, _ in cuda.log]
    # first sight of a shape: one real (eager) step, then a capture that the fake does not run
    assert kinds == ["eager", "begin", "capture", "end", "replay", "replay",
                     "eager", "begin", "capture", "end", "replay",
                     "eager", "begin", "capture", "end"]  # fmt: skip
    assert {p for k, p in cuda.log if k == "begin"} == {cuda.pool}  # one shared memory pool
    assert cuda.streams == 1  # one side stream for every capture
    replayed = [g for k, g in cuda.log if k == "replay"]
    assert replayed[0] is replayed[1] is graphs.graphs[(8, 16)] and replayed[2] is graphs.graphs[(8, 16)]
    assert graphs.captured == [(8, 16), (4, 16), (4, 32)] and graphs.replays == 3


def test_a_failing_capture_ends_capture_and_reports_the_step_error(monkeypatch):
    cuda = FakeCuda()
    cuda.install(monkeypatch)

    def step(rows: int, span: int) -> None:
        if cuda.capturing:
            raise RuntimeError("operation not permitted when stream is capturing")

    graphs = StepGraphs(step, capture=True)
    with pytest.raises(RuntimeError, match="not permitted when stream is capturing"):
        graphs(4, 16)
    assert not cuda.capturing and [k for k, _ in cuda.log] == ["begin", "end"]
    assert graphs.graphs == {}
