"""Checkpoint formats: HF safetensors and Megatron-Core ``dist_checkpointing`` (torch_dist), both ways.

Used by ``tools/convert_checkpoint.py`` and by the GRPO trainer for its own checkpoints. Every
``dist_checkpointing`` call site of the project is in this module.

Megatron checkpoint = a torch_dist directory written from the model's ``sharded_state_dict()`` (so
the trainer loads it with :func:`load_mcore_checkpoint` at any TP size) plus ``mcore_grpo.json``
(format version, HF config, TP size, dtype, free-form ``extra``) and ``hf_assets/`` (tokenizer and
generation config copied from the source HF dir, so an export needs nothing else).

The stored tensors do not depend on the TP size:

- Megatron's sharded keys already describe TP-independent global tensors: the fused QKV is
  grouped per query group (the TP=1 layout), and the SwiGLU ``linear_fc1`` factory stores gate and
  up as separate halves of a ``[all gate; all up]`` global tensor, which is also the TP=1 layout.
- The vocab is padded to a multiple of 128 * TP, so Megatron would store a TP-dependent number of
  embedding / output rows (151936 at TP1 vs 152064 at TP2 for the real model). We store the real
  ``vocab_size`` rows only (each rank its rows below ``vocab_size``: an uneven sharding that
  dist_checkpointing hands to PyTorch DCP). On load, Megatron marks these tensors
  ``allow_shape_mismatch``: it zero-fills the local padded shard and reads the rows that exist,
  so the padding rows are zero after every load whatever the TP.

Hence resharding is a plain load at the new TP and save; a checkpoint written by one process (TP=1
layout) loads at TP=2 and vice versa, and ``tensor_parallel`` in the metadata records the size the
checkpoint was written for, not a constraint.

Outputs are written into ``<out>.tmp-<pid>`` next to ``out`` and renamed when complete; an existing
``out`` is only replaced with ``overwrite`` and only removed once the new one is in place.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist

from models.atomic_io import partial_dir, remove_stale_partials
from models.qwen.config import DTYPES, HF_DTYPE_NAMES, QwenConfig, parse_dtype
from models.qwen.hf_mapping import (
    Rule,
    check_hf_tensors,
    hf_names,
    hf_shape,
    hf_to_mcore_shard,
    mcore_full_to_hf,
    mcore_shard_shape,
    rules,
    to_te_name,
)
from parallel.collectives import barrier, broadcast_object

FORMAT_NAME = "mcore_grpo"
FORMAT_VERSION = 1
METADATA_FILE = "mcore_grpo.json"
ASSETS_DIR = "hf_assets"
# Tokenizer and generation files copied along with the weights (whichever exist).
HF_ASSET_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
SAFETENSORS_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
DTYPE_SHORT = {v: k for k, v in DTYPES.items()}  # torch.bfloat16 -> "bf16"
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_ST_TO_TORCH = {v: k for k, v in _ST_DTYPES.items()}
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


class CheckpointError(ValueError):
    """A checkpoint (or output location) that cannot be used, with the file / key at fault."""


# ---- distributed helpers (everything also works without torch.distributed) -------------
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


# ---- atomic output directories ---------------------------------------------------------
def _looks_like_checkpoint(path: Path) -> bool:
    if not path.is_dir():
        return False
    names = {p.name for p in path.iterdir()}
    return (
        not names
        or METADATA_FILE in names
        or "config.json" in names
        or any(n.endswith(".distcp") for n in names)
    )


def check_output_dir(out_dir: str | Path, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite`` (and even then only a checkpoint-like dir)."""
    out = Path(out_dir)
    if not out.exists():
        return
    if not overwrite:
        raise FileExistsError(f"output {out} already exists; pass --overwrite to replace it")
    if not _looks_like_checkpoint(out):
        raise CheckpointError(
            f"refusing to overwrite {out}: it is not a directory holding a checkpoint "
            f"(no {METADATA_FILE}, config.json or *.distcp)"
        )


