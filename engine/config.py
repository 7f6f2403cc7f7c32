"""The project's one config system: typed dataclasses loaded from YAML plus CLI overrides.

Each concern owns a ``@dataclass`` config in its own module (``engine.loss.LossConfig``,
``engine.data.DataConfig``, ...); a top-level config nests them as fields. This module
only provides the generic machinery:

* :func:`load_config` reads a YAML file (nested mappings for nested dataclass fields),
  applies ``key=value`` overrides with dotted keys (``loss.beta=0.0``,
  ``data.path=foo.jsonl``, ``rewards.funcs=[format,cosine]``), checks/coerces every
  value against the field annotation and constructs the dataclasses through their
  classes, so their ``__post_init__`` validation runs.
* A YAML file may start from another one: ``base: other.yaml`` (a path relative to the
  file, or a list of paths merged left to right). The file's own keys are deep-merged
  over the base: mappings merge key by key, any other value (lists included) replaces.
* :func:`config_to_dict` / :func:`save_config` write a config back to plain YAML
  (atomically: temp file + rename); ``load_config(cls, saved_path)`` gives an equal
  config back.

Supported annotations: ``int``, ``float`` (ints accepted, and strings such as ``1e-6``
that PyYAML 1.1 leaves as strings), ``bool``, ``str``, ``pathlib.Path``, ``X | None`` /
``Optional[X]`` / other unions (first matching member wins), ``list[X]``,
``tuple[X, ...]``, ``dict[str, X]``, ``Literal[...]``, nested dataclasses and ``Any``.
An override value is parsed with ``yaml.safe_load``; for a ``str`` field an override
whose YAML value is not a string (``data.split=2024``) keeps its raw text, except
``null`` / ``~`` / ``Null``, which are ``None`` as in a YAML file (``model.config=null``).

Every error is a :class:`ConfigError` (a ``ValueError``) that names the full dotted key
and where the value came from (the file, or the override).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

__all__ = [
    "BASE_KEY",
    "build_section",
    "check_literals",
    "ConfigError",
    "config_to_dict",
    "load_config",
    "load_config_from_cli",
    "load_yaml_with_base",
    "parse_override",
    "save_config",
]

T = TypeVar("T")

BASE_KEY = "base"
"""Top-level YAML key naming the file(s) this file overrides."""

_MISSING = dataclasses.MISSING
_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^[-+]?(inf|nan)$", re.IGNORECASE)


class ConfigError(ValueError):
    """A config file or override is invalid (unknown key, wrong type, missing field...)."""


# --------------------------------------------------------------------------- helpers


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    origin = get_origin(tp)
    if origin is Literal:
        return "Literal[" + ", ".join(repr(a) for a in get_args(tp)) + "]"
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        args = get_args(tp)
        name = getattr(origin, "__name__", str(origin))
        if args:
            return f"{name}[" + ", ".join("..." if a is Ellipsis else _type_name(a) for a in args) + "]"
        return name
    if isinstance(tp, type):
        return tp.__name__
    return str(tp)


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


_HINTS_CACHE: dict[type, dict[str, Any]] = {}


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass's init fields (handles string annotations)."""
    hints = _HINTS_CACHE.get(cls)
    if hints is None:
        try:
            hints = get_type_hints(cls)
        except NameError as exc:
            raise ConfigError(f"cannot resolve the type annotations of {cls.__qualname__}: {exc}") from exc
        _HINTS_CACHE[cls] = hints
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass type a (possibly optional) annotation points to, else None."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    if get_origin(tp) in (Union, types.UnionType):
        found = [a for a in get_args(tp) if isinstance(a, type) and dataclasses.is_dataclass(a)]
        if len(found) == 1:
            return found[0]
    return None


def _is_mapping_type(tp: Any) -> bool:
    origin = get_origin(tp)
    return origin in (dict, Mapping, typing.Mapping) or tp in (dict, Mapping)


def _unknown_key_error(cls: type, prefix: str, key: str, source: str) -> ConfigError:
    valid = list(_field_types(cls))
    full = _join(prefix, key)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{_join(prefix, close[0])}'?" if close else ""
    section = f"'{prefix}' ({cls.__name__})" if prefix else f"the top level ({cls.__name__})"
    return ConfigError(
        f"unknown config key '{full}' in {source}.{hint} Valid keys under {section}: {', '.join(valid)}"
    )


# --------------------------------------------------------------------------- YAML files


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML in {path}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping at the top level, got {type(data).__name__}"
        )
    return data


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _file_layers(path: Path, chain: tuple[Path, ...] = ()) -> list[tuple[dict[str, Any], str]]:
    """The (data, source) layers of a file and its ``base:`` files, lowest priority first."""
    path = Path(path)
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise ConfigError(f"'{BASE_KEY}:' cycle in config files: {cycle}")
    data = _read_yaml(path)
    bases = data.pop(BASE_KEY, None)
    layers: list[tuple[dict[str, Any], str]] = []
    if bases is not None:
        if isinstance(bases, str):
            bases = [bases]
        if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
            raise ConfigError(f"'{BASE_KEY}:' in {path} must be a path or a list of paths, got {bases!r}")
        for b in bases:
            base_path = Path(b) if Path(b).is_absolute() else path.parent / b
            if not base_path.is_file():
                raise ConfigError(f"'{BASE_KEY}: {b}' in {path}: file {base_path} does not exist")
            layers.extend(_file_layers(base_path, (*chain, resolved)))
    layers.append((data, str(path)))
    return layers


