"""dpldm.compartments end to end on the tiny config: train, sample by access rights, attribute, forget with lineage,
add, per-shard accounting, and bad input that must change nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dpldm.compartments import attribute, forget, registry, sample, store
from dpldm.compartments import train as ctrain
from dpldm.compartments.accounting import composed_epsilon
from dpldm.trainable import lora_param_count
from tests.dpldm_helpers import tiny_private, tiny_runs  # noqa: F401  (fixtures)

EPS = 8.0


def train_argv(runs: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", "tiny", "--runs", str(runs), "--data", str(data), "--out", str(out), "--epochs", "1",
            "--target-epsilon", str(EPS), "--batch-size", "16", "--max-physical-batch-size", "16", "--lora-rank", "2",
            "--deterministic-noise", *extra]


@pytest.fixture(scope="module")
def class_run(tiny_runs: Path, tiny_private: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("cdm") / "class2"
    with pytest.warns(UserWarning, match="NO privacy"):
        ctrain.main(train_argv(tiny_runs, tiny_private, out, "--shard-by", "class", "--num-shards", "2"))
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(run, dest)
    return dest


def test_train_writes_small_compartments_with_their_accounting(class_run: Path) -> None:
    reg, lineage = registry.load(class_run)
    assert reg["shards"] == {"0": {"classes": [0, 1, 2, 3, 4]}, "1": {"classes": [5, 6, 7, 8, 9]}}
    assert not (class_run / "work").exists()  # the merged full-size copies are gone
    for name in ("0", "1"):
        meta = store.read_meta(class_run / "compartments" / name)
        assert meta["mode"] == "lora" and meta["base_id"] == reg["base"]["id"]
        # each compartment reaches the target on its own shard (the noise multiplier is chosen for it)
        assert EPS * 0.97 < meta["epsilon"] <= EPS * 1.001
        assert composed_epsilon([meta["accountant_history"]], reg["delta"], "prv") == pytest.approx(meta["epsilon"])
        assert lineage["artifacts"][f"compartments/{name}"]["trained_on"] == [name]
        # only the adapters are stored: rank 2 LoRA in fp32 (+ the safetensors header)
        from dpldm.config import load_config
        from dpldm.models import build_unet

        size = (class_run / "compartments" / name / store.WEIGHTS).stat().st_size
        assert size < 4 * lora_param_count(build_unet(load_config("tiny")), 2) + 16_000
    report = ctrain.report_of(class_run)
    assert report["epsilon"] == max(report["epsilon_per_shard"].values())  # parallel composition
    assert registry.unaccounted_files(class_run, lineage) == []


def test_sampling_reads_only_the_shards_in_the_rights(class_run: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    run = copy_run(class_run, tmp_path)
    (run / "compartments" / "1" / store.WEIGHTS).unlink()  # unreadable: any attempt to load it fails
    loaded = []
    real = sample.load_compartment

    def spy(folder: Path, *a: object, **k: object) -> object:
        loaded.append(Path(folder).name)
        return real(folder, *a, **k)

    monkeypatch.setattr(sample, "load_compartment", spy)
    rights = tmp_path / "rights.json"
    rights.write_text(json.dumps({"alice": ["0"], "bob": ["0", "1"]}))
    res = sample.main(["--run", str(run), "--rights", str(rights), "--user", "alice", "--per-class", "2",
                       "--ddim-steps", "3"])
    assert loaded == ["0"]
    assert res["classes"] == [0, 1, 2, 3, 4] and res["not_sampled"] == [5, 6, 7, 8, 9]
    assert res["trained_on"] == ["0"]
    with np.load(run / "samples" / "density-0" / "samples.npz") as z:
        assert z["images"].shape[0] == 10 and z["weights"].shape == (3, 10, 1)
    with pytest.raises(SystemExit, match="changed since it was written|missing"):
        sample.main(["--run", str(run), "--rights", str(rights), "--user", "bob", "--per-class", "1",
                     "--ddim-steps", "2"])


def test_forget_removes_everything_trained_on_the_shard(class_run: Path, tmp_path: Path) -> None:
    run = copy_run(class_run, tmp_path)
    for shards in ("0", "0,1"):
        sample.main(["--run", str(run), "--shards", shards, "--per-class", "1", "--ddim-steps", "2"])
    attribute.main(["--run", str(run), "--samples", "density-0_1"])
    assert (run / "samples" / "density-0_1" / "attribution.json").is_file()
    res = forget.main(["--run", str(run), "--shard", "1"])
    assert sorted(res["removed"]) == ["compartments/1", "logs/compartment-1", "logs/train", "samples/density-0_1"]
    reg, lineage = registry.load(run)
    assert list(reg["shards"]) == ["0"] and reg["forgotten"] == ["1"]
    assert (run / "samples" / "density-0" / "samples.npz").is_file()  # never used shard 1: kept
    # every file left has a lineage, and none of them was trained on shard 1
    assert registry.unaccounted_files(run, lineage) == []
    for rel in (p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()):
        folder = registry.owner(lineage, rel)
        assert folder is None or "1" not in lineage["artifacts"][folder]["trained_on"], rel
    with pytest.raises(SystemExit, match="unknown shard.*forgotten: 1"):
        sample.main(["--run", str(run), "--shards", "1", "--per-class", "1", "--ddim-steps", "2"])
    # the remaining compartment still samples
    sample.main(["--run", str(run), "--shards", "0", "--per-class", "1", "--ddim-steps", "2", "--name", "after"])


def test_add_trains_a_new_shard_and_leaves_the_others(class_run: Path, tmp_path: Path,
                                                      tiny_private: Path) -> None:  # noqa: F811
    run = copy_run(class_run, tmp_path)
    before = {n: (run / "compartments" / n / store.WEIGHTS).read_bytes() for n in ("0", "1")}
    with pytest.warns(UserWarning, match="NO privacy"):
        report = ctrain.main_add(["--run", str(run), "--name", "extra", "--data", str(tiny_private), "--epochs", "1",
                                  "--target-epsilon", str(EPS), "--lora-rank", "2", "--deterministic-noise"])
    assert set(report["epsilon_per_shard"]) == {"0", "1", "extra"}
    assert {n: (run / "compartments" / n / store.WEIGHTS).read_bytes() for n in ("0", "1")} == before
    reg, lineage = registry.load(run)
    assert reg["shards"]["extra"] == {"classes": None, "data": str(tiny_private.resolve())}
    assert lineage["artifacts"]["compartments/extra"]["trained_on"] == ["extra"]
    # a class the class shards do not hold for this sample: the unkeyed shard covers every class
    res = sample.main(["--run", str(run), "--shards", "0,extra", "--classes", "7", "--per-class", "1",
                       "--ddim-steps", "2"])
    assert res["trained_on"] == ["extra"] and res["classes"] == [7]


def test_compartment_of_another_base_is_refused_and_nothing_changes(class_run: Path, tmp_path: Path) -> None:
    run = copy_run(class_run, tmp_path)
    meta_path = run / "compartments" / "0" / store.META
    meta = json.loads(meta_path.read_text())
    meta["base_id"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    before = (run / registry.LINEAGE).read_text()
    with pytest.raises(SystemExit, match="trained on another base model"):
        sample.main(["--run", str(run), "--shards", "0", "--per-class", "1", "--ddim-steps", "2"])
    assert (run / registry.LINEAGE).read_text() == before and not (run / "samples").exists()


@pytest.mark.parametrize("argv, match", [
    (["--shards", "0,7"], "unknown shard"),
    (["--user", "alice"], "--rights"),
    (["--classes", "12"], "outside"),
])
def test_bad_sampling_requests_change_nothing(class_run: Path, tmp_path: Path, argv: list[str], match: str) -> None:
    run = copy_run(class_run, tmp_path)
    before = (run / registry.LINEAGE).read_text()
    with pytest.raises(SystemExit, match=match):
        sample.main(["--run", str(run), "--per-class", "1", "--ddim-steps", "2", *argv])
    assert (run / registry.LINEAGE).read_text() == before and not (run / "samples").exists()


def test_overlapping_manifest_is_refused(tiny_runs: Path, tiny_private: Path, tmp_path: Path) -> None:  # noqa: F811
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"a": [0, 1, 2], "b": [2, 3]}))
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="example 2 is in shards 'a' and 'b'"):
        ctrain.main(train_argv(tiny_runs, tiny_private, out, "--shard-by", "manifest", "--manifest", str(manifest)))
    assert not out.exists()


def test_a_second_train_into_a_run_is_refused(class_run: Path, tiny_runs: Path, tiny_private: Path) -> None:  # noqa: F811
    with pytest.raises(SystemExit, match="already holds a compartments run"):
        ctrain.main(train_argv(tiny_runs, tiny_private, class_run, "--shard-by", "class", "--num-shards", "2"))


def test_forget_unknown_shard_changes_nothing(class_run: Path, tmp_path: Path) -> None:
    run = copy_run(class_run, tmp_path)
    before = sorted(p.as_posix() for p in run.rglob("*"))
    with pytest.raises(SystemExit, match="unknown shard"):
        forget.main(["--run", str(run), "--shard", "9"])
    assert sorted(p.as_posix() for p in run.rglob("*")) == before


# --- the router ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def router_run(tiny_runs: Path, tiny_private: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("cdm") / "random3"
    with pytest.warns(UserWarning, match="NO privacy"):
        ctrain.main(train_argv(tiny_runs, tiny_private, out, "--shard-by", "random", "--num-shards", "3",
                               "--router", "--router-epsilon", "2"))
    return out


def test_router_spends_on_every_shard_and_is_composed(router_run: Path) -> None:
    reg, lineage = registry.load(router_run)
    assert lineage["artifacts"]["router"]["trained_on"] == ["0", "1", "2"]
    (run,) = reg["router_runs"]
    router_eps = composed_epsilon([run["accountant_history"]], reg["delta"], "prv")
    assert 2.0 * 0.97 < router_eps <= 2.0 * 1.001
    report = ctrain.report_of(router_run)
    for name, eps in report["epsilon_per_shard"].items():
        own = store.read_meta(router_run / "compartments" / name)["epsilon"]
        assert own < eps < own + router_eps  # composition costs something, and less than the plain sum
        assert eps == pytest.approx(composed_epsilon(
            [store.read_meta(router_run / "compartments" / name)["accountant_history"], run["accountant_history"]],
            reg["delta"], "prv"))


def test_router_rule_samples_and_is_refused_for_partial_rights(router_run: Path, tmp_path: Path) -> None:
    run = copy_run(router_run, tmp_path)
    res = sample.main(["--run", str(run), "--rule", "router", "--per-class", "1", "--ddim-steps", "3"])
    assert res["trained_on"] == ["0", "1", "2"]
    with np.load(run / "samples" / "router-0_1_2" / "samples.npz") as z:
        w = z["weights"].astype(np.float64)
    assert np.allclose(w.sum(-1), 1, atol=1e-3) and w.min() >= 0
    with pytest.raises(SystemExit, match="router was trained on shards 2 too"):
        sample.main(["--run", str(run), "--rule", "router", "--shards", "0,1", "--per-class", "1", "--ddim-steps", "2"])


def test_forget_trains_the_router_again_without_the_shard(router_run: Path, tmp_path: Path) -> None:
    run = copy_run(router_run, tmp_path)
    before = ctrain.report_of(run)["epsilon_per_shard"]
    res = forget.main(["--run", str(run), "--shard", "1"])
    assert "router" in res["removed"] and res["rebuild_s"] > 0
    reg, lineage = registry.load(run)
    assert json.loads((run / "router" / "router.json").read_text())["shards"] == ["0", "2"]
    assert lineage["artifacts"]["router"]["trained_on"] == ["0", "2"]
    assert [r["shards"] for r in reg["router_runs"]] == [["0", "1", "2"], ["0", "2"]]
    after = ctrain.report_of(run)["epsilon_per_shard"]
    assert set(after) == {"0", "2"} and all(after[s] > before[s] for s in after)  # the second router spends again
    assert registry.unaccounted_files(run, lineage) == []
    sample.main(["--run", str(run), "--rule", "router", "--per-class", "1", "--ddim-steps", "2"])


def test_public_compartment_is_outside_the_accounting(class_run: Path, tmp_path: Path,
                                                      tiny_private: Path) -> None:  # noqa: F811
    run = copy_run(class_run, tmp_path)
    report = ctrain.main_add(["--run", str(run), "--name", "pub", "--data", str(tiny_private), "--epochs", "1",
                              "--lora-rank", "2", "--no-dp"])
    assert report["public_shards"] == ["pub"] and set(report["epsilon_per_shard"]) == {"0", "1"}
    assert store.read_meta(run / "compartments" / "pub")["public"] is True
    sample.main(["--run", str(run), "--shards", "0,pub", "--classes", "1", "--per-class", "1", "--ddim-steps", "2"])


def test_no_dp_never_trains_the_configs_private_data(tiny_runs: Path, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(SystemExit, match="needs --data naming PUBLIC data"):
        ctrain.main(["--config", "tiny", "--runs", str(tiny_runs), "--out", str(tmp_path / "r"), "--no-dp"])
    assert not (tmp_path / "r").exists()
