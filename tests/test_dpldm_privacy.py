"""Privacy plumbing of dpldm.train: what reaches the engine, what the accountant reports, resume, refusals."""

# ruff: noqa: F811  (pytest fixtures imported from tests.dpldm_helpers are redefined as arguments)
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

import dpkernels
from dpldm import train
from tests.dpldm_helpers import tiny_private, tiny_runs, train_args  # noqa: F401 (fixtures)


def test_default_delta() -> None:
    assert train.default_delta(4000) == 1e-5
    assert train.default_delta(60000) == 1e-5
    assert train.default_delta(2_000_000) == 1e-7
    assert train.default_delta(999) == 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("accountant, cls", [("prv", PRVAccountant), ("rdp", RDPAccountant)])
def test_engine_gets_calibrated_sigma_and_epsilon_matches_opacus(
        tiny_runs: Path, tiny_private: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, accountant: str,
        cls: type) -> None:
    seen: dict = {}
    original = dpkernels.PrivacyEngine.make_private

    def spy(self, **kwargs):
        seen.update(kwargs)
        seen["engine"] = self
        return original(self, **kwargs)

    monkeypatch.setattr(dpkernels.PrivacyEngine, "make_private", spy)
    res = train.main(train_args(tiny_runs, tiny_private, tmp_path / "run", "--epochs", "2", "--target-epsilon", "5",
                                "--max-grad-norm", "0.5", "--accountant", accountant))
    q = 1 / 4  # 51 private training examples, expected batch 16
    sigma = get_noise_multiplier(target_epsilon=5, target_delta=1e-5, sample_rate=q, epochs=2,
                                 accountant=accountant)
    assert seen["noise_multiplier"] == pytest.approx(sigma, rel=1e-12)
    assert seen["max_grad_norm"] == 0.5 and seen["poisson_sampling"] is True
    assert seen["engine"].sample_rate == pytest.approx(q)
    ref = cls()
    ref.history = [(sigma, q, 8)]
    assert res["steps"] == 8 and res["sigma"] == pytest.approx(sigma, rel=1e-12)
    assert res["epsilon"] == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-9)
    assert res["epsilon"] <= 5 * 1.01
    printed = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any(r.get("trainable_params") == res["trainable_params"] for r in printed)


@pytest.mark.slow
def test_resume_continues_accounting(tiny_runs: Path, tiny_private: Path, tmp_path: Path) -> None:
    full = train.main(train_args(tiny_runs, tiny_private, tmp_path / "a", "--epochs", "2"))
    out = tmp_path / "b"
    part = train.main(train_args(tiny_runs, tiny_private, out, "--epochs", "2", "--max-steps", "3",
                                 "--checkpoint-every", "2"))
    assert part["steps"] == 3 and part["epsilon"] < full["epsilon"]
    assert json.loads((out / "checkpoint" / "meta.json").read_text())["step"] == 3
    with pytest.raises(SystemExit, match="unfinished run"):  # no silent restart from zero
        train.main(train_args(tiny_runs, tiny_private, out, "--epochs", "2"))
    with pytest.raises(SystemExit, match="other settings"):
        train.main(train_args(tiny_runs, tiny_private, out, "--epochs", "3", "--resume"))
    resumed = train.main(train_args(tiny_runs, tiny_private, out, "--epochs", "2", "--resume"))
    assert resumed["steps"] == full["steps"] == 8
    assert resumed["epsilon"] == pytest.approx(full["epsilon"], rel=1e-12)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["resumed_step"] for r in log if "resumed_step" in r] == [3]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 9))  # steps 4..8 after the resume


def test_resume_refuses_private_data_changed_under_the_same_path(tiny_runs: Path, tiny_private: Path,
                                                                  tmp_path: Path) -> None:
    """A user who edits the data file between the stop and --resume (one pixel) is refused, and the data's hash,
    which would let anyone holding a candidate data set confirm it, is in no file the run keeps once it is done."""
    data, out = tmp_path / "private.npz", tmp_path / "run"
    with np.load(tiny_private) as f:
        images, labels = f["images"].copy(), f["labels"].copy()
    np.savez(data, images=images, labels=labels)
    train.main(train_args(tiny_runs, data, out, "--max-steps", "1", "--checkpoint-every", "1"))
    digest = json.loads((out / "checkpoint" / "meta.json").read_text())["args"]["data_sha256"]
    assert len(digest) == 64 and digest not in (out / "log.jsonl").read_text()
    images[3, 5, 5] ^= 1
    np.savez(data, images=images, labels=labels)
    with pytest.raises(SystemExit, match="private training images or labels changed"):
        train.main(train_args(tiny_runs, data, out, "--resume"))
    assert digest not in (tmp_path / "run" / "log.jsonl").read_text()
    images[3, 5, 5] ^= 1  # the same images again: the resume goes on to the end
    np.savez(data, images=images, labels=labels)
    res = train.main(train_args(tiny_runs, data, out, "--resume"))
    assert res["steps"] == res["total_steps"]
    for path in out.rglob("*"):
        if path.is_file():
            assert digest.encode() not in path.read_bytes(), f"{path} holds the private data's hash"


