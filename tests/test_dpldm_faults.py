"""A run killed with SIGKILL (issue 11, item 4; issue 17, items 7 and 16) resumes with nothing lost but the steps
since its last checkpoint: the final model, epsilon and step count equal an uninterrupted run's with the same seeds,
and no private file (noise seeds, sampler state) outlives the finished run.

The kills are not timed: a driver process patches dpldm.train and dpldm.checkpoint so that it SIGKILLs itself at an
exact point, one per window a kill can land in: before the first checkpoint, inside a checkpoint write (the new one
complete in its temporary folder, nothing renamed), between the rename of the current one to `.prev` and the rename
of the new one, after a checkpoint (in the middle of training), and after training (the model being saved, the last
checkpoint still on disk).
"""

# ruff: noqa: F811  (pytest fixtures imported from tests.dpldm_helpers are redefined as arguments)
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dpldm import checkpoint, train
from tests.dpldm_helpers import tiny_private, tiny_runs, train_args  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--epochs", "2", "--deterministic-noise", "--checkpoint-every", "1", "--seed", "4"]  # 8 steps, 7 checkpoints

# Runs dpldm.train (argv[2:]) and SIGKILLs itself at the point argv[1] names: [save, point], the `save`-th call of
# save_train_state in this process, at `point` ("enter": before it writes anything; "rename1": its first os.replace,
# the new checkpoint complete in its temporary folder; "rename2": its second, the current one already moved to
# .prev), ["save_ldm", 1]: when training is over and the model is being saved, or ["saved_ldm", 1]: just after it
# was written, before the checkpoints are deleted.
DRIVER = r"""
import json, os, signal, sys
from dpldm import checkpoint, train

target, point = json.loads(sys.argv[1])
state = {"save": 0, "rename": 0}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

real_save = train.save_train_state
def save(*a, **k):
    state["save"] += 1
    state["rename"] = 0
    if state["save"] == target and point == "enter":
        die()
    return real_save(*a, **k)

class Renames:  # checkpoint.py's os, with its renames counted
    def __getattr__(self, name):
        return getattr(os, name)
    def replace(self, src, dst):
        state["rename"] += 1
        if state["save"] == target and point == f"rename{state['rename']}":
            die()
        return os.replace(src, dst)

real_save_ldm = train.save_ldm
def save_ldm(*a, **k):
    if target == "save_ldm":
        die()
    real_save_ldm(*a, **k)
    if target == "saved_ldm":
        die()

train.save_train_state, train.save_ldm, checkpoint.os = save, save_ldm, Renames()
train.main(sys.argv[2:])
"""


def command(runs: Path, data: Path, out: Path, kill: tuple | None, *extra: str) -> list[str]:
    argv = train_args(runs, data, out, *ARGS, *extra)
    if kill is None:
        return [sys.executable, "-m", "dpldm.train", *argv]
    return [sys.executable, "-c", DRIVER, json.dumps(kill), *argv]


