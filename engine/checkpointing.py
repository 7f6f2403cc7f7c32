"""Training checkpoints: save every N steps, keep the last K, resume exactly.

A training checkpoint is a Megatron model checkpoint (``models.qwen.checkpoint``: the same format the
converter reads, so ``tools/convert_checkpoint.py mcore-to-hf`` exports it directly) with, inside
the same atomically renamed directory:

- ``trainer_state/optim_tp<r>.pt``: Adam moments (and, on GPU, the fp32 master weights) keyed by
  Megatron parameter name, full over DP (the distributed optimizer's shards are gathered first),
  plus the LR scheduler, one file per TP rank (DP rank 0 writes). Keyed by name, they reshard to
  another TP through the one weight mapping, and any DP size can resume.
- ``trainer_state/rng_rank<g>.pt``: every rank's RNG states (restored when the world size matches;
  sampling seeds derive from the step, so a different layout still resumes deterministically).
- ``ref/``: the frozen KL reference when it cannot be rebuilt from ``model.hf_checkpoint``.
- metadata ``extra``: step, weight version, data position, layout.

``<dir>/latest`` names the newest complete checkpoint; it is replaced (temp file + rename) only
after the checkpoint directory itself is published, and old checkpoints are pruned after that. A
process killed mid-save leaves ``latest`` and the previous checkpoint untouched, plus its partial
``step_<N>.tmp-<pid>`` (for the 1.5B with optimizer state, 10+ GB): on start and before each save,
the partial writes of processes no longer alive on this host are removed, one log line each
(``models.atomic_io.remove_stale_partials``; a live writer's, e.g. a concurrent save, is kept).
``keep_last`` counts complete checkpoints only (``step_<N>`` holding its metadata file).
"""

from __future__ import annotations

import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from models.atomic_io import atomic_write, remove_stale_partials
from models.qwen.checkpoint import (
    METADATA_FILE,
    load_mcore_checkpoint,
    read_checkpoint_metadata,
    save_mcore_checkpoint,
)
from models.qwen.hf_mapping import merge_tp_shards, rules, split_tp, to_local_name
from models.qwen.model import unwrap
from parallel.collectives import barrier
from parallel.distributed import dp_rank, is_main_rank, tp_rank, tp_size

if TYPE_CHECKING:
    from engine.trainer import GRPOTrainer

STATE_DIR = "trainer_state"
STEP_DIR = re.compile(r"step_(\d{6,})$")


