"""Evaluation: the baselines beside the synthetic-data CNN (issue 9, item 3) and the labelled sample grid (item 2)."""

# ruff: noqa: F811  (pytest fixtures imported from tests.dpldm_helpers are redefined as arguments)
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dpldm import baselines, classifiers, evaluate, train
from dpldm.baselines import DPTarget, Tensors
from dpldm.config import load_config
from dpldm.data import DataSet, Split, digits28, mnist5k
from dpldm.sample import label_column, save_grid
from tests.dpldm_helpers import tiny_private, tiny_runs, train_args  # noqa: F401 (fixtures)

BASELINE_KEYS = ("baseline_public_cnn_test_acc", "baseline_dpsgd_cnn_test_acc",
                 "baseline_dpsgd_public_init_cnn_test_acc", "baseline_nonprivate_cnn_test_acc")
DP_HP = {"epochs": 2, "batch_size": 16, "max_physical_batch_size": 16, "max_grad_norm": 1.0, "lr": 0.5,
         "momentum": 0.9}


@pytest.fixture(scope="module")
def small_real() -> DataSet:
    """A small private set: 64 MNIST train images, 200 test images (the real splits, cut down for speed)."""
    ds = mnist5k()
    return DataSet(Split(ds.train.images[:64], ds.train.labels[:64]), Split(ds.test.images[:200], ds.test.labels[:200]),
                   10, "mnist5k-small")


def as_tensors(split: Split) -> Tensors:
    return Tensors(classifiers.to_input(split.images), torch.from_numpy(split.labels))


