"""The DP warm-up (dpldm.warmup, issue 19): its release is the Gaussian mechanism at sensitivity 1, accounted by
composition with the DP-SGD steps that follow, made once per run, and nothing after it reads the private images."""

# ruff: noqa: F811  (pytest fixtures imported from tests.dpldm_helpers are redefined as arguments)
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dpldm import train, warmup
from dpldm.calibration import composed_epsilon, noise_multiplier
from tests.dpldm_helpers import tiny_private, tiny_runs, train_args  # noqa: F401

SETTINGS = warmup.Settings(sigma=4.0, frequencies=8, clip=6.0, per_class=8, steps=6, batch_size=16, lr=1e-3)
WARMUP = ("--set", ("warmup={sigma: 4.0, frequencies: 8, clip: 6.0, per_class: 8, steps: 6, batch_size: 16, "
                    "lr: 0.001}"))


def hostile_images(rng: np.random.Generator, n: int) -> np.ndarray:
    """Images a hostile user would add: all white, checkerboards, single bright pixels, noise."""
    white = np.full((1, 28, 28, 1), 255, np.uint8)
    checker = ((np.indices((28, 28)).sum(0) % 2) * 255).astype(np.uint8)[None, ..., None]
    dot = np.zeros((1, 28, 28, 1), np.uint8)
    dot[0, 0, 0] = 255
    noise = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    return np.concatenate([white, checker, dot, noise])


def test_one_example_moves_the_released_vector_by_at_most_one() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (40, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 3, 40)
    before = warmup.statistics(base, labels, 3, SETTINGS.clip, SETTINGS.frequencies)
    worst = 0.0
    for x in hostile_images(rng, 20):
        for c in range(3):
            after = warmup.statistics(np.concatenate([base, x[None]]), np.append(labels, c), 3, SETTINGS.clip,
                                      SETTINGS.frequencies)
            worst = max(worst, float(np.linalg.norm(after - before)))
    assert 0.9 < worst <= 1.0 + 1e-9, worst  # the bound is reached (clipped images), never passed


def test_release_is_the_statistics_plus_gaussian_noise_of_std_sigma() -> None:
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (50, 28, 28, 1), dtype=np.uint8), rng.integers(0, 2, 50)
    exact = warmup.statistics(images, labels, 2, SETTINGS.clip, SETTINGS.frequencies)
    rel = warmup.release(images, labels, 2, SETTINGS, np.random.default_rng(2))
    a, b, cw = warmup.scales(SETTINGS.clip)
    d = rel.sums.shape[1]
    iu = np.triu_indices(d)
    noisy = np.concatenate([rel.sums / a, rel.second_moments[:, iu[0], iu[1]] / b, rel.counts[:, None] / cw], 1)
    noise = (noisy - exact).ravel()
    se = 5 / np.sqrt(noise.size)  # five standard errors
    assert abs(noise.std() / SETTINGS.sigma - 1) < se and abs(noise.mean()) < SETTINGS.sigma * se, noise.std()
    assert np.allclose(rel.second_moments, rel.second_moments.transpose(0, 2, 1))


