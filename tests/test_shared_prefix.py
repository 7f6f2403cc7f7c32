"""Shared-prefix (Prefix Grouper) training forward: parity with the unpacked one at TP=1 and TP=2,
the packed layout, and the micro-batch / group validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, check, per_layout

from engine.batching.micro_batches import build_micro_batches, shared_prefix_layout
from engine.train_config import BatchingConfig
from models.qwen.model import prefix_tree_attention_mask

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 2)}
CHECKS = [
    "rope/freqs_equal_get_emb",
    "rope/arange_equals_plain",
    "rope/positions_take_effect",
    "rope/hook_scoped",
    "sp/same_rows_and_mask",
    "sp/logprobs_policy",
    "sp/entropy_policy",
    "sp/logprobs_ref",
    "sp/entropy_ref",
    "sp/control_packed_offsets_differ",
    "sp/control_slots_see_each_other_differ",
    "grpo/grads",
    "grpo/loss",
    "grpo/metrics",
    "grpo/clipping_active",
]


@pytest.fixture(scope="module")
def results(session_tmp):
    return per_layout("shared_prefix.py", session_tmp, LAYOUTS)


@pytest.mark.multi_rank
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", CHECKS)
def test_shared_prefix_parity(results, layout, name):
    check(results(layout), name)


def test_micro_batch_must_hold_whole_groups():
    prompts = [[5, 6]] * 4 + [[7]] * 4
    comps = [[3]] * 8
    with pytest.raises(ValueError) as exc:
        build_micro_batches(prompts, comps, 6, 0, 4, shared_prefix=True)
    msg = str(exc.value)
    assert "batching.shared_prefix=true" in msg
    assert "batching.micro_batch_size=6" in msg and "rollout.num_generations=4" in msg
    assert len(build_micro_batches(prompts, comps, 6, 0, 4)) == 2  # unpacked: any size is fine
    assert [mb.rows for mb in build_micro_batches(prompts, comps, 8, 0, 4, shared_prefix=True)] == [
        slice(0, 8)
    ]


def test_a_group_must_share_its_prompt():
    prompts = [[5, 6], [5, 6], [5, 7], [5, 6]]
    with pytest.raises(ValueError, match=r"rows 0\.\.3 are not one group"):
        build_micro_batches(prompts, [[3]] * 4, 4, 0, 4, shared_prefix=True)


def test_batching_config_shared_prefix():
    assert BatchingConfig().shared_prefix is False
    with pytest.raises(ValueError, match=r"batching\.shared_prefix='yes' is invalid.*True or False"):
        BatchingConfig(shared_prefix="yes")


def test_packed_layout():
    # Group 0: prompt of 1 (P = 2, left-padded), completions of 2 and 1 tokens (C = 2).
    # Group 1: prompt of 2, completions of 1 and 2 tokens.
    prompts = [[11], [11], [12, 13], [12, 13]]
    comps = [[21, 22], [23], [24], [25, 26]]
    (mb,) = build_micro_batches(prompts, comps, 4, 0, 2, shared_prefix=True)
    assert mb.P == 2 and mb.group_size == 2
    assert mb.input_ids.tolist() == [[0, 11, 21, 22, 23, 0], [12, 13, 24, 0, 25, 26]]
    assert mb.attn.tolist() == [[False, True, True, True, True, False], [True, True, True, False, True, True]]
    assert mb.completion_mask.tolist() == [[True, True], [True, False], [True, False], [True, True]]

    positions, segments, sources, targets = shared_prefix_layout(2, 2, 2)
    assert positions.tolist() == [0, 1, 2, 3, 2, 3]
    assert segments.tolist() == [0, 0, 1, 1, 2, 2]
    assert sources.tolist() == [[1, 2], [1, 4]]
    assert targets.tolist() == [[2, 3], [4, 5]]

    mask = prefix_tree_attention_mask(mb.attn, segments)
    assert mask.shape == (2, 1, 6, 6)
    # Row 1 (no padding): 1 = masked. Slot 2 (columns 4, 5) sees the prompt and itself, never slot 1.
    want = torch.tensor(
        [
            [0, 1, 1, 1, 1, 1],
            [0, 0, 1, 1, 1, 1],
            [0, 0, 0, 1, 1, 1],
            [0, 0, 0, 1, 1, 1],  # key 3 is padding
            [0, 0, 1, 1, 0, 1],
            [0, 0, 1, 1, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask[1, 0], want)
    assert mask[0, 0, :, 0].all() and mask[0, 0, :, 5].all()  # row 0's pads are never keys


def test_option_reaches_the_config_loader(tmp_path):
    from engine.config import load_config
    from engine.train_config import TrainConfig

    cfg = load_config(
        TrainConfig,
        REPO / "configs/demo_cpu.yaml",
        ["batching.shared_prefix=true", f"logging.dir={tmp_path}"],
    )
    assert cfg.batching.shared_prefix is True


def _trainer_cfg(tmp_path: Path, *overrides: str):
    from engine.config import load_config
    from engine.train_config import TrainConfig

    tiny = json.loads((REPO / "configs/models/tiny-demo.json").read_text())
    tmp_path.mkdir(parents=True, exist_ok=True)
    mc = tmp_path / "model.json"
    mc.write_text(json.dumps({**tiny, "hidden_size": 64, "intermediate_size": 64}))
    base = [
        "parallel.tensor_parallel=1", f"model.config={mc}", f"logging.dir={tmp_path / 'run'}",
        "logging.log_completions=0", "rollout.prompts_per_step=4", "rollout.num_generations=4",
        "batching.micro_batch_size=8", "rollout.max_completion_length=6", "rollout.mask_truncated_completions=true",
        "loss.beta=0.04", "max_steps=2",
    ]  # fmt: skip
    return load_config(TrainConfig, REPO / "configs/demo_cpu.yaml", [*base, *overrides])


@pytest.mark.e2e
def test_train_step_packed_equals_unpacked(tmp_path):
    """The whole step (LOGPROBS phase with the reference model, truncation mask, TRAIN) through
    GRPOTrainer: same rollout, same loss, KL, entropy and gradient norm with the option on."""
    from engine.trainer import GRPOTrainer

    metrics = {}
    for shared in (False, True):
        trainer = GRPOTrainer(
            _trainer_cfg(tmp_path / str(shared), f"batching.shared_prefix={str(shared).lower()}")
        )
        try:
            metrics[shared] = [trainer.train_step(), trainer.train_step()]  # step 2: a live KL
        finally:
            trainer.close()
    for a, b in zip(metrics[False], metrics[True], strict=True):
        assert a["completion/length_mean"] == b["completion/length_mean"]
        assert 0 < a["completion/truncated_frac"] < 1  # EOS-ended and truncated (masked) completions
        assert a["optim/grad_norm"] > 0
        for key in ("loss/loss", "loss/kl", "policy/entropy", "optim/grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-9), key
    assert metrics[False][1]["loss/kl"] > 0

    # The packed path really ran: each prompt was forwarded once per group, not G times.
    def trained_tokens(m: dict) -> float:
        return m["perf/train_tokens_per_s"] * m["phase/train_s"]

    assert trained_tokens(metrics[True][0]) < 0.9 * trained_tokens(metrics[False][0])


def test_config_rejects_split_groups_at_load(tmp_path):
    # Fails when the config loads, before any model memory is spent or a rollout is run.
    with pytest.raises(
        ValueError, match=r"batching\.micro_batch_size=6 must be a multiple of rollout\.num_generations=4"
    ):
        _trainer_cfg(tmp_path, "batching.shared_prefix=true", "batching.micro_batch_size=6")


def _blocks_to_attend(plan, S: int) -> torch.Tensor:
    """The [b, S, S] query-sees-key matrix that ``SDPAttention`` computes from a SegmentAttention."""
    out = torch.zeros(len(plan.blocks), S, S, dtype=torch.bool)
    for r, blocks in enumerate(plan.blocks):
        for tokens, skip in blocks:
            for p in range(skip, len(tokens)):
                out[r, tokens[p], tokens[: p + 1]] = True
    return out


def test_segment_blocks_equal_prefix_tree_mask():
    """The O(S) block plan of the shared-prefix forward sees exactly what the dense
    ``prefix_tree_attention_mask`` allows, for every real query (padding queries have no output)."""
    from models.qwen.attention import segment_attention
    from models.qwen.model import prefix_tree_segments

    g = torch.Generator().manual_seed(0)
    for P, G, C in [(2, 2, 2), (5, 3, 4), (1, 4, 3)]:
        _, segments, _, _ = shared_prefix_layout(P, G, C)
        S = P + G * C
        pad = torch.rand(3, S, generator=g) > 0.3
        pad[:, P - 1] = True  # the prompt's last token is real in every layout
        want = ~prefix_tree_attention_mask(pad, segments)[:, 0]
        got = _blocks_to_attend(segment_attention(*prefix_tree_segments(pad, segments)), S)
        assert torch.equal(got & pad[:, :, None], want & pad[:, :, None] & pad[:, None, :])
        assert not (got & ~pad[:, :, None]).any()  # padding queries and keys: nowhere


def test_segment_blocks_for_packed_documents():
    from models.qwen.attention import segment_attention

    seg = torch.tensor([[0, 0, 0, 1, 1, -1, 2, 2, 2, 2, -1]])
    got = _blocks_to_attend(segment_attention(seg), seg.shape[1])[0]
    same = (seg[0, :, None] == seg[0, None, :]) & (seg[0, :, None] >= 0)
    assert torch.equal(got, same & torch.ones(11, 11, dtype=torch.bool).tril())
    with pytest.raises(ValueError, match="must precede its branches"):
        segment_attention(torch.zeros(1, 4, dtype=torch.long), torch.tensor([[1, 0, 2, 2]]))


def test_thd_params_for_the_transformer_engine_spec():
    from models.qwen.model import thd_packed_seq_params

    seg = torch.tensor([[0, 0, 0, 1, 1, -1, 2]])
    p = thd_packed_seq_params(seg, None, torch.tensor([0, 1, 2, 0, 1, 0, 0]))
    assert p.qkv_format == "thd" and p.cu_seqlens_q.tolist() == [0, 3, 5, 6, 7] and p.max_seqlen_q == 3
    with pytest.raises(ValueError, match="positions must restart at 0 with every segment"):
        thd_packed_seq_params(seg, None, torch.arange(7))