class EngineSpy:
    """Wraps PrivacyEngine.make_private: records each engine and the data its loader was built on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from dpkernels import PrivacyEngine

        self.calls: list[tuple[PrivacyEngine, dict]] = []
        real = PrivacyEngine.make_private

        def spy(engine: PrivacyEngine, **kwargs):
            self.calls.append((engine, kwargs))
            return real(engine, **kwargs)

        monkeypatch.setattr(PrivacyEngine, "make_private", spy)


# --- (b) DP-SGD goes through the engine, at the requested epsilon -------------------------------------------------
def test_dpsgd_baseline_uses_engine_at_target_epsilon(small_real: DataSet, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = EngineSpy(monkeypatch)
    target = DPTarget(epsilon=4.0, delta=1e-5)
    train_t = as_tensors(small_real.train)
    model, info = baselines.dpsgd(train_t, 10, target, DP_HP)
    assert len(spy.calls) == 1
    engine, kwargs = spy.calls[0]
    assert kwargs["module"] is model and kwargs["poisson_sampling"] is True and kwargs["seed"] is None  # OS seeds
    assert kwargs["noise_multiplier"] > 0 and info["sigma"] == kwargs["noise_multiplier"]
    assert torch.equal(kwargs["data_loader"].dataset.tensors[0], train_t.x)  # the private train split, nothing else
    spent = engine.get_epsilon(target.delta)
    assert spent == pytest.approx(info["epsilon"]) and 0.95 * target.epsilon <= spent <= target.epsilon + 1e-6
    assert info["steps"] == DP_HP["epochs"] * math.ceil(64 / DP_HP["batch_size"]) == 8  # q = 1/4, 2 epochs
    assert model._dpkernels_engine is engine and not model.training


def test_dpsgd_baseline_empty_poisson_batch_still_steps() -> None:
    """8 examples at expected batch 1: q = 1/8, so some of the 16 Poisson batches are empty; each still steps."""
    x = torch.randn(8, 1, 28, 28)
    hp = {**DP_HP, "batch_size": 1, "max_physical_batch_size": 4}
    _, info = baselines.dpsgd(Tensors(x, torch.arange(8) % 10), 10, DPTarget(10.0, 1e-5), hp, noise_seed=0)
    assert info["empty_batches"] > 0  # seed 0 draws some (5 of the 16); the accountant counts them all
    assert info["steps"] == 16


def test_dpsgd_public_init_starts_from_the_public_cnn(small_real: DataSet) -> None:
    """lr 0 keeps the initial weights: (b2)'s are the public CNN's, (b)'s a fresh SmallCNN's (seed 0); a public CNN
    with another label count gives its feature layers only."""
    hp = {**DP_HP, "epochs": 1, "lr": 0.0}
    train_t = as_tensors(small_real.train)
    public = classifiers.SmallCNN(1, 10)
    torch.nn.init.constant_(public.features[0].weight, 0.5)
    target = DPTarget(10.0, 1e-5)
    b2, _ = baselines.dpsgd(train_t, 10, target, hp, init=public, sigma=1.0)
    for (name, p), q in zip(b2.state_dict().items(), public.state_dict().values()):
        assert torch.equal(p, q), name
    b, _ = baselines.dpsgd(train_t, 10, target, hp, sigma=1.0)
    torch.manual_seed(0)
    fresh = classifiers.SmallCNN(1, 10)
    for (name, p), q in zip(b.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(p, q), name
    other = classifiers.SmallCNN(1, 26)
    b2_other, _ = baselines.dpsgd(train_t, 10, target, hp, init=other, sigma=1.0)
    assert torch.equal(b2_other.features[3].weight, other.features[3].weight)
    assert torch.equal(b2_other.head[1].weight, fresh.head[1].weight)  # a fresh head for the private labels


def test_dpsgd_unreachable_epsilon_is_skipped_with_a_note(small_real: DataSet) -> None:
    cfg = load_config("tiny", [f"evaluate.dp_baseline={json.dumps(DP_HP)}", "evaluate.nonprivate_cnn_epochs=1"])
    t = as_tensors(small_real.test)
    res = baselines.run(cfg, as_tensors(small_real.train), t, 10, DPTarget(1e-6, 1e-5), None, None)
    assert "baseline_dpsgd_cnn_test_acc" not in res and "DP-SGD baselines skipped" in res["baselines_note"]
    assert 0.0 <= res["baseline_nonprivate_cnn_test_acc"] <= 1.0


def test_every_column_trains_the_configured_classifier(small_real: DataSet, monkeypatch: pytest.MonkeyPatch) -> None:
    """evaluate.cnn (the fmnist preset's GroupNorm CNN) reaches every column, the DP-SGD ones through the engine (which
    takes GroupNorm), and (c)'s features give the synthetic data's Frechet distance."""
    arch = load_config("fmnist")["evaluate"]["cnn"]
    assert arch["groups"]
    cfg = load_config("tiny", [f"evaluate.dp_baseline={json.dumps(DP_HP)}", "evaluate.nonprivate_cnn_epochs=1",
                               f"evaluate.cnn={json.dumps(arch)}"])
    built: list[dict] = []
    real_init = classifiers.SmallCNN.__init__

    def spy(self: classifiers.SmallCNN, *a: object, **k: object) -> None:
        built.append(k)
        real_init(self, *a, **k)

    monkeypatch.setattr(classifiers.SmallCNN, "__init__", spy)
    seen: list[torch.nn.Module] = []
    res = baselines.run(cfg, as_tensors(small_real.train), as_tensors(small_real.test), 10, DPTarget(8.0, 1e-5), None,
                        None, frechet=lambda m: seen.append(m) or 1.5)
    assert len(built) == 2 and all(k == arch for k in built)  # (b) and (c)
    assert 0.0 <= res["baseline_dpsgd_cnn_test_acc"] <= 1.0
    assert res["baseline_nonprivate_cnn_frechet_distance"] == 1.5
    assert any(isinstance(m, torch.nn.GroupNorm) for m in seen[0].modules())


# --- each baseline trains on its own data, never on the test split -------------------------------------------------
@pytest.mark.slow
def test_each_baseline_trains_on_its_own_data(small_real: DataSet, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config("tiny")
    public = digits28()
    cnn_calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_train_cnn = classifiers.train_cnn

    def spy_train_cnn(x, y, x_val, y_val, *args, **kwargs):
        cnn_calls.append((torch.cat([x, x_val]), torch.cat([y, y_val])))
        return real_train_cnn(x, y, x_val, y_val, *args, **kwargs)

    monkeypatch.setattr(classifiers, "train_cnn", spy_train_cnn)  # selected_cnn's calls: (a) and (c)
    engines = EngineSpy(monkeypatch)
    synthetic = Split(small_real.test.images[:40], small_real.test.labels[:40])  # stands in for samples
    res = evaluate.run(cfg, synthetic, small_real, public, tmp_path, use_sklearn=False, target=DPTarget(10.0, 1e-5))

    def reordered(t: Tensors, fraction: float) -> Tensors:
        tr, val = classifiers.split_holdout(len(t.y), fraction, 0)
        idx = torch.from_numpy(np.concatenate([tr, val]))
        return Tensors(t.x[idx], t.y[idx])

    pub = reordered(as_tensors(public.train), baselines.PUBLIC_HOLDOUT)
    private = reordered(as_tensors(small_real.train), cfg["evaluate"]["holdout_fraction"])
    assert len(cnn_calls) == 2
    (xa, ya), (xc, yc) = cnn_calls
    assert torch.equal(xa, pub.x) and torch.equal(ya, pub.y)  # (a): public only, no private image
    assert torch.equal(xc, private.x) and torch.equal(yc, private.y)  # (c): private TRAIN, selected on a slice of it
    assert len(engines.calls) == 2  # (b) and (b2)
    for _, kwargs in engines.calls:
        assert torch.equal(kwargs["data_loader"].dataset.tensors[0], as_tensors(small_real.train).x)
    saved = json.loads((tmp_path / "eval.json").read_text())
    for key in BASELINE_KEYS:
        assert 0.0 <= saved[key] <= 1.0 and saved[key] == res[key], key
    assert saved["baseline_dpsgd_cnn_target_epsilon"] == 10.0 and saved["baseline_dpsgd_cnn_delta"] == 1e-5
    assert "baselines_note" not in saved


@pytest.mark.slow
def test_public_baseline_ignores_the_private_data(small_real: DataSet, tmp_path: Path) -> None:
    """Black-box: replacing the private TRAIN split by noise changes neither the public CNN's accuracy nor the
    Frechet distance in its features."""
    cfg = load_config("tiny")
    public = digits28()
    synthetic = Split(small_real.test.images[:40], small_real.test.labels[:40])
    noise = np.random.default_rng(1).integers(0, 256, small_real.train.images.shape, dtype=np.uint8)
    other = DataSet(Split(noise, small_real.train.labels[::-1].copy()), small_real.test, 10, "noise")
    runs = [evaluate.run(cfg, synthetic, real, public, tmp_path / name, use_sklearn=False, target=None)
            for name, real in (("real", small_real), ("noise", other))]
    for key in ("baseline_public_cnn_test_acc", "frechet_distance_public_cnn"):
        assert runs[0][key] == runs[1][key], key
    assert "no target epsilon/delta" in runs[0]["baselines_note"] and "baseline_nonprivate_cnn_test_acc" in runs[1]


# --- result.json, the printed table, the CLI ------------------------------------------------------------------------
@pytest.mark.slow
def test_train_reports_baselines_side_by_side(tiny_runs: Path, tiny_private: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    args = [a for a in train_args(tiny_runs, tiny_private, out) if a != "--no-sample"]
    res = train.main(args + ["--per-class", "2", "--target-epsilon", "8"])
    saved = json.loads((out / "result.json").read_text())
    for key in BASELINE_KEYS:
        assert 0.0 <= saved[key] <= 1.0, key
    assert saved["baseline_dpsgd_cnn_target_epsilon"] == 8.0 and saved["baseline_dpsgd_cnn_delta"] == res["delta"]
    assert 0.95 * 8.0 <= saved["baseline_dpsgd_cnn_epsilon"] <= 8.0 + 1e-6
    assert saved["baseline_dpsgd_cnn_sigma"] > 0
    for key in ("baseline_public_cnn_s", "baseline_dpsgd_cnn_s", "baseline_nonprivate_cnn_s"):
        assert saved[key] > 0, key
    printed = capsys.readouterr().out
    assert "(b2) DP-SGD from public" in printed and "(c) non-private ceiling" in printed
    assert "synthetic data (" in printed and ("does not beat" in printed or "beats the public-only" in printed)

    # standalone evaluate reads the run's target epsilon and delta from its log.jsonl
    evaluate.main(["--config", "tiny", "--synthetic", str(out / "samples.npz"), "--data", str(tiny_private),
                   "--no-sklearn", "--out", str(tmp_path / "again")])
    again = json.loads((tmp_path / "again" / "eval.json").read_text())
    assert again["baseline_dpsgd_cnn_target_epsilon"] == 8.0 and again["baseline_dpsgd_cnn_delta"] == res["delta"]


@pytest.mark.slow
def test_no_baselines_flags(tiny_runs: Path, tiny_private: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [a for a in train_args(tiny_runs, tiny_private, out) if a != "--no-sample"]
    res = train.main(args + ["--per-class", "2", "--no-baselines"])
    assert "cnn_test_acc" in res and not any(k.startswith("baseline") for k in res)
    (out / "eval.json").unlink()
    evaluate.main(["--config", "tiny", "--synthetic", str(out / "samples.npz"), "--data", str(tiny_private),
                   "--no-sklearn", "--no-baselines"])
    saved = json.loads((out / "eval.json").read_text())
    assert "cnn_test_acc" in saved and not any(k.startswith("baseline") for k in saved)


def test_evaluate_needs_epsilon_for_the_baselines(tmp_path: Path) -> None:
    np.savez(tmp_path / "samples.npz", images=np.zeros((10, 28, 28), np.uint8), labels=np.arange(10))
    with pytest.raises(SystemExit, match="pass --target-epsilon and --delta, or --no-baselines"):
        evaluate.main(["--config", "tiny", "--synthetic", str(tmp_path / "samples.npz")])


def test_run_target_from_log_then_result(tmp_path: Path) -> None:
    assert evaluate.run_target(tmp_path) is None
    (tmp_path / "result.json").write_text(json.dumps({"epsilon": 9.99, "delta": 1e-5}))
    assert evaluate.run_target(tmp_path) == DPTarget(9.99, 1e-5, "prv")
    records = [{"stage": "train", "target_epsilon": 3.0, "accountant": "rdp"}, {"stage": "train", "delta": 1e-6},
               {"stage": "evaluate", "target_epsilon": 99.0}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert evaluate.run_target(tmp_path) == DPTarget(3.0, 1e-6, "rdp")


def test_verdict() -> None:
    res = {"cnn_test_acc": 0.5, "baseline_public_cnn_test_acc": 0.3, "baseline_dpsgd_cnn_test_acc": 0.4,
           "baseline_dpsgd_public_init_cnn_test_acc": 0.45, "baseline_nonprivate_cnn_test_acc": 0.99}
    assert "beats the public-only and DP-SGD baselines" in baselines.verdict(res)
    res["baseline_dpsgd_public_init_cnn_test_acc"] = 0.6
    v = baselines.verdict(res)
    assert "does not beat (b2) DP-SGD from public 0.600" in v and "(b) DP-SGD" not in v


# --- the grid: one labelled row per class, upscaled ----------------------------------------------------------------
def test_grid_one_labelled_row_per_class(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 12)
    labels[labels == 7] = 3  # class 7 absent: 9 rows, class 3 has 24 images (its first 10 shown)
    images = rng.integers(0, 256, (len(labels), 28, 28, 1), dtype=np.uint8)
    save_grid(images, labels, tmp_path / "grid.png", per_row=10, scale=4)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    texts = [str(c) for c in range(10) if c != 7]
    width = label_column(texts, 112, 1).shape[1]
    assert grid.shape == (9 * 112, width + 10 * 112)
    for row, c in enumerate(int(c) for c in texts):
        first = images[labels == c][:10]
        cells = grid[row * 112 : (row + 1) * 112, width:]
        expected = np.concatenate([im[..., 0].repeat(4, 0).repeat(4, 1) for im in first], axis=1)
        assert np.array_equal(cells, expected), c  # the class' first 10 images, nearest-upscaled 4x, in order
        assert grid[row * 112 : (row + 1) * 112, :width].max() == 255, c  # a label is drawn in every row
    bands = [grid[r * 112 : (r + 1) * 112, :width] for r in range(9)]
    assert all(not np.array_equal(bands[i], bands[j]) for i in range(9) for j in range(i))  # distinct labels


def test_one_step_budget_for_every_cnn() -> None:
    """With evaluate.cnn_steps, the synthetic CNN, (a) and (c) train for the same number of steps whatever their
    data size (a small synthetic set must not also get a shorter training than the baselines)."""
    hp = load_config("mnist")["evaluate"]
    assert hp["cnn_steps"] == 2000
    for n in (1_800, 3_600, 16_200):
        epochs = classifiers.epochs_for(hp, "public_cnn_epochs", n)
        steps = epochs * math.ceil(n / 128)
        assert 2000 <= steps < 2000 + math.ceil(n / 128), (n, epochs, steps)
    assert classifiers.epochs_for({"cnn_epochs": 8}, "nonprivate_cnn_epochs", 4000) == 8  # no step budget
    assert classifiers.epochs_for({"cnn_epochs": 8, "nonprivate_cnn_epochs": 3}, "nonprivate_cnn_epochs", 10) == 3