def test_low_noise_release_gives_each_class_its_gaussian_and_samples_follow_it() -> None:
    rng = np.random.default_rng(3)
    basis = warmup.basis(28, 28, 6)
    labels = np.repeat([0, 1], 400)
    # smooth mid-grey images (no pixel clipped), class 1 brighter and more varied: a Gaussian in the kept basis
    coef = rng.normal(0, 1.0, (800, len(basis))) * np.where(labels[:, None] == 1, 1.5, 1.0)
    coef[:, 0] += np.where(labels == 1, 14.0, 12.0)
    images = np.clip(np.rint((coef @ basis).reshape(800, 28, 28, 1) * 255), 0, 255).astype(np.uint8)
    z = warmup.coefficients(images, 6)
    s = warmup.Settings(sigma=1e-6, frequencies=6, clip=40.0, per_class=4000, steps=0, batch_size=1, lr=1.0)
    rel = warmup.release(images, labels, 2, s, np.random.default_rng(4))
    assert np.allclose(rel.counts, [400, 400], atol=1e-3)
    means, roots = rel.gaussians()
    fake, fake_labels = rel.sample(4000, np.random.default_rng(5))
    zf = warmup.coefficients(fake, 6)
    for c in range(2):
        zc = z[labels == c]
        assert np.allclose(means[c], zc.mean(0), atol=1e-4)
        assert np.allclose(roots[c] @ roots[c].T, np.cov(zc.T, bias=True), atol=1e-4)
        assert np.abs(zf[fake_labels == c].mean(0) - zc.mean(0)).max() < 0.1  # sampling error ~ 1.5 / sqrt(4000)
        assert np.abs(np.cov(zf[fake_labels == c].T) - np.cov(zc.T)).max() < 0.5


