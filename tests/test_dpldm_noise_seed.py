"""Seeding of the private streams (DP noise, Poisson sampling) in dpldm.train (issue 8, item 3).

By default they are seeded from the OS: the engine gets seed=None, two runs with the same --seed get different
noise, and the seeds reach no file but the private checkpoint (deleted when training finishes).
--deterministic-noise seeds them from --seed, reproducibly, with a warning.
"""

# ruff: noqa: F811  (pytest fixtures imported from tests.dpldm_helpers are redefined as arguments)
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import dpkernels
from dpldm import train
from tests.dpldm_helpers import tiny_private, tiny_runs, train_args  # noqa: F401 (fixtures)


def spy_make_private(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    original = dpkernels.PrivacyEngine.make_private

    def spy(self, **kwargs):
        calls.append({**kwargs, "engine": self})
        return original(self, **kwargs)

    monkeypatch.setattr(dpkernels.PrivacyEngine, "make_private", spy)
    return calls


def trained_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "ldm" / "unet" / "diffusion_pytorch_model.safetensors")


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def secret_ints(state: Any) -> set[int]:
    """The large integers of the engine's non-accountant state: the OS seeds (63 bits) and stream positions."""
    if isinstance(state, dict):
        return set().union(*(secret_ints(v) for k, v in state.items() if k != "accountant"))
    if isinstance(state, (list, tuple)):
        return set().union(*(secret_ints(v) for v in state))
    if isinstance(state, int) and not isinstance(state, bool) and state >= 2**20:
        return {state}
    return set()


def leaks(blob: bytes, secrets: set[int]) -> list[int]:
    """Secrets found in a file or output, written as decimal, hex, or raw 64-bit little-endian."""
    forms = {s: (str(s).encode(), hex(s).encode(), struct.pack("<Q", s)) for s in secrets}
    return [s for s, fs in forms.items() if any(f in blob for f in fs)]


def test_engine_seeded_from_os_by_default(tiny_runs: Path, tiny_private: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_make_private(monkeypatch)
    res = train.main(train_args(tiny_runs, tiny_private, tmp_path / "run", "--seed", "7", "--max-steps", "1"))
    assert calls[0]["seed"] is None and calls[0]["engine"].secure_mode is False
    assert res["noise_seeding"] == "os"


@pytest.mark.slow
def test_same_seed_gives_different_noise_by_default(tiny_runs: Path, tiny_private: Path, tmp_path: Path) -> None:
    """A rerun with the same --seed (e.g. after deleting one record) must not reuse the noise."""
    for name in ("a", "b"):
        train.main(train_args(tiny_runs, tiny_private, tmp_path / name, "--seed", "3"))
    assert not same_weights(trained_weights(tmp_path / "a"), trained_weights(tmp_path / "b"))


@pytest.mark.slow
def test_deterministic_noise_reproduces_and_warns(tiny_runs: Path, tiny_private: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_make_private(monkeypatch)
    for name in ("a", "b"):
        with pytest.warns(UserWarning, match="NO privacy guarantee"):
            res = train.main(train_args(tiny_runs, tiny_private, tmp_path / name, "--seed", "3",
                                        "--deterministic-noise"))
    assert [c["seed"] for c in calls] == [3, 3]
    assert res["noise_seeding"].startswith("deterministic")
    assert same_weights(trained_weights(tmp_path / "a"), trained_weights(tmp_path / "b"))
    assert "WARNING --deterministic-noise" in (tmp_path / "b" / "log.jsonl").read_text()


@pytest.mark.slow
def test_noise_state_only_in_private_checkpoint(tiny_runs: Path, tiny_private: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                               caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "run"
    args = [a for a in train_args(tiny_runs, tiny_private, out, "--epochs", "2") if a != "--no-sample"]
    train.main(args + ["--max-steps", "3", "--checkpoint-every", "2"])
    ckpt = out / "checkpoint"
    assert "PRIVATE" in (ckpt / "PRIVATE.txt").read_text()
    engine_state = torch.load(ckpt / "state.pt", weights_only=False)["engine"]
    secrets = secret_ints(engine_state)
    assert secrets, "the checkpoint holds no noise seed: a resumed run could not continue the private stream"

    restored: list[dict] = []  # the resumed run continues the checkpoint's streams, not fresh ones
    original = train.load_train_state

    def spy(folder, model, opt, engine):
        step = original(folder, model, opt, engine)
        restored.append(engine.state_dict())
        return step

    monkeypatch.setattr(train, "load_train_state", spy)
    res = train.main(args + ["--resume", "--per-class", "1", "--no-eval"])  # evaluation never sees the engine
    assert res["steps"] == res["total_steps"]
    assert secret_ints(restored[0]) == secrets
    assert not ckpt.exists() and not (out / "checkpoint.prev").exists()  # finished: the seeds are gone

    printed = capsys.readouterr()
    outputs = {"stdout": printed.out.encode(), "stderr": printed.err.encode(), "logging": caplog.text.encode()}
    outputs.update({str(f.relative_to(out)): f.read_bytes() for f in out.rglob("*") if f.is_file()})
    assert {"log.jsonl", "result.json", "samples.npz", "grid.png"} <= outputs.keys()
    assert any(k.startswith("ldm/") for k in outputs)
    found = {name: leaks(blob, secrets) for name, blob in outputs.items()}
    assert not any(found.values()), found


@pytest.mark.slow
def test_noise_mode_is_part_of_the_run(tiny_runs: Path, tiny_private: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="contradict"):
        train.main(train_args(tiny_runs, tiny_private, tmp_path / "x", "--secure-mode", "--deterministic-noise"))
    out = tmp_path / "run"
    train.main(train_args(tiny_runs, tiny_private, out, "--max-steps", "1"))
    with pytest.raises(SystemExit, match="deterministic_noise: checkpoint False, now True"):
        train.main(train_args(tiny_runs, tiny_private, out, "--resume", "--deterministic-noise"))
