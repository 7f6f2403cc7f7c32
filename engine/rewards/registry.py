"""The reward registry: one :class:`RewardSpec` per reward, added with :func:`register_reward`.

Adding a reward is one registration next to its function::

    @dataclass
    class MyParams:
        scale: float = 1.0

    @register_reward("mine", params=MyParams, pooled=True)
    def my_reward(completion: str, gold: str, *, scale: float = 1.0) -> float: ...

then ``rewards.funcs: [mine]`` and ``rewards.params: {mine: {scale: 2.0}}`` in a config.

* ``params``: a dataclass; its fields are ``rewards.params.<name>`` (checked and typed by the config
  system) and reach the function as keyword arguments, bound with ``functools.partial`` into a
  picklable callable (TRL's ``get_cosine_scaled_reward`` returns a closure, which spawned workers
  cannot receive).
* ``pooled``: run in the timeout-bounded worker pool (math-verify can hang); else inline.
* ``group``: the reward sees the whole group. The function is then the per-completion part (run in
  the pool when ``pooled``) and ``group(completions, values, failed)`` turns one group's values into
  rewards (Kimi 1.5's ``length`` needs every completion's length and correctness).
* Context keywords: a function that declares ``num_tokens`` (completion length in tokens),
  ``gold_wrap`` or ``math_verify_timeout_s`` receives them from the scorer.

A custom reward outside the registry is a dotted path ``"package.module:function"``
(``fn(completion, gold) -> float``, run in the pool, importable by spawned workers); its metric name
is the function's name. A module that registers rewards with :func:`register_reward` can be named
by a dotted path to one of its functions: importing it registers them.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.config import build_section

__all__ = [
    "CONTEXT_KWARGS",
    "REWARDS",
    "GroupFn",
    "RewardSpec",
    "params_from",
    "register",
    "register_reward",
    "resolve_reward",
]

CONTEXT_KWARGS = ("num_tokens", "gold_wrap", "math_verify_timeout_s")
"""Keyword arguments the scorer passes to a reward function that declares them."""

GroupFn = Callable[[Sequence[str], Sequence[Any], Sequence[bool]], list[float]]


@dataclass(frozen=True)
class RewardSpec:
    """One registered reward (see the module docstring)."""

    name: str  # registry key and metric name: reward/<name>/mean
    fn: Callable[..., Any]  # fn(completion, gold, **params, **context) -> float (group: any value)
    params: type | None = None  # parameter dataclass; None: no parameters
    pooled: bool = False  # run in the worker pool (may hang or crash: math-verify)
    group: GroupFn | None = None  # sees the whole group: (completions, values, failed) -> rewards
    context: frozenset[str] = field(init=False, default=frozenset())

    def __post_init__(self) -> None:
        if self.params is not None and not dataclasses.is_dataclass(self.params):
            raise TypeError(f"reward {self.name!r}: params must be a dataclass type, got {self.params!r}")
        try:
            sig = inspect.signature(self.fn)
        except (TypeError, ValueError):  # a builtin or C callable: pass no context
            return
        takes = {n for n in CONTEXT_KWARGS if n in sig.parameters}
        if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            takes = set(CONTEXT_KWARGS)
        object.__setattr__(self, "context", frozenset(takes))

    def bind(self, params: Any, **context: Any) -> Callable[..., Any]:
        """``fn`` with its parameters and the context it declares bound: a picklable callable
        ``(completion, gold[, num_tokens=...]) -> value``."""
        kwargs = dataclasses.asdict(params) if params is not None else {}
        kwargs.update({k: v for k, v in context.items() if k in self.context})
        return functools.partial(self.fn, **kwargs) if kwargs else self.fn


REWARDS: dict[str, RewardSpec] = {}
"""Every registered reward by name (the built-ins register on ``import engine.rewards``)."""


def register(spec: RewardSpec) -> RewardSpec:
    """Add ``spec`` to :data:`REWARDS`; a name may be registered once (re-importing the same
    function, as a spawned worker does, is not a conflict)."""
    old = REWARDS.get(spec.name)
    if old is not None and _qualname(old.fn) != _qualname(spec.fn):
        raise ValueError(
            f"reward {spec.name!r} is already registered by {_qualname(old.fn)}; "
            f"{_qualname(spec.fn)} needs another name"
        )
    REWARDS[spec.name] = spec
    return spec


def register_reward(
    name: str, *, params: type | None = None, pooled: bool = False, group: GroupFn | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator form of :func:`register`; returns the function unchanged."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        register(RewardSpec(name, fn, params=params, pooled=pooled, group=group))
        return fn

    return deco


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def _import_dotted(path: str) -> Callable[..., Any]:
    module, _, attr = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except Exception as e:
        raise ValueError(f"cannot import reward function {path!r}: {e!r}") from e
    if not callable(fn):
        raise ValueError(f"reward {path!r} is not callable (got {type(fn).__name__})")
    return fn


def resolve_reward(name: str) -> RewardSpec:
    """A registry name, or a dotted path ``"package.module:function"`` (a registered function keeps
    its registration; any other becomes a pooled per-completion reward named after the function)."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        fn = _import_dotted(name)
        for spec in REWARDS.values():  # importing the module may have registered it
            if spec.fn is fn:
                return spec
        return RewardSpec(name.partition(":")[2], fn, pooled=True)
    close = difflib.get_close_matches(name, sorted(REWARDS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"unknown reward function {name!r}.{hint} Valid names: {sorted(REWARDS)} "
        "(or a dotted path 'module:function')"
    )


def params_from(spec: RewardSpec, value: Any, key: str) -> Any:
    """``value`` (a mapping, an instance of ``spec.params`` or ``None`` for the defaults) as an
    instance of ``spec.params``, typed and checked like any config section named ``key``."""
    if spec.params is None:
        if value:
            raise ValueError(f"{key}: reward {spec.name!r} takes no parameters, got {dict(value)!r}")
        return None
    if value is None:
        return spec.params()
    if isinstance(value, spec.params):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"{key} must be a mapping of {spec.params.__name__} fields, got {value!r}")
    try:
        return build_section(spec.params, value, key, f"the params of reward {spec.name!r}")
    except ValueError as e:  # a plain ValueError: the loader then adds the file/override it came from
        raise ValueError(str(e)) from None
