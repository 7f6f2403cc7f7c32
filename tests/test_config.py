"""Tests for engine.config: YAML + overrides -> typed nested dataclasses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from engine.config import ConfigError, config_to_dict, load_config, load_config_from_cli, save_config


@dataclass
class LossCfg:
    beta: float = 0.04
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    kl_clamp: float | None = 20.0
    num_iterations: int = 1

    def __post_init__(self) -> None:
        if self.beta < 0:
            raise ValueError(f"beta={self.beta} must be >= 0")


@dataclass
class RewardCfg:
    funcs: list[str] = field(default_factory=lambda: ["format", "cosine"])
    weights: list[float] = field(default_factory=lambda: [1.0, 2.0])
    params: dict[str, float] = field(default_factory=dict)


@dataclass
class DataCfg:
    path: str = ""
    split: str = "train"
    system_prompt: str | None = None
    limit: int | None = None
    shuffle: bool = True


@dataclass
class TrainCfg:
    loss: LossCfg = field(default_factory=LossCfg)
    rewards: RewardCfg = field(default_factory=RewardCfg)
    data: DataCfg = field(default_factory=DataCfg)
    lr: float = 1e-6
    max_steps: int = 500
    out_dir: Path = Path("runs/x")
    name: str = "exp"


@dataclass
class NeedsModel:
    model: str
    steps: int = 1


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_without_file() -> None:
    assert load_config(TrainCfg) == TrainCfg()


def test_nested_yaml_and_coercion(tmp_path: Path) -> None:
    cfg_file = write(
        tmp_path / "a.yaml",
        """
lr: 1e-6            # PyYAML leaves this a string: coerced to float
max_steps: 50
out_dir: runs/exp3
loss:
  beta: 0           # int accepted for float
  kl_estimator: k1
  kl_clamp: null
rewards:
  funcs: [format, cosine]
  weights: [1, 2.5]
  params: {cosine_max_len: 3584}
data:
  path: assets/data/x.jsonl
  system_prompt: "be brief"
  limit: 10
  shuffle: false