@contextlib.contextmanager
def atomic_output_dir(
    out_dir: str | Path, *, overwrite: bool = False, collective: bool = True
) -> Iterator[Path]:
    """Yield an empty temporary dir next to ``out_dir`` that becomes ``out_dir`` on success.

    ``collective``: every rank enters (rank 0 creates, renames and cleans up); otherwise only the
    calling process takes part. On an exception the temporary dir is removed and ``out_dir`` is
    untouched; a killed run leaves only ``<out>.tmp-<pid>``, removed by the next run.
    """
    out = Path(out_dir).absolute()
    check_output_dir(out, overwrite)
    lead = _rank() == 0 or not collective
    tmp: Path | None = None
    if lead:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(out.parent, out.name)  # a killed run's <out>.tmp-<pid>
        tmp = partial_dir(out)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    if collective:
        tmp = Path(broadcast_object(str(tmp) if tmp else None))
    assert tmp is not None
    try:
        yield tmp
        if collective:
            barrier()
        if lead:
            _publish(tmp, out, overwrite)
        if collective:
            barrier()
    except BaseException:
        if lead:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    check_output_dir(out, overwrite)  # it may have appeared meanwhile
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    os.replace(out, old)  # the new checkpoint is complete: only now move the old one away
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# ---- HF safetensors: reading -----------------------------------------------------------
class SafetensorsReader:
    """An ``HFReader`` over an HF model dir (``model.safetensors`` or shards + index), read lazily.

    Headers are parsed up front (names, shapes, dtypes; a corrupt file fails here, naming it).
    ``safe_open`` memory-maps the file: a slice that is contiguous in the file (whole tensors, row
    ranges) comes back as a zero-copy view whose pages are read when first touched and stay page
    cache, so a single-process conversion does not hold a second copy of the model in anonymous
    memory. Column slices (row-parallel weights at TP > 1) are copies of the rows' columns.
    """

    def __init__(self, hf_dir: str | Path) -> None:
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"HF checkpoint dir {self.dir} does not exist")
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        index = self.dir / SAFETENSORS_INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
            files = sorted(set(weight_map.values()))
        elif (self.dir / "model.safetensors").exists():
            weight_map, files = None, ["model.safetensors"]
        else:
            weight_map, files = None, sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            other = sorted(p.name for p in self.dir.glob("*.bin"))
            hint = f" (found {other}: only safetensors checkpoints are supported)" if other else ""
            raise FileNotFoundError(f"{self.dir}: no model.safetensors or {SAFETENSORS_INDEX}{hint}")
        for fname in files:
            self._scan(self.dir / fname)
        if weight_map is not None:
            for name, fname in weight_map.items():
                if self.files.get(name) != self.dir / fname:
                    raise CheckpointError(
                        f"{index}: lists tensor {name!r} in {fname}, which does not contain it"
                    )

    def _scan(self, path: Path) -> None:
        from safetensors import safe_open

        if not path.exists():
            raise FileNotFoundError(f"{path}: listed in {SAFETENSORS_INDEX} but missing")
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    sl = f.get_slice(name)
                    if name in self.files:
                        raise CheckpointError(f"tensor {name!r} is in both {self.files[name]} and {path}")
                    self.files[name] = path
                    self.shapes[name] = tuple(sl.get_shape())
                    st_dtype = sl.get_dtype()
                    if st_dtype not in _ST_TO_TORCH:
                        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {st_dtype}")
                    self.dtypes[name] = _ST_TO_TORCH[st_dtype]
        except CheckpointError:
            raise
        except Exception as e:  # SafetensorError / OSError: the header is unreadable
            raise CheckpointError(f"{path}: corrupted or not a safetensors file ({e})") from e

    @property
    def names(self) -> list[str]:
        return list(self.files)

    def check(self, cfg: QwenConfig) -> None:
        """Every tensor the config needs, with its shape, and nothing unexpected."""
        check_hf_tensors(cfg, self.shapes, source=str(self.dir))

    def __call__(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.files:
            raise KeyError(f"{self.dir}: HF checkpoint is missing tensor {name!r}")
        with safe_open(self.files[name], framework="pt") as f:
            return f.get_slice(name)[index]


# ---- HF safetensors: writing -----------------------------------------------------------
class _StreamingSafetensorsFile:
    """A safetensors file whose header is written first from a plan, then tensors one at a time.

    ``safetensors.torch.save_file`` needs every tensor of a shard in memory (and copies them to
    bytes); this keeps one tensor at a time.
    """

    def __init__(self, path: Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        self.slots: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}
        offset = 0
        for name, shape, dtype in plan:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {
                "dtype": _ST_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self.slots[name] = (offset, shape, dtype)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self.path = path
        self.base = 8 + len(raw)
        self.f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.f.truncate(self.base + offset)
        self.pending = set(self.slots)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        offset, shape, dtype = self.slots[name]
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}")
        t = tensor.detach().to("cpu", dtype).contiguous().reshape(-1)
        self.f.seek(self.base + offset)
        self.f.write(memoryview(t.view(torch.uint8).numpy()))
        self.pending.discard(name)

    def close(self) -> None:
        self.f.close()


def _hf_config_dict(cfg: QwenConfig, dtype: torch.dtype) -> dict[str, Any]:
    d = cfg.to_hf_dict()
    d["architectures"] = ["Qwen2ForCausalLM"]
    d["torch_dtype"] = d["dtype"] = HF_DTYPE_NAMES[dtype]  # transformers 4 / 5 and vLLM
    return d


def _copy_assets(sources: Iterable[str | Path | None], dest: Path) -> list[str]:
    """Copy the HF tokenizer / generation files from the first source dir that has any."""
    for src in sources:
        if src is None or not Path(src).is_dir():
            continue
        found = [n for n in HF_ASSET_FILES if (Path(src) / n).is_file()]
        if found:
            dest.mkdir(parents=True, exist_ok=True)
            for n in found:
                shutil.copy2(Path(src) / n, dest / n)
            return found
    return []


def save_hf_checkpoint(
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    cfg: QwenConfig,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    assets_from: Iterable[str | Path | None] = (),
) -> Path:
    """Write an HF model dir (vLLM / ``from_pretrained`` ready): config.json, generation_config.json,
    ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + index, tokenizer files.

    ``tensors``: HF name -> tensor (a dict, or pairs in any order, consumed one at a time: e.g. a
    generator reading a Megatron checkpoint). Names and shapes must be exactly those of ``cfg``.
    ``dtype``: output dtype (default: the first tensor's). Single process: call it on one rank.
    """
    items = iter(tensors.items() if isinstance(tensors, Mapping) else tensors)
    first = next(items, None)
    if first is None:
        raise CheckpointError("save_hf_checkpoint: no tensors given")
    out_dtype = parse_dtype(dtype) if dtype is not None else first[1].dtype
    if out_dtype not in _ST_DTYPES:
        raise CheckpointError(f"unsupported output dtype {out_dtype}")

    # Shard plan from the config alone, so the headers can be written before any tensor arrives.
    shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
    size = 0
    for name in hf_names(cfg):
        shape = hf_shape(cfg, name)
        nbytes = math.prod(shape) * out_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape, out_dtype))
        size += nbytes
    n = len(shards)
    fnames = (
        ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )

    with atomic_output_dir(out_dir, overwrite=overwrite, collective=False) as tmp:
        files = [_StreamingSafetensorsFile(tmp / f, plan) for f, plan in zip(fnames, shards, strict=True)]
        where = {name: fh for fh in files for name in fh.slots}
        try:
            for name, tensor in _chain(first, items):
                if name not in where:
                    raise CheckpointError(
                        f"unexpected tensor {name!r} for this config ({len(where)} expected)"
                    )
                where[name].write(name, tensor)
        finally:
            for fh in files:
                fh.close()
        missing = [name for fh in files for name in sorted(fh.pending)]
        if missing:
            raise CheckpointError(f"missing {len(missing)} tensor(s): {missing[:8]}")
        if n > 1:
            total = sum(math.prod(s) * d.itemsize for plan in shards for _, s, d in plan)
            index = {
                "metadata": {"total_size": total},
                "weight_map": {
                    name: f for f, plan in zip(fnames, shards, strict=True) for name, _, _ in plan
                },
            }
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        copied = _copy_assets(assets_from, tmp)
        if "generation_config.json" not in copied:
            gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(_hf_config_dict(cfg, out_dtype), indent=2) + "\n")
    return Path(out_dir)


