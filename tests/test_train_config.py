"""The shipped run configs load through the one config system and match the open-rs recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import ConfigError, load_config
from engine.data import OPEN_RS_SYSTEM_PROMPT
from engine.train_config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("exp", [1, 2, 3])
def test_open_rs_shared_hyperparameters(exp):
    c = load_config(TrainConfig, CONFIGS / f"open_rs_exp{exp}.yaml")
    assert c.parallel.tensor_parallel == 2 and c.max_steps == 500 and c.seed == 42
    assert (c.optim.lr, c.optim.min_lr_ratio, c.optim.warmup_ratio) == (1e-6, 0.1, 0.1)
    assert (c.optim.weight_decay, c.optim.clip_grad, c.optim.adam_eps) == (0.0, 1.0, 1e-8)
    r = c.rollout
    assert (r.num_generations, r.prompts_per_step, r.temperature, r.top_p) == (6, 12, 0.7, 1.0)
    assert r.prompts_per_step * r.num_generations == 72  # completions per optimizer step
    assert not r.scale_logprobs_by_temperature and not r.mask_truncated_completions
    assert (c.loss.beta, c.loss.kl_estimator, c.loss.loss_agg, c.loss.num_iterations) == (
        0.04,
        "k3",
        "token-mean",
        1,
    )
    assert c.data.max_prompt_length == 512 and c.model.dtype == "bf16"
    assert r.max_completion_length == (4096 if exp == 1 else 3584)


def test_open_rs_exp3_rewards_and_prompt():
    c = load_config(TrainConfig, CONFIGS / "open_rs_exp3.yaml")
    assert c.rewards.funcs == ["format", "cosine"] and c.rewards.weights == [1.0, 2.0]
    assert c.rewards.cosine_max_len == 3584
    assert (c.rewards.cosine_min_value_wrong, c.rewards.cosine_max_value_wrong) == (0.0, -0.5)
    assert c.data.system_prompt == OPEN_RS_SYSTEM_PROMPT


@pytest.mark.parametrize("exp", [1, 2])
def test_open_rs_exp12_accuracy_format_without_english_line(exp):
    c = load_config(TrainConfig, CONFIGS / f"open_rs_exp{exp}.yaml")
    assert c.rewards.funcs == ["accuracy", "format"]
    assert c.data.system_prompt == OPEN_RS_SYSTEM_PROMPT.replace(
        " Note that respond by English, NOT use other languages.", ""
    )


def test_demo_config_and_overrides():
    c = load_config(TrainConfig, CONFIGS / "demo_cpu.yaml", ["max_steps=7", "loss.beta=0.1"])
    assert c.max_steps == 7 and c.loss.beta == 0.1 and c.parallel.tensor_parallel == 2


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match="rollout.num_generations"):
        load_config(TrainConfig, CONFIGS / "demo_cpu.yaml", ["rollout.num_generation=4"])


def test_tis_needs_matching_temperatures():
    with pytest.raises(ConfigError, match="scale_logprobs_by_temperature"):
        load_config(TrainConfig, CONFIGS / "open_rs_exp3.yaml", ["loss.tis_cap=2.0"])
