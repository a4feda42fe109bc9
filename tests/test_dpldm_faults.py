"""A run killed with SIGKILL (issue 11, item 4; issue 17, items 7 and 16) resumes with nothing lost but the steps
since its last checkpoint: the final model, epsilon and step count equal an uninterrupted run's with the same seeds,
and no private file (noise seeds, sampler state) outlives the finished run.

The kills are not timed: a child process patches dpldm.train and dpldm.checkpoint so that it SIGKILLs itself at an
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

# A fork server: imports dpldm.train once (a fresh interpreter spends most of a tiny run importing), then per line
# on stdin, [kill, argv], forks a child that runs dpldm.train(argv) and SIGKILLs itself at the point `kill` names,
# and answers the child's exit status on stdout. `kill` is null (no kill), [save, point]: the `save`-th call of
# save_train_state in the child, at `point` ("enter": before it writes anything; "rename1": its first os.replace,
# the new checkpoint complete in its temporary folder; "rename2": its second, the current one already moved to
# .prev), ["save_ldm", 1]: when training is over and the model is being saved, or ["saved_ldm", 1]: just after it
# was written, before the checkpoints are deleted. Nothing has run a torch op before a fork: no thread pool to lose.
SERVER = r"""
import json, os, signal, sys, traceback
from dpldm import checkpoint, train

def patch(target, point):
    state = {"save": 0, "rename": 0}

    def die():
        sys.stderr.flush()
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

answers = os.fdopen(os.dup(1), "w")
for line in sys.stdin:
    kill, argv = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        code = 1
        try:
            if kill is not None:
                patch(*kill)
            train.main(argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
            print(e, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        sys.stderr.flush()
        os._exit(code)
    answers.write(json.dumps(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])) + "\n")
    answers.flush()
"""


class Launcher:
    """Runs dpldm.train jobs in children forked from one server process, each killed where asked."""

    def __init__(self, runs: Path, data: Path, log: Path) -> None:
        self.runs, self.data, self.log = runs, data, log
        env = {**os.environ, "DPLDM_NO_BAR": "1", "DPLDM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        self.server = subprocess.Popen([sys.executable, "-c", SERVER], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=log.open("w"), text=True)

    def __call__(self, out: Path, kill: tuple | None, *extra: str) -> int:
        """The job's exit status (negative: the signal that ended it)."""
        argv = train_args(self.runs, self.data, out, *ARGS, *extra)
        self.server.stdin.write(json.dumps([kill, argv]) + "\n")
        self.server.stdin.flush()
        answer = self.server.stdout.readline()
        assert answer, f"the fork server died: {self.stderr()}"
        return json.loads(answer)

    def stderr(self) -> str:
        return self.log.read_text()[-2000:]

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)


@pytest.fixture
def launch(tiny_runs: Path, tiny_private: Path, tmp_path: Path):
    launcher = Launcher(tiny_runs, tiny_private, tmp_path / "server.log")
    yield launcher
    launcher.close()


def killed(launch: Launcher, code: int) -> None:
    assert code == -signal.SIGKILL, f"expected a SIGKILL, got return code {code}: {launch.stderr()}"


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
def test_sigkill_in_every_window_then_resume_equals_uninterrupted(launch: Launcher, tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    assert launch(whole, None) == 0, launch.stderr()
    assert result(whole)["steps"] == 8
    out = tmp_path / "killed"

    # before the first checkpoint: step 1 taken, nothing on disk but the log; --resume starts again from step 0
    killed(launch, launch(out, (1, "enter")))
    assert (out / "log.jsonl").is_file() and not private_files(out)
    # inside a checkpoint write (step 2's, complete in its temporary folder): step 1 stays the latest
    killed(launch, launch(out, (2, "rename1"), "--resume"))
    assert latest_step(out) == 1 and [p.name for p in writes_left(out)]
    assert all((p / "state.pt").is_file() for p in writes_left(out))  # the private seeds, outside the checkpoint
    # between the renames (step 3's write): step 2 is only in checkpoint.prev
    killed(launch, launch(out, (2, "rename2"), "--resume"))
    assert not (out / "checkpoint").exists() and latest_step(out) == 2 and writes_left(out)
    # after a checkpoint, in the middle of training: killed in step 5, checkpoint of step 4 intact
    killed(launch, launch(out, (3, "enter"), "--resume"))
    assert latest_step(out) == 4 and not writes_left(out)
    # after training: the model being saved, the last checkpoint (step 7) still on disk
    killed(launch, launch(out, ("save_ldm", 1), "--resume"))
    assert latest_step(out) == 7
    # the model written, its checkpoints not yet deleted: it is not in place, so no releasable model ever sits
    # beside the noise seeds (a rerun is refused, and --resume saves it again)
    killed(launch, launch(out, ("saved_ldm", 1), "--resume"))
    assert latest_step(out) == 7 and not (out / "ldm").exists()
    assert launch(out, None, "--resume") == 0, launch.stderr()

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