def _named_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {to_local_name(n): p for n, p in unwrap(model).named_parameters()}


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(s: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(s["tracker"])


class TrainCheckpointer:
    def __init__(
        self,
        root: str | Path,
        keep_last: int,
        hf_assets_from: str | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.hf_assets_from = hf_assets_from
        self.log = log

    def remove_stale_partials(self) -> list[Path]:
        """Main rank: delete the partial writes (``*.tmp-<pid>``) of writers no longer alive (the
        trainer calls it on start; :meth:`save` before each save)."""
        return remove_stale_partials(self.root, log=self.log) if is_main_rank() else []

    # ---- save ----------------------------------------------------------------------------------
    def save(self, trainer: GRPOTrainer) -> Path:
        """Collective. Writes ``<root>/step_<N>`` atomically, then points ``latest`` at it."""
        out = self.root / f"step_{trainer.step:06d}"
        extra = {
            "step": trainer.step,
            "weight_version": trainer.weight_version,
            "sampler": trainer.sampler.state_dict(),
            "tensor_parallel": tp_size(),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        }

        optim_state = self._optimizer_state(trainer)  # collective over DP (distributed optimizer)
        self.remove_stale_partials()

        def write_state(tmp: Path) -> None:
            d = tmp / STATE_DIR
            d.mkdir(exist_ok=True)
            if dp_rank() == 0:
                torch.save(optim_state, d / f"optim_tp{tp_rank()}.pt")
            rank = dist.get_rank() if dist.is_initialized() else 0
            torch.save(_rng_state(), d / f"rng_rank{rank:05d}.pt")
            if trainer.ref_model is not None and not trainer.cfg.model.hf_checkpoint:
                save_mcore_checkpoint(trainer.ref_model, trainer.qcfg, tmp / "ref")

        save_mcore_checkpoint(
            trainer.model, trainer.qcfg, out, extra=extra, overwrite=True,
            hf_assets_from=self.hf_assets_from, write_extra=write_state,
        )  # fmt: skip
        if is_main_rank():
            atomic_write(self.root / "latest", out.name + "\n")
            self._prune()
        barrier()
        return out

    def _optimizer_state(self, trainer: GRPOTrainer) -> dict[str, Any]:
        """Adam state by parameter name (CPU and GPU alike, see engine.optimizer) + LR schedule."""
        return {
            "tp": tp_size(),
            "scheduler": trainer.scheduler.state_dict(),
            "params": trainer.optimizer.named_state(_named_params(trainer.model)),
        }

    def complete(self) -> list[Path]:
        """The complete checkpoints, oldest first (a partial write is never ``step_<N>`` itself)."""
        if not self.root.is_dir():
            return []
        return sorted(
            p
            for p in self.root.iterdir()
            if p.is_dir() and STEP_DIR.fullmatch(p.name) and (p / METADATA_FILE).is_file()
        )

    def _prune(self) -> None:
        steps = self.complete()
        for old in steps[: max(0, len(steps) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    # ---- resume --------------------------------------------------------------------------------
    def latest(self) -> Path | None:
        f = self.root / "latest"
        if not f.exists():
            return None
        p = self.root / f.read_text().strip()
        if not p.is_dir():
            raise FileNotFoundError(f"{f} points at {p}, which does not exist")
        return p

    def load(self, trainer: GRPOTrainer, path: str | Path) -> dict[str, Any]:
        """Collective. Restores model, reference, optimizer, scheduler, RNG, data position, step."""
        path = Path(path)
        meta = read_checkpoint_metadata(path)
        extra = meta.get("extra") or {}
        for key in ("step", "weight_version", "sampler"):
            if key not in extra:
                raise KeyError(f"{path}: not a training checkpoint (metadata extra lacks {key!r})")
        load_mcore_checkpoint(trainer.model, path)
        if trainer.ref_model is not None and (path / "ref").is_dir():
            load_mcore_checkpoint(trainer.ref_model, path / "ref")
        self._load_optimizer(trainer, path / STATE_DIR)
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        rng = path / STATE_DIR / f"rng_rank{rank:05d}.pt"
        if extra.get("world_size") == world and rng.exists():
            _set_rng_state(torch.load(rng, weights_only=False))
        trainer.sampler.load_state_dict(extra["sampler"])
        trainer.step = int(extra["step"])
        trainer.weight_version = int(extra["weight_version"])
        # The generator must serve the resumed weights before its first rollout (trl #3185).
        trainer.generator.sync_weights(trainer.model, trainer.weight_version)
        return meta

    def _load_optimizer(self, trainer: GRPOTrainer, d: Path) -> None:
        files = sorted(d.glob("optim_tp*.pt"))
        if not files:
            raise FileNotFoundError(f"{d}: no optimizer state (optim_tp*.pt)")
        saved_tp = len(files)
        mine = torch.load(d / f"optim_tp{min(tp_rank(), saved_tp - 1)}.pt", weights_only=False)
        trainer.scheduler.load_state_dict(mine["scheduler"])
        if "params" not in mine:
            raise KeyError(f"{d}: optimizer state in an unknown format (keys {sorted(mine)})")
        if saved_tp == tp_size():
            per_name = mine["params"]
        else:
            per_name = self._reshard(trainer, [torch.load(f, weights_only=False)["params"] for f in files])
        params = _named_params(trainer.model)
        missing = sorted(set(params) - set(per_name))
        if missing:
            raise KeyError(f"{d}: optimizer state lacks parameters {missing[:5]}")
        trainer.optimizer.load_named_state(params, per_name)

    def _reshard(self, trainer: GRPOTrainer, shards: list[dict[str, Any]]) -> dict[str, Any]:
        """Adam moments saved at TP=len(shards) -> this rank's shards at the current TP."""
        cfg, tp, r = trainer.qcfg, tp_size(), tp_rank()
        out: dict[str, Any] = {}
        for rule in rules(cfg):
            states = [s[rule.mcore] for s in shards]
            new: dict[str, Any] = {}
            for k, v in states[0].items():
                if not torch.is_tensor(v) or v.dim() == 0:
                    new[k] = v
                    continue
                full = merge_tp_shards(rule, [s[k] for s in states])
                if rule.kind == "vocab":  # padding depends on TP: strip, then pad for the new TP
                    padded = torch.zeros((cfg.padded_vocab_size(tp), *full.shape[1:]), dtype=full.dtype)
                    padded[: cfg.vocab_size] = full[: cfg.vocab_size]
                    full = padded
                new[k] = split_tp(rule, full, tp)[r].clone()
            out[rule.mcore] = new
        return out
