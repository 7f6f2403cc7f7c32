"""Run ``tools/convert_checkpoint.py`` with the HF writer stalled after N tensors (to be killed).

python convert_interrupt.py --after N -- <convert_checkpoint args...>

Creates ``<marker>`` (env CONVERT_STALL_MARKER) when the stall begins, then sleeps forever, so a
test can SIGKILL the process mid-write at a known point.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main() -> int:
    from models.qwen import checkpoint as ck
    from tools.convert_checkpoint import main as convert_main

    argv = sys.argv[1:]
    split = argv.index("--")
    after = int(argv[argv.index("--after") + 1])
    marker = Path(os.environ["CONVERT_STALL_MARKER"])
    real_write = ck._StreamingSafetensorsFile.write
    calls = {"n": 0}

    def stalling_write(self, name, tensor):
        real_write(self, name, tensor)
        calls["n"] += 1
        if calls["n"] == after:
            self.f.flush()
            marker.write_text(str(self.path))
            while True:
                time.sleep(1)

    ck._StreamingSafetensorsFile.write = stalling_write
    return convert_main(argv[split + 1 :])


if __name__ == "__main__":
    sys.exit(main())