def load_yaml_with_base(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file with its ``base:`` chain deep-merged (no type checks)."""
    merged: dict[str, Any] = {}
    for data, _ in _file_layers(Path(path)):
        merged = _deep_merge(merged, data)
    return merged


def _check_keys(cls: type, data: Mapping[str, Any], prefix: str, source: str) -> None:
    """Reject unknown keys (recursively into nested dataclass mappings)."""
    types_ = _field_types(cls)
    for key, value in data.items():
        if not isinstance(key, str) or key not in types_:
            raise _unknown_key_error(cls, prefix, str(key), source)
        sub = _dataclass_in(types_[key])
        if sub is not None and isinstance(value, Mapping):
            _check_keys(sub, value, _join(prefix, key), source)


# --------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[str, str]:
    """Split ``"a.b=value"`` into ``("a.b", "value")``."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. loss.beta=0.0)")
    if key.startswith("--"):
        key = key[2:]
    return key, value.strip()


def _apply_override(cls: type, tree: dict[str, Any], text: str, origins: dict[str, str]) -> None:
    key, raw = parse_override(text)
    source = f"override '{text}'"
    parts = key.split(".")
    node = tree
    cur_cls: type | None = cls
    prefix = ""
    tp: Any = None
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if cur_cls is not None:
            types_ = _field_types(cur_cls)
            if part not in types_:
                raise _unknown_key_error(cur_cls, prefix, part, source)
            tp = types_[part]
        elif tp is not None and _is_mapping_type(tp):
            args = get_args(tp)
            tp = args[1] if len(args) == 2 else Any
        else:
            raise ConfigError(f"{source}: '{prefix}' is not a section, so '{key}' is not a valid key")
        prefix = _join(prefix, part)
        if last:
            break
        sub = _dataclass_in(tp)
        if sub is not None:
            cur_cls = sub
        elif _is_mapping_type(tp):
            cur_cls = None
        else:
            raise ConfigError(
                f"{source}: '{prefix}' is a {_type_name(tp)} value, not a section, so '{key}' is not a valid key"
            )
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child

    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: cannot parse the value {raw!r} as YAML: {exc}") from exc
    if tp is str and not isinstance(value, str) and value is not None:
        value = raw  # data.split=2024 -> "2024"; but null / ~ stay None, as in a YAML file
    leaf = parts[-1]
    origins[key] = source
    if isinstance(value, Mapping):
        _record(origins, value, key, source)
    if isinstance(value, Mapping) and isinstance(node.get(leaf), Mapping):
        node[leaf] = _deep_merge(dict(node[leaf]), value)
    else:
        node[leaf] = value


# --------------------------------------------------------------------------- coercion


def _record(origins: dict[str, str], data: Mapping[str, Any], prefix: str, source: str) -> None:
    """Remember which file/override set each dotted key (for error messages)."""
    for key, value in data.items():
        full = _join(prefix, str(key))
        origins[full] = source
        if isinstance(value, Mapping):
            _record(origins, value, full, source)


def _origin(origins: Mapping[str, str], key: str) -> str:
    key = re.sub(r"\[\d+\]", "", key)
    while key:
        if key in origins:
            return origins[key]
        key = key.rpartition(".")[0]
    return origins.get("", "defaults")


def _section_sources(origins: Mapping[str, str], prefix: str) -> str:
    """Where the keys of a section came from (all sources, in order of first use)."""
    if not prefix:
        return origins.get("", "defaults")
    found = [src for key, src in origins.items() if key == prefix or key.startswith(prefix + ".")]
    return " + ".join(dict.fromkeys(found)) or "defaults"