""",
    )
    cfg = load_config(TrainCfg, cfg_file)
    assert cfg.lr == 1e-6 and isinstance(cfg.lr, float)
    assert cfg.max_steps == 50
    assert cfg.out_dir == Path("runs/exp3")
    assert cfg.loss == LossCfg(beta=0.0, kl_estimator="k1", kl_clamp=None)
    assert isinstance(cfg.loss.beta, float)
    assert cfg.rewards.weights == [1.0, 2.5] and all(isinstance(w, float) for w in cfg.rewards.weights)
    assert cfg.rewards.params == {"cosine_max_len": 3584.0}
    assert cfg.data == DataCfg(path="assets/data/x.jsonl", system_prompt="be brief", limit=10, shuffle=False)


def test_overrides(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "a.yaml", "loss:\n  beta: 0.1\ndata:\n  path: a.jsonl\n")
    cfg = load_config(
        TrainCfg,
        cfg_file,
        [
            "loss.beta=0.0",
            "data.path=foo.jsonl",
            "rewards.funcs=[format,accuracy]",
            "rewards.params.cosine_max_len=1000",
            "data.split=2024",  # str field: the raw text is kept
            "data.system_prompt=null",
            "data.limit=5",
            "lr=3e-6",
            "loss={kl_estimator: k2}",  # a mapping merges into the section
        ],
    )
    assert cfg.loss.beta == 0.0 and cfg.loss.kl_estimator == "k2"
    assert cfg.data.path == "foo.jsonl" and cfg.data.split == "2024"
    assert cfg.data.system_prompt is None and cfg.data.limit == 5
    assert cfg.rewards.funcs == ["format", "accuracy"]
    assert cfg.rewards.params == {"cosine_max_len": 1000.0}
    assert cfg.lr == 3e-6


def test_cli_parsing(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "a.yaml", "max_steps: 7\n")
    cfg = load_config_from_cli(TrainCfg, ["--config", str(cfg_file), "loss.beta=0.5", "name=run1"])
    assert (cfg.max_steps, cfg.loss.beta, cfg.name) == (7, 0.5, "run1")
    with pytest.raises(ConfigError, match="unexpected argument"):
        load_config_from_cli(TrainCfg, ["oops"])


def test_base_file_deep_merge(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    write(
        tmp_path / "base" / "common.yaml",
        "lr: 1.0e-6\nmax_steps: 500\nloss:\n  beta: 0.04\n  kl_clamp: 10.0\nrewards:\n  funcs: [format, accuracy]\n"
        "data:\n  path: d.jsonl\n  limit: 100\n",
    )
    child = write(
        tmp_path / "exp3.yaml",
        "base: base/common.yaml\nmax_steps: 50\nloss:\n  beta: 0.0\nrewards:\n  funcs: [format, cosine]\n",
    )
    cfg = load_config(TrainCfg, child, ["data.limit=3"])
    assert cfg.lr == 1e-6 and cfg.max_steps == 50
    assert cfg.loss.beta == 0.0 and cfg.loss.kl_clamp == 10.0  # merged key by key
    assert cfg.rewards.funcs == ["format", "cosine"]  # lists replace
    assert cfg.data.path == "d.jsonl" and cfg.data.limit == 3


def test_base_cycle_and_missing_base(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(TrainCfg, tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", "base: nope.yaml\n")
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(TrainCfg, tmp_path / "c.yaml")


def test_unknown_key_suggests_closest(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "bad.yaml", "loss:\n  bta: 0.1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(TrainCfg, cfg_file)
    msg = str(exc.value)
    assert "'loss.bta'" in msg and str(cfg_file) in msg
    assert "Did you mean 'loss.beta'?" in msg
    assert "kl_estimator" in msg  # lists the valid keys

    with pytest.raises(ConfigError) as exc:
        load_config(TrainCfg, None, ["data.pth=x"])
    assert "'data.pth'" in str(exc.value) and "'data.path'" in str(exc.value)
    assert "override 'data.pth=x'" in str(exc.value)

    with pytest.raises(ConfigError, match="max_steps"):
        load_config(TrainCfg, None, ["max_step=3"])


def test_unknown_key_in_base_names_base_file(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", "dta:\n  path: x\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\n")
    with pytest.raises(ConfigError) as exc:
        load_config(TrainCfg, child)
    assert "base.yaml" in str(exc.value) and "'data'" in str(exc.value)


def test_type_errors(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "t.yaml", "loss:\n  beta: lots\n")
    with pytest.raises(ConfigError) as exc:
        load_config(TrainCfg, cfg_file)
    msg = str(exc.value)
    assert "'loss.beta'" in msg and "expected float" in msg and "'lots'" in msg and str(cfg_file) in msg

    with pytest.raises(ConfigError, match=r"'max_steps'.*expected int.*2\.5"):
        load_config(TrainCfg, None, ["max_steps=2.5"])
    with pytest.raises(ConfigError, match=r"'data.shuffle'.*expected bool"):
        load_config(TrainCfg, None, ["data.shuffle=maybe"])
    with pytest.raises(ConfigError, match=r"'loss.kl_estimator'.*Literal\['k1', 'k2', 'k3'\].*'k4'"):
        load_config(TrainCfg, None, ["loss.kl_estimator=k4"])
    with pytest.raises(ConfigError, match=r"'rewards.weights\[1\]'.*expected float"):
        load_config(TrainCfg, None, ["rewards.weights=[1, x]"])
    with pytest.raises(ConfigError, match=r"'data.limit'.*int \| None"):
        load_config(TrainCfg, None, ["data.limit=many"])
    with pytest.raises(ConfigError, match=r"'loss'.*mapping"):
        load_config(TrainCfg, None, ["loss=3"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config(TrainCfg, None, ["lr.x=3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(TrainCfg, None, ["lr"])


def test_post_init_validation_runs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"beta=-1.0 must be >= 0") as exc:
        load_config(TrainCfg, None, ["loss.beta=-1"])
    assert isinstance(exc.value, ValueError)


def test_missing_required_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing required config key 'model'"):
        load_config(NeedsModel, write(tmp_path / "m.yaml", "steps: 3\n"))
    assert load_config(NeedsModel, None, ["model=qwen"]) == NeedsModel(model="qwen")


def test_save_load_round_trip(tmp_path: Path) -> None:
    cfg = TrainCfg(
        loss=LossCfg(beta=0.0, kl_estimator="k2", kl_clamp=None),
        rewards=RewardCfg(funcs=["format"], weights=[1e-7], params={"a": 0.5}),
        data=DataCfg(
            path="p.jsonl", split="1e-6", system_prompt="line1\nline2 \\boxed{{}} : yes", limit=None
        ),
        lr=1.5e-6,
        out_dir=Path("runs/y"),
        name="123",
    )
    out = save_config(cfg, tmp_path / "sub" / "cfg.yaml")
    assert not [p for p in out.parent.iterdir() if p.name != "cfg.yaml"]  # temp file gone
    again = load_config(TrainCfg, out)
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)
    assert config_to_dict(cfg)["out_dir"] == "runs/y"
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


@pytest.mark.parametrize("null", ["null", "~", "NULL"])
def test_null_override_is_none_as_in_yaml(tmp_path: Path, null: str) -> None:
    """A YAML null in an override is None (an optional field), never the string "null"."""
    cfg = load_config(
        TrainCfg, None, [f"data.system_prompt={null}", f"loss.kl_clamp={null}", "data.split=2024"]
    )
    assert cfg.data.system_prompt is None and cfg.loss.kl_clamp is None and cfg.data.split == "2024"
    with pytest.raises(ConfigError, match="'name'.*expected str, got None"):
        load_config(TrainCfg, None, [f"name={null}"])
