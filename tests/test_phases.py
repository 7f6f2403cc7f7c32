"""The phase scheduler's order, memory-move sequence and sync protocol (CPU, fake engines)."""

from __future__ import annotations

import pytest

from engine.phases import ORDER, Phase, PhaseScheduler


class FakeGenerator:
    def __init__(self) -> None:
        self.log: list[str] = []
        self.weight_version = 0

    def sleep(self) -> None:
        self.log.append("sleep")

    def wake_up(self, tags: list[str]) -> None:
        self.log.append(f"wake:{','.join(tags)}")

    def sync_weights(self, model, version: int) -> None:
        self.log.append(f"sync:{version}")
        self.weight_version = version


class FakeOffload:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def offload(self) -> None:
        self.log.append("offload")

    def onload(self) -> None:
        self.log.append("onload")


def run_step(s: PhaseScheduler, version: int) -> None:
    for p in ORDER:
        with s.phase(p):
            if p is Phase.SYNC:
                s.sync(model=None, version=version)


def test_one_step_moves_memory_in_the_safe_order():
    gen = FakeGenerator()
    s = PhaseScheduler(gen, FakeOffload(gen.log))
    run_step(s, 1)
    # rollout: trainer offloaded; reward: generator sleeps; train: trainer onloaded;
    # sync: offload, wake weights, push weights, wake KV cache last.
    assert gen.log == ["offload", "sleep", "onload", "offload", "wake:weights", "sync:1", "wake:kv_cache"]
    assert s.calls == [
        "trainer.offload", "generator.sleep", "trainer.onload", "trainer.offload", "empty_cache",
        "generator.wake_up(weights)", "generator.sync_weights", "generator.wake_up(kv_cache)",
    ]  # fmt: skip
    assert gen.weight_version == 1
    assert set(s.metrics()) >= {f"phase/{p.value}_s" for p in ORDER}


def test_phases_must_run_in_order():
    s = PhaseScheduler(FakeGenerator(), FakeOffload([]))
    with pytest.raises(RuntimeError, match="phase train entered out of order: expected rollout after sync"):
        with s.phase(Phase.TRAIN):
            pass
    run_step(s, 1)
    run_step(s, 2)  # the cycle repeats
    with s.phase(Phase.ROLLOUT):
        with pytest.raises(RuntimeError, match="out of order"):
            with s.phase(Phase.REWARD):  # nested
                pass


def test_sync_only_inside_sync_phase():
    s = PhaseScheduler(FakeGenerator(), FakeOffload([]))
    with s.phase(Phase.ROLLOUT):
        with pytest.raises(RuntimeError, match="inside the SYNC phase"):
            s.sync(None, 1)


def test_generator_without_sleep_support():
    class Plain:
        weight_version = 0

        def sync_weights(self, model, version):
            self.weight_version = version

    s = PhaseScheduler(Plain(), FakeOffload([]))
    run_step(s, 3)
    assert s.generator.weight_version == 3