def _coerce(value: Any, tp: Any, key: str, origins: Mapping[str, str]) -> Any:
    def bad(expected: str | None = None) -> ConfigError:
        return ConfigError(
            f"config key '{key}' in {_origin(origins, key)}: expected {expected or _type_name(tp)}, "
            f"got {_describe(value)}"
        )

    if tp is Any or tp is object:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise bad()
    origin = get_origin(tp)
    if origin is Literal:
        for option in get_args(tp):
            if value == option and type(value) is type(option):
                return option
        raise bad()
    if origin in (Union, types.UnionType):
        members = get_args(tp)
        if value is None:
            if type(None) in members:
                return None
            raise bad()
        for member in members:
            if member is type(None):
                continue
            try:
                return _coerce(value, member, key, origins)
            except ConfigError:
                continue
        raise bad()
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise bad(f"a mapping for {tp.__name__}")
        return _build(tp, value, key, origins)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    if tp is Path or (isinstance(tp, type) and issubclass(tp, os.PathLike)):
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        raise bad()
    if origin in (list, Sequence, typing.Sequence) or tp in (list, Sequence):
        if not isinstance(value, (list, tuple)):
            raise bad()
        args = get_args(tp)
        item_tp = args[0] if args else Any
        return [_coerce(v, item_tp, f"{key}[{i}]", origins) for i, v in enumerate(value)]
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad()
        args = get_args(tp)
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", origins) for i, v in enumerate(value))
        if len(args) != len(value):
            raise bad()
        return tuple(
            _coerce(v, a, f"{key}[{i}]", origins) for i, (v, a) in enumerate(zip(args, value, strict=True))
        )
    if _is_mapping_type(tp):
        if not isinstance(value, Mapping):
            raise bad()
        args = get_args(tp)
        k_tp, v_tp = args if len(args) == 2 else (Any, Any)
        return {
            _coerce(k, k_tp, f"{key}.{k}", origins): _coerce(v, v_tp, f"{key}.{k}", origins)
            for k, v in value.items()
        }
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise bad()
    return value  # an annotation we do not understand: pass through


def _build(cls: type[T], data: Mapping[str, Any], prefix: str, origins: Mapping[str, str]) -> T:
    types_ = _field_types(cls)
    source = origins.get("", "defaults")
    for key in data:
        if key not in types_:
            raise _unknown_key_error(cls, prefix, str(key), _origin(origins, _join(prefix, str(key))))
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        full = _join(prefix, f.name)
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], types_[f.name], full, origins)
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise ConfigError(
                f"missing required config key '{full}' ({cls.__name__}.{f.name}: {_type_name(types_[f.name])}, "
                f"no default) in {source}; set it in the YAML file or with an override {full}=..."
            )
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        where = f"'{prefix}' ({cls.__name__})" if prefix else cls.__name__
        raise ConfigError(
            f"invalid config {where} (from {_section_sources(origins, prefix)}): {exc}"
        ) from exc


# --------------------------------------------------------------------------- public API


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build a ``cls`` instance from a YAML file (optional) and ``key=value`` overrides.

    Later sources win: ``base:`` files, then the file, then the overrides in order.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    if isinstance(overrides, str):
        overrides = [overrides]
    tree: dict[str, Any] = {}
    origins: dict[str, str] = {}
    sources: list[str] = []
    if path is not None:
        for data, src in _file_layers(Path(path)):
            _check_keys(cls, data, "", src)
            tree = _deep_merge(tree, data)
            _record(origins, data, "", src)
            sources.append(src)
    for text in overrides:
        _apply_override(cls, tree, text, origins)
    if overrides:
        sources.append("overrides " + " ".join(repr(o) for o in overrides))
    origins[""] = " + ".join(sources) if sources else "defaults"
    return _build(cls, tree, "", origins)


def build_section(cls: type[T], data: Mapping[str, Any], key: str, source: str) -> T:
    """Build one section from plain data with :func:`load_config`'s checks (unknown keys with the
    closest valid one, types, ``Literal`` sets), for a ``dict`` field whose schema is chosen at run
    time (``rewards.params.<name>``: each reward's parameter dataclass)."""
    return _build(cls, data, key, {"": source, key: source})


def load_config_from_cli(cls: type[T], argv: Sequence[str] | None = None) -> T:
    """``[--config PATH | -c PATH] [key=value ...]`` -> ``cls``. ``argv`` defaults to ``sys.argv[1:]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    path: str | None = None
    overrides: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("--config", "-c"):
            if i + 1 >= len(args):
                raise ConfigError(f"{arg} needs a path")
            path = args[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif "=" in arg:
            overrides.append(arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r}: expected --config PATH or key=value overrides")
        i += 1
    return load_config(cls, path, overrides)


def config_to_dict(cfg: Any) -> Any:
    """A plain-data (YAML-safe) copy of a config: dataclasses -> dicts, tuples -> lists, Path -> str."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, Mapping):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, os.PathLike):
        return os.fspath(cfg)
    return cfg


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write ``cfg`` as YAML atomically (temp file in the same dir, then rename)."""
    from models.atomic_io import atomic_write  # lazy: loading and printing a config stay torch-free

    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True, default_flow_style=False)
    return atomic_write(path, text)


def check_literals(cfg: Any, section: str) -> None:
    """Validate every ``Literal[...]``-typed field of a config dataclass (call from ``__post_init__``), so
    a directly constructed config is checked like a loaded one: ``section.field='x' is invalid; valid
    options: [...]``."""
    for name, tp in _field_types(type(cfg)).items():
        options = get_args(tp) if get_origin(tp) is Literal else ()
        value = getattr(cfg, name)
        if options and value not in options:
            raise ValueError(f"{section}.{name}={value!r} is invalid; valid options: {list(options)}")
