"""Run folders and their JSONL logs."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


class RunLog:
    """Appends one JSON object per line to <run>/log.jsonl; `print` also echoes to the terminal."""

    def __init__(self, run_dir: Path, stage: str) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "log.jsonl"
        self.stage = stage
        self.t0 = time.time()

    def log(self, **fields: Any) -> None:
        rec = {"stage": self.stage, "time": round(time.time() - self.t0, 3), **fields}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def print(self, msg: str, **fields: Any) -> None:
        tqdm.write(msg, file=sys.stdout)
        self.log(msg=msg, **fields)


def progress(total: int, desc: str, initial: int = 0, disable: bool = False) -> tqdm:
    # mininterval keeps the bar cheap; disabled when DPLDM_NO_BAR is set (tests), or asked (ranks other than 0)
    return tqdm(total=total, initial=initial, desc=desc, mininterval=1.0, dynamic_ncols=True,
                disable=disable or bool(os.environ.get("DPLDM_NO_BAR")))
