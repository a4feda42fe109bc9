"""A run killed with SIGKILL at random steps (issue 11, item 4) resumes with nothing lost but the steps since the
last checkpoint; the final model, epsilon and step count equal an uninterrupted run's with the same seeds."""

# ruff: noqa: F811  (pytest fixtures imported from tests.dpldm_helpers are redefined as arguments)
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from dpldm.checkpoint import latest_checkpoint
from tests.dpldm_helpers import tiny_private, tiny_runs, train_args  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--epochs", "3", "--deterministic-noise", "--checkpoint-every", "1", "--seed", "4"]


def start(runs: Path, data: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "DPLDM_NO_BAR": "1", "DPLDM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "dpldm.train", *train_args(runs, data, out, *ARGS), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen) -> None:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]


def unet(out: Path) -> dict:
    return load_file(out / "ldm" / "unet" / "diffusion_pytorch_model.safetensors")


def result(out: Path) -> dict:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return next(r for r in reversed(records) if "epsilon" in r and "steps" in r)


def steps_logged(out: Path) -> int:
    log = out / "log.jsonl"
    if not log.exists():
        return 0
    return max([json.loads(line).get("step", 0) for line in log.read_text().splitlines() if line.strip()] or [0])


def kill_after_step(p: subprocess.Popen, out: Path, step: int, timeout: float = 300) -> bool:
    """SIGKILL once `step` is logged (the checkpoint of that step may or may not be written yet)."""
    t0 = time.time()
    while steps_logged(out) < step and p.poll() is None and time.time() - t0 < timeout:
        time.sleep(0.05)
    if p.poll() is not None:
        return False
    p.send_signal(signal.SIGKILL)
    p.wait()
    return True


def test_sigkill_at_random_steps_then_resume_equals_uninterrupted(tiny_runs: Path, tiny_private: Path,
                                                                  tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    finish(start(tiny_runs, tiny_private, whole))
    total = result(whole)["steps"]
    out = tmp_path / "killed"
    at = sorted(random.Random().sample(range(1, total), 3))  # three kills at random steps
    p = start(tiny_runs, tiny_private, out)
    for k in at:
        assert kill_after_step(p, out, k), "the run ended before it could be killed"
        assert latest_checkpoint(out / "checkpoint")[0] is not None  # every step is checkpointed
        p = start(tiny_runs, tiny_private, out, "--resume")
    finish(p)
    a, b = unet(whole), unet(out)
    assert all((a[k] == b[k]).all() for k in a), f"killed at steps {at}: the model differs from an uninterrupted run"
    ra, rb = result(whole), result(out)
    assert (ra["steps"], ra["epsilon"]) == (rb["steps"], rb["epsilon"])
    assert not (out / "checkpoint").exists() and not (out / "checkpoint.prev").exists()
