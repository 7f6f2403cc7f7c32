"""Atomic writes: the one helper for files and directories that must never be seen half written.

A file or directory is written under a temporary name in the same directory, then renamed over the
target (``os.replace``, atomic on POSIX within one filesystem): a reader sees the old version or the
new one, never a mix, and a process killed mid-write leaves the target untouched.

Temporary names carry the writer's PID, ``<name>.tmp-<pid>`` (directories; ``<name>.old-<pid>`` for
a target moved aside while being replaced) and ``.<name>.tmp-<pid>-<random>`` (files), so that
:func:`remove_stale_partials` can tell a dead writer's leftovers from a live writer's work in
progress. The PID is only meaningful on the host that wrote it: a directory written to from two
hosts at once is not supported.

Standard library only (no torch), so the torch-free config code (``engine.config``) can use it; it
lives under ``models/`` because the checkpoint writer (``models.qwen.checkpoint``) needs it and
models never import ``engine``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "partial_dir", "pid_alive", "remove_stale_partials"]

# <name>.tmp-<pid> / <name>.old-<pid> (dirs), .<name>.tmp-<pid>-<random> (files)
_PARTIAL = re.compile(r"(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:-.*)?")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a PID we may not signal exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def partial_dir(out: Path) -> Path:
    """This process's temporary directory for ``out``: ``<out>.tmp-<pid>``."""
    return out.with_name(f"{out.name}.tmp-{os.getpid()}")


def atomic_write(
    path: str | Path, content: str | bytes | Callable[[IO[Any]], None], *, fsync: bool = True
) -> Path:
    """Write ``content`` (text, bytes, or a function writing to the open file) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    binary = isinstance(content, bytes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            if callable(content):
                content(f)
            else:
                f.write(content)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_stale_partials(
    root: str | Path, name: str | None = None, log: Callable[[str], None] | None = None
) -> list[Path]:
    """Delete the temporary files/dirs in ``root`` (of target ``name`` only, when given) whose writer
    is no longer alive on this host; ``log`` gets one line per removal. Returns what was removed."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for p in sorted(root.iterdir()):
        m = _PARTIAL.fullmatch(p.name)
        if m is None:
            continue
        target = m["name"].removeprefix(".") if p.is_file() else m["name"]
        if (name is not None and target != name) or pid_alive(int(m["pid"])):
            continue
        if m["kind"] == "old" and not (root / target).exists():
            continue  # killed between moving the old target aside and publishing the new: keep both
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
        if log is not None:
            log(f"removed {p}: partial write of {target} by process {m['pid']}, which is no longer running")
    return removed
