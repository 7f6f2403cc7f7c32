"""A fixed-size pool of reward worker processes; each task is bounded by a timeout.

``concurrent.futures`` cannot cancel a running task, so each worker has its own pipe and the parent
enforces deadlines: a timed-out or dead worker is killed and replaced (the replacement starts in the
background and takes tasks once it reports ready). Timeouts and crashes come back as outcomes, to be
counted. Workers are ``spawn``/``forkserver`` processes (never ``fork``: the trainer is
multi-threaded) and exit on their own when the trainer dies, even mid-task.

``pebble.ProcessPool`` was considered and not used: its workers are orphaned when the parent is
SIGKILLed (users add ``prctl(PR_SET_PDEATHSIG)`` themselves) and it has reported lock-ups when a
worker is OOM-killed (noxdafox/pebble#97); covering both here takes a watchdog thread and no dependency.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection as mp_conn
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Outcome", "RewardWorkerPool", "Task"]

logger = logging.getLogger(__name__)

Task = tuple[Callable[..., Any] | str, tuple, dict]
"""``(target, args, kwargs)``: a picklable callable, or a registry name / dotted path."""


@dataclass
class Outcome:
    status: Literal["ok", "timeout", "error"]
    value: Any = None


def run_task(target: Callable[..., Any] | str, args: tuple, kwargs: dict) -> Any:
    if isinstance(target, str):
        from engine.rewards.registry import resolve_reward

        target = resolve_reward(target).fn
    return target(*args, **kwargs)


def _parent_alive(parent_pid: int, initial_ppid: int) -> bool:
    # Under forkserver the direct parent is the fork server, not the trainer: check both.
    if os.getppid() != initial_ppid:
        return False
    try:
        os.kill(parent_pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _watch_parent(parent_pid: int) -> None:
    # If the trainer is SIGKILLed while a task spins in C code, do not leave an orphan behind.
    initial_ppid = os.getppid()
    while True:
        time.sleep(2.0)
        if not _parent_alive(parent_pid, initial_ppid):
            os._exit(0)


def _worker_main(conn: mp_conn.Connection, parent_pid: int) -> None:
    import signal

    import engine.rewards  # noqa: F401  # the built-in registrations, for tasks named by string
    from engine.rewards.math_answers import answer_is_correct

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    # Warm up imports and math-verify's grammar so the first task is not billed for it.
    answer_is_correct("\\boxed{1}", "1")
    conn.send(("ready", None, None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        except Exception as e:  # a task that does not unpickle here (e.g. its module is missing)
            conn.send(("unpicklable", False, f"{type(e).__name__}: {e}"))
            continue
        if msg is None:
            return
        tid, target, args, kwargs = msg
        try:
            conn.send((tid, True, run_task(target, args, kwargs)))
        # BaseException: math-verify's TimeoutException is one; the worker must survive it.
        except BaseException as e:
            conn.send((tid, False, f"{type(e).__name__}: {e}"))


class _Worker:
    def __init__(self, ctx: Any) -> None:
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=_worker_main,
            args=(child_conn, os.getpid()),
            daemon=True,
            name="reward-worker",
        )
        self.proc.start()
        child_conn.close()
        self.conn: mp_conn.Connection = parent_conn
        self.ready = False
        self.started_at = time.monotonic()
        self.task: int | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5.0)
        self.conn.close()


class RewardWorkerPool:
    """``num_workers`` reward processes; :meth:`run` returns one :class:`Outcome` per task."""

    def __init__(
        self,
        num_workers: int,
        start_method: Literal["spawn", "forkserver"] = "spawn",
        startup_timeout_s: float = 180.0,
    ) -> None:
        if num_workers < 1:
            raise ValueError("RewardWorkerPool needs num_workers >= 1")
        self._ctx = mp.get_context(start_method)
        self._startup_timeout_s = startup_timeout_s
        self._lock = threading.Lock()
        self._failed_starts = 0
        self._workers = [_Worker(self._ctx) for _ in range(num_workers)]
        self._closed = False

    @property
    def num_workers(self) -> int:
        return len(self._workers)

    def _replace(self, i: int) -> None:
        self._workers[i].kill()
        self._workers[i] = _Worker(self._ctx)

    def run(self, tasks: Sequence[Task], timeout_s: float) -> list[Outcome]:
        """Run the tasks; each is bounded by ``timeout_s`` from dispatch."""
        with self._lock:
            if self._closed:
                raise RuntimeError("RewardWorkerPool is closed")
            return self._run(tasks, timeout_s)

    def _run(self, tasks: Sequence[Task], timeout_s: float) -> list[Outcome]:
        results: list[Outcome | None] = [None] * len(tasks)
        pending = deque(range(len(tasks)))
        remaining = len(tasks)
        while remaining:
            now = time.monotonic()
            # Dispatch to idle, ready workers.
            for i, w in enumerate(self._workers):
                if pending and w.ready and w.task is None:
                    tid = pending.popleft()
                    try:
                        w.conn.send((tid, *tasks[tid]))
                    except (OSError, ValueError):  # died while idle: retry on a fresh worker
                        pending.appendleft(tid)
                        self._replace(i)
                        continue
                    w.task, w.deadline = tid, now + timeout_s
            # Wait for a message or the nearest deadline.
            wait_until = [w.deadline for w in self._workers if w.task is not None]
            wait_until += [w.started_at + self._startup_timeout_s for w in self._workers if not w.ready]
            timeout = max(0.0, min(wait_until) - now) if wait_until else None
            ready_conns = mp_conn.wait([w.conn for w in self._workers], timeout=timeout)
            for i, w in enumerate(self._workers):
                if w.conn not in ready_conns:
                    continue
                try:
                    tid, ok, value = w.conn.recv()
                except (EOFError, OSError):  # worker died (crash, OOM kill, os._exit)
                    if w.task is not None:
                        results[w.task] = Outcome("error", "worker process died")
                        remaining -= 1
                        self._failed_starts = 0
                    else:
                        self._failed_starts += 1
                        if self._failed_starts > 3:
                            raise RuntimeError(
                                "reward workers keep dying at startup "
                                f"(exitcode {w.proc.exitcode}); see their stderr"
                            ) from None
                    self._replace(i)
                    continue
                if tid == "ready":
                    w.ready = True
                    self._failed_starts = 0
                    continue
                if tid == "unpicklable" and w.task is not None:
                    tid = w.task
                if tid == w.task:
                    results[tid] = Outcome("ok" if ok else "error", value)
                    remaining -= 1
                w.task = None
            # Enforce deadlines.
            now = time.monotonic()
            for i, w in enumerate(self._workers):
                if w.task is not None and now >= w.deadline:
                    results[w.task] = Outcome("timeout")
                    remaining -= 1
                    logger.warning("reward task timed out after %.1fs; restarting worker", timeout_s)
                    self._replace(i)
                elif not w.ready and now >= w.started_at + self._startup_timeout_s:
                    raise RuntimeError(f"reward worker did not start within {self._startup_timeout_s:.0f}s")
        return [r if r is not None else Outcome("error") for r in results]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            asked = []
            for w in self._workers:
                if w.task is None:  # idle or starting: ask politely, a busy one gets killed
                    try:
                        w.conn.send(None)
                        asked.append(w)
                    except (OSError, ValueError):
                        pass
            deadline = time.monotonic() + 2.0
            for w in asked:
                w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            for w in self._workers:
                w.kill()