def test_composed_calibration_spends_the_target_and_counts_the_release() -> None:
    prior = SETTINGS.history()
    n, b, epochs = 6000, 256, 3
    steps = epochs * -(-n // b)
    alone = noise_multiplier(2.0, 1e-5, n, b, epochs, "rdp")
    after = noise_multiplier(2.0, 1e-5, n, b, epochs, "rdp", prior=prior)
    assert after > alone  # the release's share is paid for with more noise in DP-SGD
    eps = composed_epsilon([*prior, (after, 1 / -(-n // b), steps)], 1e-5, "rdp")
    assert 1.99 <= eps <= 2.0
    # the RDP of the release is alpha / (2 sigma^2): Opacus' RDP accountant on its history says the same
    from opacus.accountants.analysis.rdp import compute_rdp
    assert np.allclose(compute_rdp(q=1.0, noise_multiplier=4.0, steps=1, orders=[2.0, 8.0]), [2 / 32, 8 / 32])
    with pytest.raises(ValueError, match="alone spend"):
        noise_multiplier(0.1, 1e-5, n, b, epochs, "prv", prior=[(0.5, 1.0, 1)])


def test_settings_are_checked() -> None:
    assert warmup.Settings.of({}) is None and warmup.Settings.of({"warmup": None}) is None
    with pytest.raises(warmup.WarmupError, match="missing"):
        warmup.Settings.of({"warmup": {"sigma": 1.0}})
    with pytest.raises(warmup.WarmupError, match="out of range"):
        warmup.Settings.of({"warmup": {**vars(SETTINGS), "sigma": 0.0}})


def test_sigma_by_target_epsilon() -> None:
    """A table {epsilon: sigma} picks the entry at or below the target; the config's own target by default."""
    table = {1: 5.0, 10: 1.0}
    cfg = {"warmup": {**vars(SETTINGS), "sigma": table}, "train": {"target_epsilon": 10.0}}
    assert warmup.Settings.of(cfg).sigma == 1.0
    assert [warmup.Settings.of(cfg, e).sigma for e in (0.5, 1.0, 3.0, 9.99, 10.0, 50.0)] == [5.0, 5.0, 5.0, 5.0,
                                                                                           1.0, 1.0]
    assert warmup.Settings.of(cfg, 1.0).history() == [(5.0, 1.0, 1)]
    for bad, match in (({}, "positive"), ({1: 0.0}, "positive"), ({"x": 1.0}, "numbers")):
        with pytest.raises(warmup.WarmupError, match=match):
            warmup.Settings.of({**cfg, "warmup": {**cfg["warmup"], "sigma": bad}})
    with pytest.raises(warmup.WarmupError, match="depends on the target epsilon"):
        warmup.Settings.of({"warmup": cfg["warmup"]})


def run_args(runs: Path, data: Path, out: Path, *extra: str) -> list[str]:
    # RDP unless a test passes --accountant: its calibration takes a fraction of PRV's seconds
    accountant = () if "--accountant" in extra else ("--accountant", "rdp")
    return train_args(runs, data, out, "--deterministic-noise", "--checkpoint-every", "1", *accountant, *WARMUP,
                      *extra)


@pytest.mark.filterwarnings("ignore:--deterministic-noise")
def test_a_run_with_warmup_accounts_the_release_and_resumes_without_releasing_again(
        tiny_runs: Path, tiny_private: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prv = ("--accountant", "prv")  # the default accountant, with the release at sample rate 1 in its history
    whole = train.main(run_args(tiny_runs, tiny_private, tmp_path / "whole", *prv))
    assert whole["accountant_history"][0] == [4.0, 1.0, 1] and whole["steps"] == 4
    dp_sgd_only = composed_epsilon(whole["accountant_history"][1:], whole["delta"], "prv")
    assert dp_sgd_only < whole["epsilon"] <= 10.0 + 1e-9
    assert whole["warmup"]["epsilon_alone"] == pytest.approx(composed_epsilon([(4.0, 1.0, 1)], whole["delta"], "prv"))
    plain = noise_multiplier(10.0, whole["delta"], 64, 16, 1, "prv", quiet=True)  # a run without the warm-up's
    assert whole["sigma"] > plain  # the same target epsilon with the release in it

    # stopped after 2 DP steps, resumed: no second release (counted), the model as uninterrupted
    out = tmp_path / "killed"
    train.main(run_args(tiny_runs, tiny_private, out, *prv, "--max-steps", "2"))
    calls = []
    real = warmup.release
    monkeypatch.setattr(warmup, "release", lambda *a, **k: calls.append(1) or real(*a, **k))
    res = train.main(run_args(tiny_runs, tiny_private, out, *prv, "--resume"))
    assert calls == [] and res["accountant_history"] == whole["accountant_history"]
    a, b = (load_file(d / "ldm" / "unet" / "diffusion_pytorch_model.safetensors") for d in (tmp_path / "whole", out))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert res["epsilon"] == whole["epsilon"]


@pytest.mark.filterwarnings("ignore:--deterministic-noise")
def test_a_restart_reuses_the_release_on_disk_and_refuses_another_one(
        tiny_runs: Path, tiny_private: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    path = out / "warmup" / warmup.RELEASE_FILE

    class Killed(Exception):
        pass

    def killed(*a, **k):  # the process dies in the warm-up training, after the release reached the disk
        raise Killed

    monkeypatch.setattr(warmup, "train_on_samples", killed)
    with pytest.raises(Killed):
        train.main(run_args(tiny_runs, tiny_private, out))
    monkeypatch.undo()
    first = path.read_bytes()
    calls = []
    real = warmup.release
    monkeypatch.setattr(warmup, "release", lambda *a, **k: calls.append(1) or real(*a, **k))
    train.main(run_args(tiny_runs, tiny_private, out, "--resume", "--max-steps", "1"))
    assert calls == [] and path.read_bytes() == first  # RESTART: the same release, not a second one
    # a release made with other settings is refused, not silently replaced
    other = tmp_path / "other"
    monkeypatch.setattr(warmup, "train_on_samples", killed)
    with pytest.raises(Killed):
        train.main(run_args(tiny_runs, tiny_private, other))
    monkeypatch.undo()
    rel = warmup.Release.load(other / "warmup" / warmup.RELEASE_FILE)
    warmup.Release(rel.sums, rel.second_moments, rel.counts, rel.shape, 9.0, rel.clip, rel.frequencies).save(
        other / "warmup" / warmup.RELEASE_FILE)
    with pytest.raises(SystemExit, match="other settings"):
        train.main(run_args(tiny_runs, tiny_private, other, "--resume"))


@pytest.mark.filterwarnings("ignore:--deterministic-noise")
def test_a_sigma_table_releases_at_the_runs_target_epsilon(tiny_runs: Path, tiny_private: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    class Killed(Exception):
        pass

    def killed(*a, **k):  # stop once the release is on disk: its sigma is what is checked
        raise Killed

    monkeypatch.setattr(warmup, "train_on_samples", killed)
    table = ("--set", "warmup.sigma={2: 6.0, 10: 4.0}")
    for eps, sigma in ((3.0, 6.0), (10.0, 4.0)):
        out = tmp_path / f"eps{eps:g}"
        with pytest.raises(Killed):
            train.main(run_args(tiny_runs, tiny_private, out, *table, "--target-epsilon", str(eps)))
        assert warmup.Release.load(out / "warmup" / warmup.RELEASE_FILE).sigma == sigma


@pytest.mark.parametrize("autoencoder_steps", [0, 3])
def test_nothing_after_the_release_reads_the_private_images(tiny_runs: Path, tiny_private: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            autoencoder_steps: int) -> None:
    """The warm-up training (and the autoencoder's adaptation before it) sees only the release's samples and public
    images: replace the private images by others after the release and the warmed latents are the same."""
    adapt = ("--set", f"warmup.autoencoder_steps={autoencoder_steps}")
    seen = {}
    real_train = warmup.train_on_samples

    def spy(model, latents, labels, *a, **k):
        seen.setdefault("latents", []).append(latents.clone())
        return real_train(model, latents, labels, *a, **k)

    monkeypatch.setattr(warmup, "train_on_samples", spy)
    rel = {}
    real_release = warmup.release

    def fixed_release(images, labels, num_classes, settings, rng):
        rel.setdefault("r", real_release(images, labels, num_classes, settings, np.random.default_rng(0)))
        return rel["r"]

    monkeypatch.setattr(warmup, "release", fixed_release)
    with pytest.warns(UserWarning, match="NO privacy"):
        train.main(run_args(tiny_runs, tiny_private, tmp_path / "a", "--max-steps", "1", *adapt))
    other = tmp_path / "other.npz"
    with np.load(tiny_private) as f:
        np.savez(other, images=255 - f["images"], labels=f["labels"])
    with pytest.warns(UserWarning, match="NO privacy"):
        train.main(run_args(tiny_runs, other, tmp_path / "b", "--max-steps", "1", *adapt))
    assert torch.equal(seen["latents"][0], seen["latents"][1])
    assert (tmp_path / "a" / "autoencoder").is_dir() == bool(autoencoder_steps)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:--deterministic-noise")
def test_the_adapted_autoencoder_is_the_runs_own_through_resume_and_sampling(
        tiny_runs: Path, tiny_private: Path, tmp_path: Path) -> None:
    """warmup.autoencoder_steps: the adapted autoencoder is saved in the run, a resume uses it (the model equals
    the uninterrupted run's), the LDM records it, and dpldm.sample decodes with it, never silently with the base's."""
    import shutil

    from dpldm import sample
    from dpldm.config import load_config
    from dpldm.models import load_autoencoder

    adapt = ("--set", "warmup.autoencoder_steps=4", "--set", "warmup.autoencoder_batch_size=8")
    whole = tmp_path / "whole"
    train.main(run_args(tiny_runs, tiny_private, whole, *adapt))
    out = tmp_path / "killed"
    train.main(run_args(tiny_runs, tiny_private, out, "--max-steps", "2", *adapt))
    train.main(run_args(tiny_runs, tiny_private, out, "--resume", *adapt))
    for part in ("ldm/unet/diffusion_pytorch_model.safetensors", "autoencoder/diffusion_pytorch_model.safetensors"):
        a, b = load_file(whole / part), load_file(out / part)
        assert all(torch.equal(a[k], b[k]) for k in a), part
    base = load_file(tiny_runs / "tiny" / "public" / "autoencoder" / "diffusion_pytorch_model.safetensors")
    ours = load_file(out / "autoencoder" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(base[k], ours[k]) for k in base), "the autoencoder was not adapted"
    meta = json.loads((out / "ldm" / "ldm.json").read_text())
    assert meta["autoencoder_adapted"] is True and meta["autoencoder"] == str(out / "autoencoder")

    moved = tmp_path / "moved"
    shutil.move(out, moved)
    args = sample.parser().parse_args(["--config", "tiny", "--runs", str(tiny_runs), "--ldm", str(moved / "ldm"),
                                        "--out", str(tmp_path / "s")])
    assert sample.default_autoencoder(args, load_config("tiny"), meta) == moved / "autoencoder"
    load_autoencoder(moved / "autoencoder", load_config("tiny"))
    shutil.rmtree(moved / "autoencoder")
    with pytest.raises(SystemExit, match="adapted autoencoder"):
        sample.main(["--config", "tiny", "--runs", str(tiny_runs), "--ldm", str(moved / "ldm"), "--out",
                     str(tmp_path / "s"), "--per-class", "1"])


def test_adapting_the_autoencoder_needs_public_data_and_no_compartments(tiny_runs: Path, tiny_private: Path,
                                                                       tmp_path: Path) -> None:
    from dpldm.compartments.train import RunError, check_config
    from dpldm.config import load_config

    with pytest.raises(SystemExit, match="names no public data"):
        train.main(run_args(tiny_runs, tiny_private, tmp_path / "run", "--set", "warmup.autoencoder_steps=2",
                            "--set", "data.public=null"))
    section = ("warmup={sigma: 4.0, frequencies: 8, clip: 6.0, per_class: 8, steps: 6, batch_size: 16, lr: 0.001, "
               "autoencoder_steps: 2}")
    cfg = load_config("tiny", [section])
    with pytest.raises(RunError, match="share the base's autoencoder"):
        check_config(cfg)


def test_every_preset_loads_its_warmup_and_matches_its_base() -> None:
    from dpldm.base_models import check_layout, verified_base
    from dpldm.config import load_config, presets

    with_warmup = []
    for name in presets():
        cfg = load_config(name)
        if warmup.Settings.of(cfg) is not None:
            with_warmup.append(name)
        if cfg.get("base"):
            check_layout(verified_base(cfg["base"]), cfg)
    assert {"fmnist", "fmnist-cpu"} <= set(with_warmup)


def test_the_gradient_signal_diagnostic_reads_a_finished_run(tiny_runs: Path, tiny_private: Path,
                                                             tmp_path: Path) -> None:
    """benchmarks/gradient_signal.py end to end at tiny size: the noise from the run's own sigma, C and batch; the
    statistics ordered; with a C that clips every gradient, the signal cannot exceed C."""
    import math

    from benchmarks import gradient_signal

    out = tmp_path / "run"
    train.main(run_args(tiny_runs, tiny_private, out))
    dp = gradient_signal.run_settings(out)
    common = [str(out), "--config", "tiny", "--runs", str(tiny_runs), "--data", str(tiny_private), "--images", "6"]
    row, = gradient_signal.main(common)
    assert row["clip"] == dp["max_grad_norm"] and row["noise"] == pytest.approx(
        dp["sigma"] * dp["max_grad_norm"] * math.sqrt(row["d"]) / dp["expected_batch_size"])
    assert 0 <= row["share_clipped"] <= 1 and row["norm_p10"] <= row["norm_p50"] <= row["norm_p90"]
    assert row["signal"] <= row["signal_upper"]
    # every gradient clipped to norm c: the unbiased estimate is (|sum|^2 - n c^2) / (n (n - 1)) <= c^2
    tiny, big = gradient_signal.main([*common, "--clip", "1e-6", "1e6"])
    assert tiny["share_clipped"] == 1 and tiny["signal"] <= 1e-6 * (1 + 1e-9)
    assert big["share_clipped"] == 0 and big["norm_p50"] == tiny["norm_p50"]
    # clipping every gradient to norm C scales each vector: |E c| / C only depends on the directions
    assert tiny["snr"] == pytest.approx(gradient_signal.main([*common, "--clip", "1e-3"])[0]["snr"], rel=1e-6)
    with pytest.raises(SystemExit, match="at least 3"):
        gradient_signal.main([*common[:-1], "2"])


def test_the_gradient_signal_estimate_is_the_pair_mean_with_its_jackknife_error() -> None:
    """pair_estimate against the brute force: the mean of c_i . c_j over i != j, and the jackknife recomputed by
    leaving each vector out; on many draws the estimate centres on ||mu||^2 (unbiased)."""
    from benchmarks.gradient_signal import pair_estimate

    rng = np.random.default_rng(0)
    c = rng.normal(size=(7, 5))
    gram = c @ c.T

    def pairs(idx):
        return np.mean([c[i] @ c[j] for i in idx for j in idx if i != j])

    est, se = pair_estimate(gram)
    loo = np.array([pairs([j for j in range(7) if j != i]) for i in range(7)])
    assert est == pytest.approx(pairs(range(7)))
    assert se == pytest.approx(np.sqrt(6 / 7 * ((loo - loo.mean()) ** 2).sum()))
    mu = np.full(5, 0.3)
    draws = [pair_estimate((x := mu + rng.normal(size=(20, 5))) @ x.T)[0] for _ in range(4000)]
    assert np.mean(draws) == pytest.approx(mu @ mu, abs=0.03)


def test_the_release_choice_measures_a_proxy_and_refuses_the_private_set(tmp_path: Path) -> None:
    """benchmarks/warmup_release_choice.py at tiny size: one row per sigma, its costs from the accountant (a noisier
    release spends less alone and leaves DP-SGD less noise); the config's private set is refused as a proxy."""
    from benchmarks import warmup_release_choice

    args = ["--config", "fmnist-cpu", "--per-class", "4", "--set", "evaluate.cnn_steps=2", "--targets", "10",
            "--n", "60000", "--out", str(tmp_path)]
    rows = warmup_release_choice.main([*args, "--proxy", "digits", "--sigma", "1", "5"])
    assert [r["sigma"] for r in rows] == [1.0, 5.0] and all(0.0 <= r["cnn_test_acc"] <= 1.0 for r in rows)
    assert rows[0]["release_epsilon"] > rows[1]["release_epsilon"]
    assert rows[0]["dpsgd_sigma_at_10"] > rows[1]["dpsgd_sigma_at_10"] > 0
    assert rows[1]["release_epsilon"] == pytest.approx(composed_epsilon([(5.0, 1.0, 1)], 1e-5, "prv"))
    with pytest.raises(SystemExit, match="private data set"):
        warmup_release_choice.main([*args, "--proxy", "fmnist"])


def test_a_compartment_plans_its_release_at_the_runs_target_epsilon() -> None:
    """A shard's reachability check composes the release the run's target epsilon picks from a sigma table, not
    the config's default target's."""
    import argparse

    from dpldm.compartments.registry import RunError
    from dpldm.compartments.train import plan_shard
    from dpldm.config import load_config

    section = ("warmup={sigma: {1: 0.3, 10: 5.0}, frequencies: 4, clip: 6.0, per_class: 2, steps: 1, batch_size: 4, "
               "lr: 0.001}")
    cfg = load_config("tiny", [section])
    args = argparse.Namespace(target_epsilon=10.0, epochs=1, accountant="rdp", no_dp=False)
    assert plan_shard(cfg, args, "a", 1000, 100, 1000, 1e-5)["n"] == 1000
    args.target_epsilon = 2.0  # picks sigma 0.3, whose release alone spends more than 2
    with pytest.raises(RunError, match="unreachable"):
        plan_shard(cfg, args, "a", 1000, 100, 1000, 1e-5)
