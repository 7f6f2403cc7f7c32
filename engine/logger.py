"""The one metrics logger: TensorBoard scalars plus a console progress line (rank 0 only)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from parallel.distributed import is_main_rank


class MetricsLogger:
    """Writes scalars to ``<dir>/tb`` and prints one line per step: reward, KL, tokens/s, ETA.

    The TensorBoard writer opens at the first logged step with ``purge_step`` = that step: a fresh run
    in an old directory hides the old run's curves instead of drawing over them, and a resumed run
    hides whatever the interrupted run logged past its checkpoint, so every curve is one run.
    """

    def __init__(self, log_dir: str | Path, total_steps: int, enabled: bool | None = None) -> None:
        self.enabled = is_main_rank() if enabled is None else enabled
        self.total_steps = total_steps
        self.t0 = time.time()
        self.log_dir = Path(log_dir)
        self.writer = None

    def _writer(self, step: int):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(self.log_dir / "tb"), purge_step=step)
        return self.writer

    def log(self, step: int, metrics: dict[str, float], steps_done_this_run: int | None = None) -> None:
        if not self.enabled:
            return
        self.log_scalars(step, metrics)
        done = steps_done_this_run if steps_done_this_run is not None else step
        elapsed = time.time() - self.t0
        eta = elapsed / max(done, 1) * max(self.total_steps - step, 0)
        print(
            f"step {step}/{self.total_steps} | reward {metrics.get('reward/mean', float('nan')):.3f} "
            f"| kl {metrics.get('loss/kl', float('nan')):.4f} | ent {metrics.get('policy/entropy', float('nan')):.2f} | len {metrics.get('completion/length_mean', 0):.1f} "
            f"| tok/s {metrics.get('perf/tokens_per_s', 0):.0f} | {metrics.get('perf/step_s', 0):.2f}s/step "
            f"| ETA {_fmt_time(eta)}",
            flush=True,
        )

    def log_scalars(self, step: int, metrics: dict[str, float]) -> None:
        """Scalars only, no progress line (e.g. an evaluation before the first step)."""
        if self.enabled:
            writer = self._writer(step)
            for k, v in metrics.items():
                writer.add_scalar(k, v, step)
            writer.flush()

    def info(self, msg: str) -> None:
        if self.enabled:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