def launch(runs: Path, data: Path, out: Path, kill: tuple | None, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DPLDM_NO_BAR": "1", "DPLDM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(command(runs, data, out, kill, *extra), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=600, check=False)


def killed(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == -signal.SIGKILL, f"expected a SIGKILL, got return code {p.returncode}: {p.stderr[-2000:]}"


def unet(out: Path) -> dict:
    return load_file(out / "ldm" / "unet" / "diffusion_pytorch_model.safetensors")


def result(out: Path) -> dict:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return next(r for r in reversed(records) if "epsilon" in r and "steps" in r)


def latest_step(out: Path) -> int | None:
    meta = checkpoint.latest_checkpoint(out / "checkpoint")[1]
    return None if meta is None else meta["step"]


def writes_left(out: Path) -> list[Path]:
    """Temporary folders of checkpoint writes that were killed."""
    return sorted(out.glob(".checkpoint.tmp-*"))


def private_files(out: Path) -> list[Path]:
    """Anything under the run folder that holds, or held, a rank's private DP state."""
    return sorted(p for p in out.rglob("*") if p.name in ("state.pt", "PRIVATE.txt") or "checkpoint" in p.name)


@pytest.mark.slow
def test_sigkill_in_every_window_then_resume_equals_uninterrupted(tiny_runs: Path, tiny_private: Path,
                                                                 tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    done = launch(tiny_runs, tiny_private, whole, None)
    assert done.returncode == 0, done.stderr[-2000:]
    assert result(whole)["steps"] == 8
    out = tmp_path / "killed"

    # before the first checkpoint: step 1 taken, nothing on disk but the log; --resume starts again from step 0
    killed(launch(tiny_runs, tiny_private, out, (1, "enter")))
    assert (out / "log.jsonl").is_file() and not private_files(out)
    # inside a checkpoint write (step 2's, complete in its temporary folder): step 1 stays the latest
    killed(launch(tiny_runs, tiny_private, out, (2, "rename1"), "--resume"))
    assert latest_step(out) == 1 and [p.name for p in writes_left(out)]
    assert all((p / "state.pt").is_file() for p in writes_left(out))  # the private seeds, outside the checkpoint
    # between the renames (step 3's write): step 2 is only in checkpoint.prev
    killed(launch(tiny_runs, tiny_private, out, (2, "rename2"), "--resume"))
    assert not (out / "checkpoint").exists() and latest_step(out) == 2 and writes_left(out)
    # after a checkpoint, in the middle of training: killed in step 5, checkpoint of step 4 intact
    killed(launch(tiny_runs, tiny_private, out, (3, "enter"), "--resume"))
    assert latest_step(out) == 4 and not writes_left(out)
    # after training: the model being saved, the last checkpoint (step 7) still on disk
    killed(launch(tiny_runs, tiny_private, out, ("save_ldm", 1), "--resume"))
    assert latest_step(out) == 7
    # the model written, its checkpoints not yet deleted: it is not in place, so no releasable model ever sits
    # beside the noise seeds (a rerun is refused, and --resume saves it again)
    killed(launch(tiny_runs, tiny_private, out, ("saved_ldm", 1), "--resume"))
    assert latest_step(out) == 7 and not (out / "ldm").exists()
    done = launch(tiny_runs, tiny_private, out, None, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]

    a, b = unet(whole), unet(out)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), "the model differs from an uninterrupted run"
    ra, rb = result(whole), result(out)
    assert (ra["steps"], ra["epsilon"]) == (rb["steps"], rb["epsilon"])
    assert private_files(out) == [], "private state outlived the finished run"


def run_to(runs: Path, data: Path, out: Path, *extra: str) -> dict:
    with pytest.warns(UserWarning, match="NO privacy"):
        return train.main(train_args(runs, data, out, *ARGS, *extra))


@pytest.mark.slow
def test_a_killed_writes_seed_file_does_not_outlive_the_run(tiny_runs: Path, tiny_private: Path,
                                                            tmp_path: Path) -> None:
    """Issue 17, item 7: what a writer killed before its rename leaves (`.checkpoint.tmp-*/state.pt`, the noise
    seeds and sampler state) is deleted when the resumed run finishes, and so is a killed rank's."""
    out = tmp_path / "run"
    run_to(tiny_runs, tiny_private, out, "--max-steps", "2")
    # a kill after the temporary folder was filled and before its rename leaves exactly this (see the test above)
    shutil.copytree(out / "checkpoint", out / ".checkpoint.tmp-k1ll3d")
    shutil.copytree(out / "checkpoint", out / ".checkpoint-rank1.tmp-k1ll3d")
    assert (out / ".checkpoint.tmp-k1ll3d" / "state.pt").is_file()
    res = run_to(tiny_runs, tiny_private, out, "--resume")
    assert res["steps"] == 8
    assert private_files(out) == [], "private state outlived the finished run"


@pytest.mark.slow
def test_fresh_discards_a_killed_writes_seed_file(tiny_runs: Path, tiny_private: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_to(tiny_runs, tiny_private, out, "--max-steps", "1")
    shutil.copytree(out / "checkpoint", out / ".checkpoint.tmp-k1ll3d")
    run_to(tiny_runs, tiny_private, out, "--fresh", "--max-steps", "1")
    assert not (out / ".checkpoint.tmp-k1ll3d").exists() and latest_step(out) == 1