def _chain(first: tuple[str, torch.Tensor], rest: Iterator[tuple[str, torch.Tensor]]):
    yield first
    yield from rest


# ---- Megatron checkpoint: metadata -----------------------------------------------------
def read_checkpoint_metadata(ckpt_dir: str | Path) -> dict[str, Any]:
    """The ``mcore_grpo.json`` of a Megatron checkpoint, validated (format name and version)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"Megatron checkpoint dir {d} does not exist")
    path = d / METADATA_FILE
    if not path.exists():
        raise CheckpointError(f"{d}: not an mcore-grpo checkpoint (no {METADATA_FILE})")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r} is not supported (<= {FORMAT_VERSION})")
    for key in ("config", "tensor_parallel", "dtype"):
        if key not in meta:
            raise CheckpointError(f"{path}: missing key {key!r}")
    return meta


def checkpoint_config(meta: dict[str, Any], source: str = METADATA_FILE) -> QwenConfig:
    """The model config stored in a checkpoint's metadata."""
    return QwenConfig.from_hf_dict(meta["config"], source=f"{source} config")


def _write_metadata(
    tmp: Path,
    cfg: QwenConfig,
    *,
    tp: int,
    dtype: torch.dtype,
    extra: dict[str, Any] | None,
    source_hf_dir: str | None,
) -> None:
    from megatron.core import package_info

    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "backend": "megatron.core.dist_checkpointing/torch_dist",
        "megatron_core": package_info.__version__,
        "tensor_parallel": tp,
        "dtype": DTYPE_SHORT[dtype],
        "vocab": "real rows only (padding to 128 * TP is re-added as zeros on load)",
        "config": _hf_config_dict(cfg, dtype),
        "source_hf_dir": source_hf_dir,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "extra": dict(extra or {}),
    }
    (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")


# ---- Megatron checkpoint: keys and shapes ----------------------------------------------
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


def dist_key(rule: Rule) -> tuple[str, int | None]:
    """The sharded-state-dict key of a parameter (layers stacked on a leading axis) and its layer.

    Megatron names the norms as Transformer-Engine does, whatever the layer spec.
    """
    name = to_te_name(rule.mcore)
    m = _LAYER.fullmatch(name)
    return (f"decoder.layers.{m.group(2)}", int(m.group(1))) if m else (name, None)


def expected_global_shapes(cfg: QwenConfig) -> dict[str, tuple[int, ...]]:
    """Global shape of every stored tensor for this config (vocab tensors unpadded)."""
    out: dict[str, tuple[int, ...]] = {}
    for rule in rules(cfg):
        key, layer = dist_key(rule)
        if rule.kind == "vocab":
            out[key] = (cfg.vocab_size, cfg.hidden_size)
        elif layer is None:
            out[key] = mcore_shard_shape(cfg, rule, 1)
        else:
            out[key] = (cfg.num_hidden_layers, *mcore_shard_shape(cfg, rule, 1))
    return out


def _stored_tensors(ckpt_dir: Path, cfg: QwenConfig) -> dict[str, Any]:
    """The checkpoint's tensor metadata, checked against ``cfg`` (names the key and both shapes)."""
    from megatron.core import dist_checkpointing

    try:
        stored = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    except Exception as e:  # missing / corrupt .metadata
        raise CheckpointError(f"{ckpt_dir}: cannot read the dist_checkpointing metadata ({e})") from e
    want = expected_global_shapes(cfg)
    problems = [f"missing tensor {k!r} (expected shape {s})" for k, s in want.items() if k not in stored]
    for k, sh in stored.items():
        if k.startswith(("embedding.", "decoder.", "output_layer.")) and k not in want:
            problems.append(f"unexpected tensor {k!r} with shape {tuple(sh.global_shape)}")
    for k, s in want.items():
        if k in stored:
            got = tuple(stored[k].global_shape)
            # Vocab tensors written by plain Megatron keep their padding rows: accept them.
            ok = got == s or (k in VOCAB_KEYS and got[1:] == s[1:] and got[0] >= s[0])
            if not ok:
                problems.append(f"tensor {k!r} has shape {got}, expected {s}")
    if problems:
        raise CheckpointError(f"{ckpt_dir}: does not match its config: " + "; ".join(problems[:10]))
    return stored


# ---- Megatron checkpoint: sharded state dicts ------------------------------------------
def _real_vocab_rows(st, vocab_size: int):
    """This rank's part of a vocab-parallel ShardedTensor restricted to rows < vocab_size.

    None when the rank holds padding only. Uneven shards (no regular grid) are validated by DCP.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    lo, rows = st.global_offset[0], st.local_shape[0]
    n = max(0, min(rows, vocab_size - lo))
    if n == 0:
        return None
    return ShardedTensor(
        key=st.key,
        data=None if st.data is None else st.data[:n],
        dtype=st.dtype,
        local_shape=(n, *st.local_shape[1:]),
        global_shape=(vocab_size, *st.global_shape[1:]),
        global_offset=st.global_offset,
        axis_fragmentations=None,
        replica_id=st.replica_id,
        allow_shape_mismatch=True,  # accept padded stored tensors too (plain Megatron checkpoints)
    )


def _flatten_sharded(sd: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """Model sharded state dict -> {name: ShardedTensor | [ShardedTensor, ...] | ShardedObject},
    factories built (fc1 -> [gate part, up part]) and vocab tensors cut to the real rows."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    out: dict[str, Any] = {}
    for name, v in sd.items():
        if isinstance(v, ShardedTensorFactory):
            v = v.build()
        if name.endswith(VOCAB_KEYS):
            v = _real_vocab_rows(v, vocab_size)
            if v is None:
                continue
        out[name] = v
    return out


def _template(cfg: QwenConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The sharded state dict a model of this config would save on this rank, data on meta.

    Built from a meta-device model (local spec, CPU flags) so keys, global shapes, offsets, replica
    ids and the extra-state objects are exactly Megatron's, without allocating any weights.
    """
    from models.qwen.model import build_model

    with torch.device("meta"), mock.patch("torch.cuda.is_available", return_value=False):
        model = build_model(cfg, params_dtype=dtype, use_te=False, perform_initialization=False)
    return _flatten_sharded(model.sharded_state_dict(), cfg.vocab_size)


def _pieces(entry: Any) -> list[Any]:
    return entry if isinstance(entry, list) else [entry]


def _with_data(entry: Any, datas: list[torch.Tensor]) -> Any:
    new = [replace(st, data=d, dtype=d.dtype) for st, d in zip(_pieces(entry), datas, strict=True)]
    return new if isinstance(entry, list) else new[0]


def _is_main_replica(replica_id: Any) -> bool:
    from megatron.core.dist_checkpointing.mapping import is_main_replica

    return is_main_replica(replica_id)


def _tp_layout() -> tuple[int, int]:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("call parallel.distributed.init_distributed(tp) first")
    return (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_rank(),
    )


def _check_layout(tp: int) -> int:
    """The TP layout actually used: ``tp`` under torchrun, or 1 in a single process."""
    layout, _ = _tp_layout()
    if layout not in (1, tp):
        raise CheckpointError(f"target tensor_parallel={tp} but the process group is set up for TP={layout}")
    return layout


def _dist_save(state: dict[str, Any], path: Path) -> None:
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(state, str(path))


def _dist_load(state: dict[str, Any], path: Path, *, partial: bool = False) -> dict[str, Any]:
    """``partial``: the request covers part of the stored tensors (one layer), so skip Megatron's
    check that the ranks' requests cover every tensor exactly once."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load(state, str(path), validate_access_integrity=not partial)


# ---- Megatron checkpoint: model API (the trainer) --------------------------------------
def save_mcore_checkpoint(
    model: torch.nn.Module,
    cfg: QwenConfig,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
    hf_assets_from: str | Path | None = None,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Save a (DDP-wrapped or bare) Megatron model. Collective: every rank calls it.

    ``dtype``: stored dtype (default: the parameters'); ``extra``: free-form JSON metadata (step,
    data position, ...); ``hf_assets_from``: an HF dir whose tokenizer files travel along;
    ``write_extra(tmp_dir)``: called on every rank inside the not-yet-published directory, so
    trainer state (optimizer, RNG) is part of the same atomic rename.
    """
    from models.qwen.model import unwrap

    gpt = unwrap(model)
    tp, _ = _tp_layout()
    param_dtype = next(gpt.parameters()).dtype
    dtype = parse_dtype(dtype) if dtype is not None else param_dtype
    state = _flatten_sharded(gpt.sharded_state_dict(), cfg.vocab_size)
    if dtype != param_dtype:
        for name, entry in state.items():
            if _is_tensor_entry(entry):
                state[name] = _with_data(entry, [p.data.to(dtype) for p in _pieces(entry)])
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        _dist_save(state, tmp)
        if write_extra is not None:
            write_extra(tmp)
        if _rank() == 0:
            _copy_assets([hf_assets_from], tmp / ASSETS_DIR)
            _write_metadata(tmp, cfg, tp=tp, dtype=dtype, extra=extra, source_hf_dir=_str(hf_assets_from))
    return Path(out_dir)


def _str(p: str | Path | None) -> str | None:
    return None if p is None else str(Path(p).absolute())


def load_mcore_checkpoint(model: torch.nn.Module, ckpt_dir: str | Path) -> dict[str, Any]:
    """Load a checkpoint into a model at the current TP size (any TP that fits the heads).

    Collective. Returns the metadata (``extra`` holds what the trainer saved). Padded vocab rows
    come back as zeros. Stored and parameter dtypes may differ (values are cast).
    """
    from models.qwen.model import unwrap

    ckpt = Path(ckpt_dir)
    meta = read_checkpoint_metadata(ckpt)
    cfg = checkpoint_config(meta, str(ckpt / METADATA_FILE))
    gpt = unwrap(model)
    tc = gpt.config
    mine = {
        "num_hidden_layers": tc.num_layers,
        "hidden_size": tc.hidden_size,
        "intermediate_size": tc.ffn_hidden_size,
        "num_attention_heads": tc.num_attention_heads,
        "num_key_value_heads": tc.num_query_groups,
    }
    diff = [
        f"{k}: checkpoint {getattr(cfg, k)} vs model {v}" for k, v in mine.items() if getattr(cfg, k) != v
    ]
    if bool(gpt.share_embeddings_and_output_weights) != cfg.tie_word_embeddings:
        diff.append(
            f"tie_word_embeddings: checkpoint {cfg.tie_word_embeddings} vs model {gpt.share_embeddings_and_output_weights}"
        )
    if gpt.vocab_size < cfg.vocab_size:
        diff.append(f"vocab_size: checkpoint {cfg.vocab_size} vs model {gpt.vocab_size}")
    if diff:
        raise CheckpointError(f"{ckpt}: checkpoint does not fit the model: " + "; ".join(diff))
    _stored_tensors(ckpt, cfg)
    # Megatron's own sharded dict: its vocab tensors allow a shape mismatch, so the stored real
    # rows land in the padded local shards (padding zero-filled).
    loaded = _dist_load(gpt.sharded_state_dict(), ckpt)
    gpt.load_state_dict(loaded)
    return meta


# ---- Megatron checkpoint: model-free conversions ---------------------------------------
def hf_to_mcore_checkpoint(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    tp: int,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """HF safetensors dir -> Megatron checkpoint for ``tp``. Collective.

    Under torchrun at TP=tp each rank reads only the slices of its shard; in a single process the
    whole model is read once (the stored tensors are the same either way). No model is built: the
    rank's tensors are cut by the mapping and saved with the template of a meta-device model.
    Everything is validated before anything is written. ``dtype``: default the HF tensors' dtype.
    """
    hf_dir = Path(hf_dir)
    cfg = QwenConfig.from_file(hf_dir)
    cfg.check_tp(tp)
    check_output_dir(out_dir, overwrite)
    reader = SafetensorsReader(hf_dir)
    reader.check(cfg)
    dtype = parse_dtype(dtype) if dtype is not None else reader.dtypes["model.embed_tokens.weight"]
    layout = _check_layout(tp)
    _, rank = _tp_layout()
    template = _template(cfg, dtype)

    state: dict[str, Any] = {k: v for k, v in template.items() if not _is_tensor_entry(v)}
    for rule in rules(cfg):
        name = _entry_name(template, rule)
        if name is None:
            continue  # a vocab shard made of padding only
        entry = template[name]
        pieces = _pieces(entry)
        if not any(_is_main_replica(p.replica_id) for p in pieces):
            # Another rank stores it: keep the shape, allocate nothing (a stride-0 zero).
            datas = [torch.zeros((), dtype=dtype).expand(p.local_shape) for p in pieces]
        elif rule.kind == "vocab":
            lo, n = pieces[0].global_offset[0], pieces[0].local_shape[0]
            datas = [reader(rule.hf[0], (slice(lo, lo + n),))]
        elif rule.kind == "fc1":  # gate and up rows of this rank, kept apart like the factory's halves
            datas = [
                hf_to_mcore_shard(cfg, Rule(rule.mcore, (h,), "column"), reader, layout, rank)
                for h in rule.hf
            ]
        else:
            datas = [hf_to_mcore_shard(cfg, rule, reader, layout, rank)]
        state[name] = _with_data(entry, [_compact(d.to(dtype).contiguous()) for d in datas])

    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        _dist_save(state, tmp)
        if _rank() == 0:
            _copy_assets([hf_dir], tmp / ASSETS_DIR)
            _write_metadata(tmp, cfg, tp=tp, dtype=dtype, extra=extra, source_hf_dir=_str(hf_dir))
    return Path(out_dir)


def _compact(t: torch.Tensor) -> torch.Tensor:
    """Own copy of a tensor that views a larger storage (a slice of a memory-mapped HF tensor).

    Whole tensors stay zero-copy views of the file. A slice would be cloned by the checkpoint
    writer anyway, but only after every slice was read, with the file pages it touched still mapped
    (and counted as resident) until then: copying now lets each mapping go at once.
    """
    return t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t


def _is_tensor_entry(v: Any) -> bool:
    """ShardedTensor or a built factory's list of them (not a ShardedObject)."""
    return isinstance(v, list) or hasattr(v, "local_shape")


def _entry_name(template: dict[str, Any], rule: Rule) -> str | None:
    for name in (rule.mcore, to_te_name(rule.mcore)):
        if name in template:
            return name
    if rule.kind == "vocab":
        return None
    raise CheckpointError(f"Megatron model has no parameter {rule.mcore!r} (mapping and model disagree)")


def iter_mcore_hf_tensors(ckpt_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream a Megatron checkpoint as HF (name, tensor) pairs, one layer in memory at a time.

    Reads the stored global tensors directly (no model, no TP layout needed). Collective: under
    torchrun every rank must iterate it to the end.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    ckpt = Path(ckpt_dir)
    meta = read_checkpoint_metadata(ckpt)
    cfg = checkpoint_config(meta, str(ckpt / METADATA_FILE))
    stored = _stored_tensors(ckpt, cfg)
    groups: dict[Any, list[Rule]] = {}
    for rule in rules(cfg):
        key, layer = dist_key(rule)
        groups.setdefault(layer if layer is not None else key, []).append(rule)  # vocab tensors alone
    for group in groups.values():
        state = {}
        for rule in group:
            key, layer = dist_key(rule)
            md = stored[key]
            shape = tuple(md.global_shape)
            # A box of the stored global tensor: all of it, or the [layer:layer+1] slab. No regular
            # grid (axis_fragmentations=None): DCP reads any box from any stored layout.
            local = shape if layer is None else (1, *shape[1:])
            state[rule.mcore] = ShardedTensor(
                key=key,
                data=torch.empty(local, dtype=md.dtype),
                dtype=md.dtype,
                local_shape=local,
                global_shape=shape,
                global_offset=(0 if layer is None else layer,) + (0,) * (len(shape) - 1),
                axis_fragmentations=None,
                replica_id=0,
            )
        loaded = _dist_load(state, ckpt, partial=True)
        for rule in group:
            t = loaded.pop(rule.mcore)
            yield from mcore_full_to_hf(cfg, rule, t if dist_key(rule)[1] is None else t[0])


def mcore_to_hf_checkpoint(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Megatron checkpoint -> HF model dir (stored dtype, vocab padding stripped). Rank 0 writes;
    under torchrun the other ranks take part in the reads."""
    ckpt = Path(ckpt_dir)
    meta = read_checkpoint_metadata(ckpt)
    cfg = checkpoint_config(meta, str(ckpt / METADATA_FILE))
    check_output_dir(out_dir, overwrite)
    _stored_tensors(ckpt, cfg)
    tensors = iter_mcore_hf_tensors(ckpt)
    if _rank() == 0:
        save_hf_checkpoint(
            tensors,
            cfg,
            out_dir,
            dtype=parse_dtype(meta["dtype"]),
            max_shard_bytes=max_shard_bytes,
            overwrite=overwrite,
            assets_from=[ckpt / ASSETS_DIR, meta.get("source_hf_dir")],
        )
    else:
        for _ in tensors:
            pass
    barrier()
    return Path(out_dir)


def reshard_mcore_checkpoint(
    ckpt_dir: str | Path, out_dir: str | Path, *, tp: int, overwrite: bool = False
) -> Path:
    """Rewrite a checkpoint for ``tp`` (collective): under torchrun at TP=tp each rank loads only
    its shard from whatever layout was stored and writes it; the stored tensors are unchanged."""
    ckpt = Path(ckpt_dir)
    meta = read_checkpoint_metadata(ckpt)
    cfg = checkpoint_config(meta, str(ckpt / METADATA_FILE))
    cfg.check_tp(tp)
    check_output_dir(out_dir, overwrite)
    _stored_tensors(ckpt, cfg)
    _check_layout(tp)
    dtype = parse_dtype(meta["dtype"])
    template = _template(cfg, dtype)
    state = {
        k: _with_data(v, [torch.empty(p.local_shape, dtype=dtype) for p in _pieces(v)])
        if _is_tensor_entry(v)
        else v
        for k, v in template.items()
    }
    loaded = _dist_load(state, ckpt)
    state = {
        k: _with_data(v, [t for t in _pieces(loaded[k])]) if _is_tensor_entry(v) else v
        for k, v in template.items()
    }
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        _dist_save(state, tmp)
        if _rank() == 0:
            if (ckpt / ASSETS_DIR).is_dir():
                shutil.copytree(ckpt / ASSETS_DIR, tmp / ASSETS_DIR)
            _write_metadata(
                tmp, cfg, tp=tp, dtype=dtype, extra=meta.get("extra"), source_hf_dir=meta.get("source_hf_dir")
            )
    return Path(out_dir)


__all__ = [
    "CheckpointError",
    "SafetensorsReader",
    "atomic_output_dir",
    "check_output_dir",
    "checkpoint_config",
    "dist_key",
    "expected_global_shapes",
    "hf_to_mcore_checkpoint",
    "iter_mcore_hf_tensors",
    "load_mcore_checkpoint",
    "mcore_to_hf_checkpoint",
    "read_checkpoint_metadata",
    "reshard_mcore_checkpoint",
    "save_hf_checkpoint",
    "save_mcore_checkpoint",
]
