"""The shipped run configs load through the one config system and match the open-rs recipe."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from engine.config import ConfigError, config_to_dict, load_config
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
    assert c.rewards.params["cosine"].max_len == 3584
    assert (c.rewards.params["cosine"].min_value_wrong, c.rewards.params["cosine"].max_value_wrong) == (
        0.0,
        -0.5,
    )
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


# ---- model.config vs model.hf_checkpoint (the checkpoint's config.json is the architecture) ----------


def _hf_dir(tmp_path: Path, model_json: str) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text((CONFIGS / "models" / model_json).read_text())
    return d


def test_open_rs_with_a_checkpoint_of_another_size(tmp_path):
    """configs/open_rs_exp3.yaml model.hf_checkpoint=DIR (a Qwen2 of another size): DIR's config.json wins."""
    from engine.model_loading import resolve_model_config
    from models.qwen.config import QwenConfig

    ckpt = _hf_dir(tmp_path, "tiny-demo.json")
    c = load_config(TrainConfig, CONFIGS / "open_rs_exp3.yaml", [f"model.hf_checkpoint={ckpt}"])
    assert c.model.config is None
    assert resolve_model_config(c.model) == QwenConfig.from_file(CONFIGS / "models" / "tiny-demo.json")
    # Without a checkpoint the open-rs configs are a random init of the recipe's 1.5B.
    plain = load_config(TrainConfig, CONFIGS / "open_rs_exp3.yaml")
    assert resolve_model_config(plain.model).hidden_size == 1536
    # A model.config equal to the checkpoint's is fine.
    same = load_config(
        TrainConfig, CONFIGS / "open_rs_exp3.yaml", [f"model.hf_checkpoint={ckpt}", f"model.config={ckpt}"]
    )
    assert resolve_model_config(same.model).hidden_size == 128


def test_model_config_disagreeing_with_the_checkpoint_names_both_files(tmp_path):
    from engine.model_loading import resolve_model_config

    ckpt = _hf_dir(tmp_path, "tiny-demo.json")
    big = CONFIGS / "models" / "deepseek-r1-distill-qwen-1.5b.json"
    c = load_config(
        TrainConfig, CONFIGS / "open_rs_exp3.yaml", [f"model.hf_checkpoint={ckpt}", f"model.config={big}"]
    )
    with pytest.raises(ValueError) as exc:
        resolve_model_config(c.model)
    msg = str(exc.value)
    assert str(big) in msg and str(ckpt / "config.json") in msg
    assert "hidden_size: 1536 vs 128" in msg and "num_hidden_layers: 28 vs 2" in msg


@pytest.mark.parametrize("null", ["null", "~", "Null"])
def test_null_override_is_none(tmp_path, null):
    ckpt = _hf_dir(tmp_path, "tiny-demo.json")
    c = load_config(
        TrainConfig, CONFIGS / "demo_cpu.yaml", [f"model.hf_checkpoint={ckpt}", f"model.config={null}"]
    )
    assert c.model.config is None and c.model.architecture_file == str(ckpt)
    assert (
        load_config(TrainConfig, CONFIGS / "open_rs_exp3.yaml", [f"loss.kl_clamp={null}"]).loss.kl_clamp
        is None
    )
    with pytest.raises(ConfigError, match="data.tokenizer.*expected str, got None"):
        load_config(TrainConfig, CONFIGS / "demo_cpu.yaml", [f"data.tokenizer={null}"])


# ---- tools/train_grpo.py: --print-config and one-line user errors ----------------------------------


def _train_grpo(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-X", "importtime", str(CONFIGS.parent / "tools" / "train_grpo.py"), *args]
    return subprocess.run(cmd, cwd=CONFIGS.parent, capture_output=True, text=True, timeout=60)


@pytest.mark.e2e
def test_print_config_resolves_everything_without_torch(tmp_path):
    t0 = time.perf_counter()
    proc = _train_grpo("--config", "configs/open_rs_exp3.yaml", "loss.beta=0.1", "eval.k=4", "--print-config")
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = yaml.safe_load(proc.stdout)
    expected = load_config(TrainConfig, CONFIGS / "open_rs_exp3.yaml", ["loss.beta=0.1", "eval.k=4"])
    assert printed == config_to_dict(expected)  # every section, every default
    assert set(printed) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert printed["loss"]["beta"] == 0.1 and printed["loss"]["kl_clamp"] is None
    (tmp_path / "printed.yaml").write_text(proc.stdout)  # the printout is a config file that loads back
    assert load_config(TrainConfig, tmp_path / "printed.yaml") == expected
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "import time:" in line}
    assert not {"torch", "megatron", "megatron.core", "transformers", "vllm"} & imported
    assert wall < 3.0, f"--print-config took {wall:.1f}s"


@pytest.mark.e2e
@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "configs/open_rs_exp3.yaml", "loss.bta=1"], "error: unknown config key 'loss.bta'"),
        (["--config", "configs/nope.yaml"], "error: cannot read config file configs/nope.yaml"),
        (["--config", "configs/open_rs_exp3.yaml", "loss.beta=-1"], "error: invalid config 'loss'"),
    ],
)
def test_user_errors_end_in_one_line(args, message):
    proc = _train_grpo(*args, "--print-config")
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if "import time:" not in ln]
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_activation_options_are_checked_at_load():
    cfg = load_config(
        TrainConfig,
        CONFIGS / "demo_cpu.yaml",
        [
            "parallel.sequence_parallel=true",
            "parallel.recompute_granularity=selective",
            "parallel.recompute_modules=[core_attn,mlp]",
        ],
    )
    assert cfg.parallel.sequence_parallel and cfg.parallel.recompute_modules == ["core_attn", "mlp"]
    with pytest.raises(ConfigError, match="parallel.recompute_method"):
        load_config(TrainConfig, CONFIGS / "demo_cpu.yaml", ["parallel.recompute_granularity=full"])
    with pytest.raises(ConfigError, match="recompute_granularity"):
        load_config(TrainConfig, CONFIGS / "demo_cpu.yaml", ["parallel.recompute_granularity=everything"])
    with pytest.raises(ConfigError, match="recompute_modules"):
        load_config(TrainConfig, CONFIGS / "demo_cpu.yaml", ["parallel.recompute_modules=[attn]"])
