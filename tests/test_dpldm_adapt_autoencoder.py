"""dpldm.adapt_autoencoder: the public autoencoder fine-tuned on a release's samples plus public images."""

from __future__ import annotations

import copy

import pytest
import torch

from dpldm import adapt_autoencoder, pretrain_autoencoder
from dpldm.config import load_config
from dpldm.models import build_autoencoder
from tests.dpldm_helpers import tiny_runs  # noqa: F401 (fixture)


def sets() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny autoencoder; 'released' images are filled squares (a shape public strokes never show), public ones
    thin strokes."""
    torch.manual_seed(0)
    vae = build_autoencoder(load_config("tiny"))
    released = -torch.ones(32, 1, 32, 32)
    for i in range(32):
        a = 4 + i % 8
        released[i, :, a : a + 14, a : a + 14] = 1.0
    public = -torch.ones(32, 1, 32, 32)
    for i in range(32):
        public[i, :, 4 + i % 20, 6:26] = 1.0
    return vae, released, public


def mse(vae: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        vae.eval()
        return torch.nn.functional.mse_loss(vae.decode(vae.encode(x).latent_dist.mode()).sample, x).item()


def test_adapting_learns_the_released_shapes_and_keeps_the_scale() -> None:
    vae, released, public = sets()
    scale = vae.config.scaling_factor
    before = mse(vae, released)
    losses = adapt_autoencoder.adapt(vae, released, public, steps=60, batch_size=16, lr=3e-3, kl_weight=1e-6,
                                     seed=0)
    assert mse(vae, released) < 0.5 * before
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert vae.config.scaling_factor == scale and not vae.training
    assert not any(p.requires_grad for p in vae.parameters())


def test_every_batch_is_half_released_half_public(monkeypatch: pytest.MonkeyPatch) -> None:
    vae, released, public = sets()
    seen: list[torch.Tensor] = []
    original = pretrain_autoencoder.autoencoder_loss

    def spy(v, xb, kl_weight, generator=None):
        seen.append(xb.clone())
        return original(v, xb, kl_weight, generator)

    monkeypatch.setattr(pretrain_autoencoder, "autoencoder_loss", spy)  # what autoencoder_step calls
    adapt_autoencoder.adapt(vae, released, public, steps=3, batch_size=10, lr=1e-3, kl_weight=1e-6, seed=1)
    assert len(seen) == 3
    filled = (released > 0).flatten(1).sum(1)
    for xb in seen:
        assert xb.shape[0] == 10
        rows = (xb > 0).flatten(1).sum(1)
        assert all(r in filled for r in rows[:5].tolist())  # squares: 100+ lit pixels each
        assert (rows[5:] == 20).all()  # strokes: one 20-pixel line


def test_same_seed_same_autoencoder_and_zero_steps_change_nothing() -> None:
    vae, released, public = sets()
    twin = copy.deepcopy(vae)
    untouched = copy.deepcopy(vae)
    for v in (vae, twin):
        adapt_autoencoder.adapt(v, released, public, steps=4, batch_size=8, lr=1e-3, kl_weight=1e-6, seed=3)
    for a, b in zip(vae.state_dict().values(), twin.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    keep = copy.deepcopy(untouched)
    assert adapt_autoencoder.adapt(untouched, released, public, 0, 8, 1e-3, 1e-6, 0) == []
    for a, b in zip(untouched.state_dict().values(), keep.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("released_n,public_n,batch", [(0, 4, 8), (4, 0, 8), (4, 4, 1)])
def test_bad_inputs_are_refused(released_n: int, public_n: int, batch: int) -> None:
    vae, released, public = sets()
    with pytest.raises(ValueError, match="adapt: needs"):
        adapt_autoencoder.adapt(vae, released[:released_n], public[:public_n], 2, batch, 1e-3, 1e-6, 0)


def test_the_cap_benchmark_runs_on_a_release(tiny_runs, tmp_path) -> None:  # noqa: F811
    """benchmarks/autoencoder_cap.py end to end at tiny size: both caps measured and written."""
    import json

    import numpy as np

    from benchmarks import autoencoder_cap
    from dpldm import data, warmup

    ds = data.load("mnist5k")
    settings = warmup.Settings(sigma=5.0, frequencies=4, clip=14.0, per_class=3, steps=1, batch_size=8, lr=1e-3)
    rel = warmup.release(ds.train.images[:200], ds.train.labels[:200], 10, settings, np.random.default_rng(0))
    rel.save(tmp_path / "release.npz")
    rows = autoencoder_cap.main([
        "--config", "tiny", "--autoencoder", str(tiny_runs / "tiny" / "public" / "autoencoder"), "--release",
        str(tmp_path / "release.npz"), "--steps", "2", "--batch-size", "8", "--images", "40", "--out",
        str(tmp_path / "cap"), "--set", "evaluate.cnn_steps=2"])
    assert set(rows) == {"as shipped", "adapted, 2 steps"}
    written = json.loads((tmp_path / "cap" / "cap.json").read_text())
    assert written.pop("domain_gap")["ratio"] > 0 and written == rows
    for row in rows.values():
        assert 0 <= row["cnn_test_acc"] <= 1 and row["test_mse"] > 0


def test_the_domain_gap_reads_no_private_image(tiny_runs, tmp_path, monkeypatch) -> None:  # noqa: F811
    """--gap-only: the release's samples against public images and public Gaussians, the private set never loaded."""
    import numpy as np

    from benchmarks import autoencoder_cap
    from dpldm import data, warmup

    ds = data.load("mnist5k")
    settings = warmup.Settings(sigma=5.0, frequencies=4, clip=14.0, per_class=3, steps=1, batch_size=8, lr=1e-3)
    warmup.release(ds.train.images[:200], ds.train.labels[:200], 10, settings,
                   np.random.default_rng(0)).save(tmp_path / "release.npz")

    def no_private(*a, **k):
        raise AssertionError("the private set was loaded")

    monkeypatch.setattr(autoencoder_cap, "load_private", no_private)
    gap = autoencoder_cap.main(["--config", "tiny", "--autoencoder", str(tiny_runs / "tiny" / "public" /
                                "autoencoder"), "--release", str(tmp_path / "release.npz"), "--gap-only"])["gap"]
    assert set(gap) == {"release_samples", "public", "public_gaussians", "ratio"}
    assert all(v > 0 for v in gap.values())
    assert gap["ratio"] == gap["release_samples"] / gap["public_gaussians"]
    with pytest.raises(SystemExit, match="--gap-only needs --release"):
        autoencoder_cap.main(["--config", "tiny", "--gap-only"])
