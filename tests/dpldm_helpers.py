"""Shared, session-scoped fixtures for the dpldm tests: a tiny pre-trained model and a tiny private set."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("DPLDM_NO_BAR", "1")


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<runs>/tiny/public/{autoencoder,ldm}: the tiny config pre-trained for a few steps on sklearn digits."""
    from dpldm import pretrain, pretrain_autoencoder

    runs = tmp_path_factory.mktemp("runs")
    pretrain_autoencoder.main(["--config", "tiny", "--runs", str(runs), "--steps", "2"])
    pretrain.main(["--config", "tiny", "--runs", str(runs), "--steps", "2"])
    return runs


@pytest.fixture(scope="session")
def tiny_private(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 real MNIST digits (6-7 per class) as an .npz: the private set of the fast tests."""
    from dpldm.data import mnist5k

    ds = mnist5k()
    idx = np.random.default_rng(0).choice(len(ds.train.labels), 64, replace=False)
    path = tmp_path_factory.mktemp("private") / "private.npz"
    np.savez(path, images=ds.train.images[idx, ..., 0], labels=ds.train.labels[idx])
    return path


def train_args(runs: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", "tiny", "--runs", str(runs), "--data", str(data), "--out", str(out), "--batch-size", "16",
            "--max-physical-batch-size", "16", "--epochs", "1", "--no-sample", *extra]
