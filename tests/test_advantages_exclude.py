"""``rewards.on_failure=exclude``: a completion whose reward failed leaves its group.

Its advantage is exactly 0, and every other completion gets the advantage of a group that never
held it (against an independent float64 formula); in the trainer it is also masked out of the loss.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from engine.advantages import group_advantages


def ref_group(rewards: list[float], scale_by_std: bool, baseline: str, eps: float = 1e-4) -> list[float]:
    """Advantages of one group, plain float64 Python (torch's unbiased std)."""
    k = len(rewards)
    if k < 2 or max(rewards) == min(rewards):
        return [0.0] * k
    mean = math.fsum(rewards) / k
    std = math.sqrt(math.fsum((r - mean) ** 2 for r in rewards) / (k - 1))
    out = []
    for r in rewards:
        a = r - mean if baseline == "mean" else r - (math.fsum(rewards) - r) / (k - 1)
        out.append(a / (std + eps) if scale_by_std else a)
    return out


def ref_excluding(rewards: list[float], valid: list[bool], G: int, **kw) -> list[float]:
    """Each group's valid members as a group of their own; failed members 0."""
    out = [0.0] * len(rewards)
    for s in range(0, len(rewards), G):
        idx = [i for i in range(s, s + G) if valid[i]]
        for i, a in zip(idx, ref_group([rewards[i] for i in idx], **kw), strict=True):
            out[i] = a
    return out


P, G = 6, 5
# Group 0 all valid; 1 one failure; 2 two failures; 3 one valid left; 4 none valid;
# 5 the valid members are all equal (the failed one differs): a constant group, zero advantages.
VALID = [
    [True] * 5,
    [True, False, True, True, True],
    [False, True, True, False, True],
    [False, False, True, False, False],
    [False] * 5,
    [True, True, False, True, True],
]


def _rewards(seed: int) -> list[float]:
    rng = random.Random(seed)
    r = [rng.choice([0.0, 0.5, 1.0, 2.0, -1.0]) + rng.random() for _ in range(P * G)]
    r[25:30] = [0.7, 0.7, 3.0, 0.7, 0.7]
    return r


@pytest.mark.parametrize("baseline", ["mean", "leave_one_out"])
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_failed_completions_leave_their_group(baseline: str, scale_by_std: bool) -> None:
    valid = [v for row in VALID for v in row]
    r = _rewards(0)
    got = group_advantages(
        torch.tensor(r, dtype=torch.float64), G, scale_by_std=scale_by_std, baseline=baseline,
        valid=torch.tensor(valid),
    )  # fmt: skip
    expected = ref_excluding(r, valid, G, scale_by_std=scale_by_std, baseline=baseline)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert all(got[i].item() == 0.0 for i in range(P * G) if not valid[i])  # exactly zero
    assert torch.all(got[15:] == 0.0)  # one valid member, none, a constant valid set
    # The failed rewards' values (NaN, as TRL records them, or huge) change nothing.
    poisoned = [
        x if v else (math.nan if i % 2 else 1e30) for i, (x, v) in enumerate(zip(r, valid, strict=True))
    ]
    again = group_advantages(
        torch.tensor(poisoned, dtype=torch.float64), G, scale_by_std=scale_by_std, baseline=baseline,
        valid=torch.tensor(valid),
    )  # fmt: skip
    assert torch.equal(again, got)
    # float32 rewards: same numbers at float32 precision.
    got32 = group_advantages(
        torch.tensor(r, dtype=torch.float32), G, scale_by_std=scale_by_std, baseline=baseline,
        valid=torch.tensor(valid),
    )  # fmt: skip
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32, got.float(), rtol=1e-5, atol=1e-5)


def test_all_valid_is_the_unmasked_path() -> None:
    r = torch.tensor(_rewards(1))
    for baseline in ("mean", "leave_one_out"):
        plain = group_advantages(r, G, baseline=baseline)
        assert torch.equal(
            group_advantages(r, G, baseline=baseline, valid=torch.ones(P * G, dtype=torch.bool)), plain
        )


def test_valid_mask_errors() -> None:
    r = torch.zeros(6)
    with pytest.raises(ValueError, match=r"valid must be a bool tensor of shape \(6,\)"):
        group_advantages(r, 3, valid=torch.ones(6))
    with pytest.raises(ValueError, match=r"valid must be a bool tensor of shape \(6,\)"):
        group_advantages(r, 3, valid=torch.ones(5, dtype=torch.bool))


@pytest.mark.e2e
def test_trainer_excludes_failed_completions(tmp_path, monkeypatch) -> None:
    """One GRPO step (TP=1, in this process) with a reward that raises on completions ending in an
    odd digit: those get advantage 0 and no loss tokens; the rest match the float64 formula."""
    import json

    from conftest import REPO

    from engine.config import load_config
    from engine.train_config import TrainConfig
    from engine.trainer import GRPOTrainer

    mc = tmp_path / "model.json"
    tiny = json.loads((REPO / "configs/models/tiny-demo.json").read_text())
    mc.write_text(json.dumps({**tiny, "hidden_size": 64, "intermediate_size": 64}))
    cfg = load_config(
        TrainConfig,
        REPO / "configs/demo_cpu.yaml",
        [
            "parallel.tensor_parallel=1", f"model.config={mc}", f"logging.dir={tmp_path / 'run'}",
            "logging.log_completions=0", "rollout.prompts_per_step=4", "rollout.num_generations=6",
            "batching.micro_batch_size=8", "max_steps=1", "rollout.max_completion_length=3",
            "rewards.funcs=[reward_hooks:digit_sum_fail_on_odd]", "rewards.weights=[1.0]",
            "rewards.on_failure=exclude",
        ],
    )  # fmt: skip
    seen = []
    original = GRPOTrainer.policy_update

    def capture(self, rec):
        seen.append(rec)
        return original(self, rec)

    monkeypatch.setattr(GRPOTrainer, "policy_update", capture)
    trainer = GRPOTrainer(cfg)
    try:
        m = trainer.train_step()
    finally:
        trainer.close()
    (rec,) = seen
    failed = rec.rewards.failed
    texts = [t.strip() for t in rec.texts]
    assert failed == [bool(t) and t[-1] in "13579" for t in texts]
    n_valid_groups = sum(sum(not f for f in failed[s : s + 6]) >= 2 for s in range(0, 24, 6))
    assert any(failed) and n_valid_groups >= 1, (texts, failed)  # the check below is not vacuous
    assert m["reward/errors"] == sum(failed)
    expected = ref_excluding(
        rec.rewards.total, [not f for f in failed], 6, scale_by_std=True, baseline="mean"
    )
    torch.testing.assert_close(
        rec.advantages.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6
    )
    assert all(rec.advantages[i].item() == 0.0 for i in range(24) if failed[i])
    loss_rows = {}  # completion index -> does any of its tokens enter the loss
    for mb in rec.micro_batches:
        for j, i in enumerate(range(24)[mb.rows]):
            loss_rows[i] = bool(mb.completion_mask[j].any())
    assert sorted(loss_rows) == list(range(24))
    assert not any(loss_rows[i] for i in range(24) if failed[i])  # out of the loss
    assert any(loss_rows[i] for i in range(24) if not failed[i])
