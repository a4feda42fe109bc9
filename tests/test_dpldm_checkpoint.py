"""Checkpoints that are corrupt, truncated or half-written (issue 11, item 4): refused with the reason, resumed from
the previous intact one, never left as the latest."""

# ruff: noqa: F811  (pytest fixtures imported from tests.dpldm_helpers are redefined as arguments)
from __future__ import annotations

import errno
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dpldm import checkpoint, train
from tests.dpldm_helpers import tiny_private, tiny_runs, train_args  # noqa: F401

STEPS = ["--epochs", "2", "--deterministic-noise", "--checkpoint-every", "1"]


def run_to(runs: Path, data: Path, out: Path, *extra: str) -> dict:
    with pytest.warns(UserWarning, match="NO privacy"):
        return train.main(train_args(runs, data, out, *STEPS, *extra))


def weights(out: Path) -> dict:
    return load_file(out / "ldm" / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.slow
def test_corrupt_latest_falls_back_to_previous_and_ends_as_uninterrupted(tiny_runs: Path, tiny_private: Path,
                                                                         tmp_path: Path, capsys) -> None:
    whole = run_to(tiny_runs, tiny_private, tmp_path / "whole")
    out = tmp_path / "cut"
    run_to(tiny_runs, tiny_private, out, "--max-steps", "3")
    ckpt = out / "checkpoint"
    assert checkpoint.latest_checkpoint(ckpt)[1]["step"] == 3
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    resumed = run_to(tiny_runs, tiny_private, out, "--resume")
    assert "model.safetensors corrupt or truncated" in capsys.readouterr().out
    assert resumed["steps"] == whole["steps"] and resumed["epsilon"] == pytest.approx(whole["epsilon"])
    a, b = weights(tmp_path / "whole"), weights(out)
    assert all((a[k] == b[k]).all() for k in a), "resuming from step 2 must replay steps 3.. exactly"
    assert not ckpt.exists() and not checkpoint.previous(ckpt).exists()


def test_no_intact_checkpoint_is_refused(tiny_runs: Path, tiny_private: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_to(tiny_runs, tiny_private, out, "--max-steps", "2")
    for folder in (out / "checkpoint", out / "checkpoint.prev"):
        state = folder / "state.pt"
        state.write_bytes(state.read_bytes()[:-10])
    with pytest.raises(SystemExit, match="no intact checkpoint.*state.pt corrupt or truncated"):
        run_to(tiny_runs, tiny_private, out, "--resume")


def test_full_disk_while_checkpointing_keeps_the_previous_latest(tiny_runs: Path, tiny_private: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    real, calls = checkpoint.save_file, []

    def full_disk(tensors: dict, path: Path) -> None:
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint: half a file, then ENOSPC
            Path(path).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        run_to(tiny_runs, tiny_private, out)
    found, meta, refused = checkpoint.latest_checkpoint(out / "checkpoint")
    assert found == out / "checkpoint" and meta["step"] == 1 and not refused
    assert [p.name for p in out.iterdir() if p.name.startswith(".checkpoint")] == []  # no half-written folder left
    monkeypatch.setattr(checkpoint, "save_file", real)
    assert run_to(tiny_runs, tiny_private, out, "--resume")["steps"] == 8


def test_a_new_run_clears_the_earlier_runs_model_and_adapted_autoencoder(tmp_path: Path) -> None:
    """Else a new run without warmup.autoencoder_steps would leave an old adapted autoencoder beside its ldm/."""
    out = tmp_path / "run"
    for folder in ("ldm", "autoencoder", "warmup"):
        (out / folder).mkdir(parents=True)
    (out / "log.jsonl").write_text("{}\n")
    checkpoint.clear_for_new_run(out, checkpoint.checkpoint_dir(out, 0), 0, 1)
    assert sorted(p.name for p in out.iterdir()) == ["warmup"]  # a new warm-up writes its own release over it
