"""Building a Qwen2 policy from what a run or an evaluation names (the trainer and ``tools/evaluate.py``).

* :func:`resolve_model_config`: the architecture of a run. With ``model.hf_checkpoint`` set, the
  checkpoint's own ``config.json`` is the model's config; a ``model.config`` beside it must describe
  the same network, else a clear error naming both files and the differing fields (instead of a
  shape error deep in weight loading). Without a checkpoint, ``model.config`` or the default.
* :func:`checkpoint_kind`: ``"hf"`` (``config.json`` + safetensors) or ``"mcore"`` (an mcore-grpo
  Megatron checkpoint, ``mcore_grpo.json``: the converter's and the trainer's format).
* :func:`load_model`: build the Megatron model (parallel state must be initialised) and load the
  weights of either kind; the config comes from the checkpoint unless one is given.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch / Megatron load only when a model is built
    import torch

    from engine.train_config import ModelConfig, ParallelConfig
    from models.qwen.config import ActivationOptions, QwenConfig

METADATA_FILE = "mcore_grpo.json"  # models.qwen.checkpoint.METADATA_FILE (tests check they agree)


def _config_file(path: str | Path) -> Path:
    p = Path(path)
    return p / "config.json" if p.is_dir() else p


def resolve_model_config(model: ModelConfig) -> QwenConfig:
    """The run's architecture (see the module doc); raises ``ValueError`` naming both files when
    ``model.config`` and the checkpoint's ``config.json`` disagree."""
    from models.qwen.config import QwenConfig

    qcfg = QwenConfig.from_file(model.architecture_file)
    if model.config and model.hf_checkpoint:
        ckpt = QwenConfig.from_file(model.hf_checkpoint)
        mine, theirs = dataclasses.asdict(qcfg), dataclasses.asdict(ckpt)
        diff = [f"{k}: {mine[k]!r} vs {theirs[k]!r}" for k in mine if mine[k] != theirs.get(k)]
        if diff:
            raise ValueError(
                f"model.config {_config_file(model.config)} disagrees with model.hf_checkpoint's "
                f"{_config_file(model.hf_checkpoint)} ({'; '.join(diff)}): the checkpoint's config.json is the "
                "model's config, so leave model.config unset (model.config=null) or point it at the same network"
            )
        qcfg = ckpt
    return qcfg


def checkpoint_kind(path: str | Path, label: str = "model") -> str:
    """``"mcore"`` (``mcore_grpo.json``), ``"hf"`` (``config.json``), else a clear error that names the
    path as ``label`` (e.g. ``--model``)."""
    d = Path(path)
    if not d.exists():
        raise FileNotFoundError(f"{label} {d} does not exist")
    if not d.is_dir():
        raise ValueError(
            f"{label} {d} is not a directory (expected an HF model dir or a Megatron checkpoint)"
        )
    if (d / METADATA_FILE).is_file():
        return "mcore"
    if (d / "config.json").is_file():
        return "hf"
    raise ValueError(
        f"{label} {d}: neither an HF model dir (no config.json) nor an mcore-grpo checkpoint (no {METADATA_FILE})"
    )


def load_model(
    path: str | Path,
    dtype: torch.dtype,
    *,
    qcfg: QwenConfig | None = None,
    perform_initialization: bool = False,
    activations: ActivationOptions | None = None,
) -> tuple[torch.nn.Module, QwenConfig]:
    """(model, config) with the weights of the HF dir or Megatron checkpoint ``path`` loaded (every TP
    rank its shards). ``qcfg`` defaults to the checkpoint's own config; ``perform_initialization``
    runs Megatron's init first (keeps the RNG streams of a run that used to init, then load)."""
    from models.qwen.checkpoint import (
        SafetensorsReader,
        checkpoint_config,
        load_mcore_checkpoint,
        read_checkpoint_metadata,
    )
    from models.qwen.config import QwenConfig
    from models.qwen.model import build_model, load_hf_weights

    kind = checkpoint_kind(path)
    if qcfg is None:
        if kind == "mcore":
            qcfg = checkpoint_config(read_checkpoint_metadata(path), f"{path}/{METADATA_FILE}")
        else:
            qcfg = QwenConfig.from_file(path)
    model = build_model(qcfg, dtype, perform_initialization=perform_initialization, activations=activations)
    if kind == "mcore":
        load_mcore_checkpoint(model, path)
    else:
        reader = SafetensorsReader(str(path))
        reader.check(qcfg)  # every tensor with its shape, named, before any is loaded
        load_hf_weights(model, qcfg, reader)
    return model, qcfg


def activation_options(par: ParallelConfig) -> ActivationOptions:
    """The policy model's activation layout from the ``parallel`` section (sequence parallelism,
    recomputation): what ``build_model`` and the memory plan both take."""
    from models.qwen.config import ActivationOptions

    return ActivationOptions(
        par.sequence_parallel, par.recompute_granularity, par.recompute_method, par.recompute_num_layers,
        tuple(par.recompute_modules),
    )  # fmt: skip