def test_noise_multiplicity_rows_share_example_ids(tiny_runs: Path, tiny_private: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    original = dpkernels.DPOptimizer.set_example_ids

    def spy(self, ids):
        calls.append(ids.clone())
        return original(self, ids)

    monkeypatch.setattr(dpkernels.DPOptimizer, "set_example_ids", spy)
    res = train.main(train_args(tiny_runs, tiny_private, tmp_path / "run", "--noise-multiplicity", "3",
                                "--max-steps", "2"))
    assert res["steps"] == 2 and calls
    for ids in calls:  # each example id on exactly k consecutive rows
        assert np.array_equal(np.bincount(ids.numpy()), np.full(int(ids.max()) + 1, 3))


@pytest.mark.slow
def test_lora_training_runs_and_merges(tiny_runs: Path, tiny_private: Path, tmp_path: Path) -> None:
    from dpldm.config import load_config
    from dpldm.models import load_ldm

    out = tmp_path / "run"
    res = train.main([a for a in train_args(tiny_runs, tiny_private, out, "--trainable", "lora", "--lora-rank", "2")
                      if a != "--no-sample"] + ["--no-eval", "--per-class", "1"])
    assert res["steps"] == 4
    model, meta = load_ldm(out / "ldm", load_config("tiny"))  # plain diffusers UNet, adapters merged
    assert not any("lora" in k for k in model.state_dict()) and meta["epsilon"] == res["epsilon"]
    pre, _ = load_ldm(tiny_runs / "tiny" / "public" / "ldm", load_config("tiny"))
    diff = {k for k, v in model.state_dict().items() if not np.allclose(v.numpy(), pre.state_dict()[k].numpy())}
    assert diff and all(k.split(".")[-2] in ("to_q", "to_k", "to_v", "0") for k in diff)


@pytest.mark.parametrize("extra, message", [
    (["--target-epsilon", "1e-5", "--epochs", "1000", "--accountant", "rdp"], "unreachable"),
    (["--target-epsilon", "0"], "must be positive"),
    (["--batch-size", "1000"], "larger than the private training set"),
    (["--ablation", "9"], "--ablation must be in"),
    (["--resume"], "no unfinished checkpoint"),
    (["--backend", "nope"], "unknown backend"),
    (["--max-grad-norm", "0"], "max_grad_norm must be positive"),
])
def test_refusals(tiny_runs: Path, tiny_private: Path, tmp_path: Path, extra: list, message: str) -> None:
    with pytest.raises(SystemExit, match=message):  # later flags override train_args' (argparse: last wins)
        train.main(train_args(tiny_runs, tiny_private, tmp_path / "run") + extra)


@pytest.mark.parametrize("kind", ["empty", "malformed", "missing"])
def test_bad_private_data_refused(tiny_runs: Path, tmp_path: Path, kind: str) -> None:
    p = tmp_path / "private.npz"
    if kind == "empty":
        np.savez(p, images=np.zeros((0, 28, 28), np.uint8), labels=np.zeros(0, np.int64))
    elif kind == "malformed":
        np.savez(p, pictures=np.zeros((4, 28, 28), np.uint8))
    with pytest.raises(SystemExit, match=str(p).replace(".", r"\.")):
        train.main(train_args(tiny_runs, p, tmp_path / "run"))


def few_label_npz(tiny_private: Path, tmp_path: Path, labels: int) -> Path:
    """The tiny private set keeping only labels < `labels`."""
    with np.load(tiny_private) as z:
        keep = z["labels"] < labels
        images, y = z["images"][keep], z["labels"][keep]
    path = tmp_path / f"private{labels}.npz"
    np.savez(path, images=images, labels=y)
    return path


@pytest.mark.slow
def test_label_set_from_config_not_private_labels(tiny_runs: Path, tiny_private: Path, tmp_path: Path) -> None:
    """Private labels reaching only 2 do not shrink the model's label set (it used to be max label + 1)."""
    from dpldm.config import load_config
    from dpldm.models import load_ldm

    data = few_label_npz(tiny_private, tmp_path, 3)
    out = tmp_path / "run"
    train.main(train_args(tiny_runs, data, out, "--batch-size", "4"))
    model, _ = load_ldm(out / "ldm", load_config("tiny"))  # the config's 10 classes, the pre-trained embedder's
    assert model.class_embedder.num_classes == 10
    assert "new class embedder" not in (out / "log.jsonl").read_text()
    # another label set is configuration: data.private_num_classes, and labels outside it are refused
    cfg3 = load_config("tiny", ["data.num_classes=3"])
    train.main(train_args(tiny_runs, data, out, "--batch-size", "4", "--set", "data.private_num_classes=3"))
    assert load_ldm(out / "ldm", cfg3)[0].class_embedder.num_classes == 3
    with pytest.raises(SystemExit, match=r"labels must be in \[0, 2\)"):
        train.main(train_args(tiny_runs, data, out, "--batch-size", "4", "--set", "data.private_num_classes=2"))
