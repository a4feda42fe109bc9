"""Each stage on the tiny config: CLI help, pre-training, checkpoints, sampling, evaluation, end to end."""

# ruff: noqa: F811  (pytest fixtures imported from tests.dpldm_helpers are redefined as arguments)
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dpldm import evaluate, pretrain, pretrain_autoencoder, sample, train
from dpldm.config import load_config
from dpldm.files import atomic_dir
from dpldm.models import CheckpointError, build_unet, load_autoencoder, load_ldm, save_ldm
from tests.dpldm_helpers import tiny_private, tiny_runs, train_args  # noqa: F401 (fixtures)

STAGES = [pretrain_autoencoder, pretrain, train, sample, evaluate]


@pytest.mark.parametrize("stage", STAGES, ids=lambda m: m.__name__)
def test_help(stage, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        stage.main(["--help"])
    assert e.value.code == 0
    assert "usage: python -m " + stage.__name__ in capsys.readouterr().out


def test_module_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "dpldm.train", "--help"], capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0 and "--target-epsilon" in out.stdout and "--noise-multiplicity" in out.stdout


def test_pretrained_checkpoints_reload(tiny_runs: Path) -> None:
    cfg = load_config("tiny")
    pub = tiny_runs / "tiny" / "public"
    vae = load_autoencoder(pub / "autoencoder", cfg)
    assert (pub / "autoencoder" / "diffusion_pytorch_model.safetensors").is_file()
    assert vae.config.scaling_factor != 0.18215  # measured on the public latents, not diffusers' default
    model, meta = load_ldm(pub / "ldm", cfg)
    assert meta["stage"] == "pretrain" and (pub / "ldm" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    fresh = build_unet(cfg)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert (pub / "logs" / "ldm" / "log.jsonl").read_text().count("\n") >= 2


def test_mismatched_checkpoint_refused(tiny_runs: Path) -> None:
    cfg = load_config("tiny", ["unet.block_out_channels=[16, 48]"])
    with pytest.raises(CheckpointError, match=r"does not match the config \(block_out_channels"):
        load_ldm(tiny_runs / "tiny" / "public" / "ldm", cfg)
    with pytest.raises(SystemExit, match="does not match the config"):
        train.main(["--config", "tiny", "--runs", str(tiny_runs), "--set", "unet.block_out_channels=[16, 48]",
                    "--no-sample", "--max-steps", "1"])


@pytest.mark.slow
def test_cache_pretrained_on_other_public_data_refused(tiny_runs: Path, tiny_private: Path, tmp_path: Path) -> None:
    pub = tiny_runs / "tiny" / "public"
    before = sorted(p.name for p in pub.iterdir())
    with pytest.raises(SystemExit, match=r"pre-trained on public data 'digits', but config tiny names 'fontdigits'"):
        train.main(train_args(tiny_runs, tiny_private, tmp_path / "a", "--set", "data.public=fontdigits"))
    assert sorted(p.name for p in pub.iterdir()) == before  # nothing erased
    # named explicitly, the same folders are used as given
    res = train.main(train_args(tiny_runs, tiny_private, tmp_path / "b", "--set", "data.public=fontdigits",
                                "--autoencoder", str(pub / "autoencoder"), "--pretrained", str(pub / "ldm")))
    assert res["steps"] == res["total_steps"]


def test_atomic_dir_keeps_old_on_failure(tmp_path: Path) -> None:
    cfg = load_config("tiny")
    dest = tmp_path / "ldm"
    save_ldm(build_unet(cfg), dest)
    before = (dest / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()

    def crash(tmp: Path) -> None:
        (tmp / "partial").write_text("x")
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError):
        atomic_dir(dest, crash)
    assert (dest / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert not (dest / "partial").exists() and [p.name for p in tmp_path.iterdir()] == ["ldm"]


@pytest.mark.slow
def test_sample_and_evaluate_stages(tiny_runs: Path, tmp_path: Path) -> None:
    ldm = tiny_runs / "tiny" / "public" / "ldm"
    sample.main(["--config", "tiny", "--runs", str(tiny_runs), "--ldm", str(ldm), "--out", str(tmp_path),
                 "--per-class", "3", "--ddim-steps", "2", "--guidance-scale", "1.5"])
    with np.load(tmp_path / "samples.npz") as z:
        assert z["images"].shape == (30, 28, 28, 1) and z["images"].dtype == np.uint8
        assert np.bincount(z["labels"]).tolist() == [3] * 10
    from PIL import Image

    from dpldm.sample import label_column

    width = label_column([str(c) for c in range(10)], 4 * 28, 1).shape[1]  # 10 labelled rows of 10 samples, 4x
    assert Image.open(tmp_path / "grid.png").size == (width + 10 * 4 * 28, 10 * 4 * 28)
    evaluate.main(["--config", "tiny", "--synthetic", str(tmp_path / "samples.npz"), "--cnn-epochs", "1",
                   "--no-sklearn", "--no-baselines"])
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["n_test"] == 1000 and 0.0 <= res["cnn_test_acc"] <= 1.0
    assert np.isfinite(res["frechet_distance_public_cnn"]) and res["frechet_distance_public_cnn"] > 0


def test_frechet_distance_known_values() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert evaluate.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # N(0, I) vs N(m, 4 I): |m|^2 + tr(I + 4I - 2*2I) = |m|^2 + 3
    b = rng.normal(size=(4000, 3)) * 2 + np.array([1.0, 0.0, 0.0])
    assert evaluate.frechet_distance(a, b) == pytest.approx(4.0, rel=0.1)


def test_inception_fid_with_local_torchscript(tmp_path: Path) -> None:
    class FakeInception(torch.nn.Module):  # NVIDIA's TorchScript signature: model(uint8 images, return_features)
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return x.float().mean(dim=(2, 3))

    path = tmp_path / "inception.pt"
    torch.jit.script(FakeInception()).save(str(path))
    imgs = np.random.default_rng(0).integers(0, 256, (20, 28, 28, 1), dtype=np.uint8)
    f = evaluate.inception_features(path, imgs)
    assert f.shape == (20, 3)
    assert np.allclose(f[:, 0], f[:, 1])  # grayscale replicated to 3 channels


@pytest.mark.slow
def test_train_end_to_end_with_sampling(tiny_runs: Path, tiny_private: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [a for a in train_args(tiny_runs, tiny_private, out) if a != "--no-sample"]
    res = train.main(args + ["--per-class", "2"])
    assert res["steps"] == res["total_steps"] == 4  # N=51 train, batch 16 -> q = 1/4
    assert 0 < res["epsilon"] <= 10.0 + 1e-6
    for f in ("samples.npz", "grid.png", "eval.json", "result.json", "log.jsonl", "ldm/unet/config.json"):
        assert (out / f).exists(), f
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("epsilon" in r for r in log) and any(r.get("stage") == "evaluate" for r in log)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
                    reason="dataset-fashion-mnist not installed (apt-get install -y dataset-fashion-mnist)")
@pytest.mark.slow
def test_fmnist_private_with_mnist_public(tmp_path: Path) -> None:
    """The fmnist preset's data path (private Fashion-MNIST 60k, public MNIST digits) on the tiny models."""
    res = train.main(["--config", "tiny", "--set", "data.private=fmnist", "--set", "data.public=mnist5k",
                      "--runs", str(tmp_path), "--max-steps", "1", "--no-sample", "--batch-size", "64"])
    assert res["steps"] == 1 and res["total_steps"] == 938  # q = 1/ceil(60000/64)
    assert res["delta"] == 1e-5
    log = (tmp_path / "tiny" / "public" / "logs" / "ldm" / "log.jsonl").read_text()
    assert "public latents (3, 8, 8) (mnist5k)" in log
