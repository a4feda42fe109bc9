"""dpldm.compartments end to end on the tiny config: train, sample by access rights, attribute, forget with lineage,
add, per-shard accounting, and bad input that must change nothing."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dpldm.compartments import attribute, evaluate, forget, registry, sample, store
from dpldm.compartments import train as ctrain
from dpldm.compartments.accounting import composed_epsilon
from dpldm.compartments.shards import run_data
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


@pytest.fixture(scope="module")
def new_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 MNIST digits none of the runs here holds (mnist5k's test split; tiny_private is drawn from its training
    split): data a run may add."""
    from dpldm.data import mnist5k

    ds = mnist5k()
    path = tmp_path_factory.mktemp("new") / "new_digits.npz"
    np.savez(path, images=ds.test.images[:24, ..., 0], labels=ds.test.labels[:24])
    return path


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of a run folder and its content: what a refused request must leave exactly as it was."""
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def assert_forgotten(run: Path, shard: str) -> None:
    """Nothing in the run derives from `shard`: every file has a lineage, none names the shard, and none of the
    shard's folders (compartment, work folder with its checkpoint, logs) or their temporary siblings is left."""
    _, lineage = registry.load(run)
    assert registry.unaccounted_files(run, lineage) == []
    for p in run.rglob("*"):
        rel = p.relative_to(run).as_posix()
        folder = registry.owner(lineage, rel)
        assert folder is None or shard not in lineage["artifacts"][folder]["trained_on"], rel
        assert not rel.startswith((f"work/{shard}", f"compartments/{shard}", f"compartments/.{shard}.",
                                   f"logs/compartment-{shard}")), rel
    assert not any(shard in a["trained_on"] for a in lineage["artifacts"].values())


def test_train_writes_small_compartments_with_their_accounting(class_run: Path) -> None:
    reg, lineage = registry.load(class_run)
    assert {k: (v["classes"], v["trained"]) for k, v in reg["shards"].items()} == {
        "0": ([0, 1, 2, 3, 4], True), "1": ([5, 6, 7, 8, 9], True)}
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_add_trains_a_new_shard_and_leaves_the_others(class_run: Path, tmp_path: Path, new_digits: Path) -> None:
    run = copy_run(class_run, tmp_path)
    before = {n: (run / "compartments" / n / store.WEIGHTS).read_bytes() for n in ("0", "1")}
    with pytest.warns(UserWarning, match="NO privacy"):
        report = ctrain.main_add(["--run", str(run), "--name", "extra", "--data", str(new_digits), "--epochs", "1",
                                  "--target-epsilon", str(EPS), "--lora-rank", "2", "--deterministic-noise"])
    assert set(report["epsilon_per_shard"]) == {"0", "1", "extra"}
    assert {n: (run / "compartments" / n / store.WEIGHTS).read_bytes() for n in ("0", "1")} == before
    reg, lineage = registry.load(run)
    extra = reg["shards"]["extra"]
    assert (extra["classes"], extra["data"], extra["trained"]) == (None, str(new_digits.resolve()), True)
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

# ~45 s to build: every test that uses it is marked slow, so that the fast loop (-m "not slow") never builds it
@pytest.fixture(scope="module")
def router_run(tiny_runs: Path, tiny_private: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("cdm") / "random3"
    with pytest.warns(UserWarning, match="NO privacy"):
        ctrain.main(train_argv(tiny_runs, tiny_private, out, "--shard-by", "random", "--num-shards", "3",
                               "--router", "--router-epsilon", "2"))
    return out


@pytest.mark.slow
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


@pytest.mark.slow
def test_router_rule_samples_and_is_refused_for_partial_rights(router_run: Path, tmp_path: Path) -> None:
    run = copy_run(router_run, tmp_path)
    res = sample.main(["--run", str(run), "--rule", "router", "--per-class", "1", "--ddim-steps", "3"])
    assert res["trained_on"] == ["0", "1", "2"]
    with np.load(run / "samples" / "router-0_1_2" / "samples.npz") as z:
        w = z["weights"].astype(np.float64)
    assert np.allclose(w.sum(-1), 1, atol=1e-3) and w.min() >= 0
    with pytest.raises(SystemExit, match="router was trained on shards 2 too"):
        sample.main(["--run", str(run), "--rule", "router", "--shards", "0,1", "--per-class", "1", "--ddim-steps", "2"])


@pytest.mark.slow
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


@pytest.mark.slow
def test_public_compartment_is_outside_the_accounting(class_run: Path, tmp_path: Path, new_digits: Path) -> None:
    run = copy_run(class_run, tmp_path)
    report = ctrain.main_add(["--run", str(run), "--name", "pub", "--data", str(new_digits), "--epochs", "1",
                              "--lora-rank", "2", "--no-dp"])
    assert report["public_shards"] == ["pub"] and set(report["epsilon_per_shard"]) == {"0", "1"}
    assert store.read_meta(run / "compartments" / "pub")["public"] is True
    sample.main(["--run", str(run), "--shards", "0,pub", "--classes", "1", "--per-class", "1", "--ddim-steps", "2"])


def test_no_dp_never_trains_the_configs_private_data(tiny_runs: Path, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(SystemExit, match="needs --data naming PUBLIC data"):
        ctrain.main(["--config", "tiny", "--runs", str(tiny_runs), "--out", str(tmp_path / "r"), "--no-dp"])
    assert not (tmp_path / "r").exists()


# --- issue 17, items 9-14: a hostile privacy review -------------------------------------------------------------------

def shard_labels(run: Path, shard: str) -> np.ndarray:
    """The labels of a shard's training examples, rebuilt from the run's key as the stages do."""
    reg, _ = registry.load(run)
    private, shards, _ = run_data(reg, registry.config_of(reg))
    (found,) = [s for s in shards if s.name == shard]
    return np.sort(private.train.labels[found.index])


@pytest.mark.slow
def test_evaluate_uses_only_the_samples_shards_and_the_users_rights(class_run: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 9: the baselines (the non-private CNN included) train on the data of the shards the samples derive from,
    never on another shard's, before or after a forget; a user evaluates only samples of shards they may access."""
    from dpldm import baselines

    run = copy_run(class_run, tmp_path)
    sample.main(["--run", str(run), "--shards", "0", "--per-class", "2", "--ddim-steps", "2", "--name", "s0"])
    sample.main(["--run", str(run), "--shards", "0,1", "--per-class", "1", "--ddim-steps", "2", "--name", "s01"])
    trained_on = []
    real_baselines = baselines.run

    def spy(cfg: dict, train: baselines.Tensors, *a: object, **k: object) -> dict:
        trained_on.append(np.sort(train.y.numpy()))
        return real_baselines(cfg, train, *a, **k)

    monkeypatch.setattr(baselines, "run", spy)
    res = evaluate.main(["--run", str(run), "--samples", "s0"])
    zero = shard_labels(run, "0")
    assert len(trained_on) == 1 and np.array_equal(trained_on[0], zero)  # shard 0's examples, all of them, only
    assert res["n_test"] > 0 and "baseline_nonprivate_cnn_test_acc" in json.loads((run / "samples" / "s0" / "eval.json")
                                                                              .read_text())
    rights = tmp_path / "rights.json"
    rights.write_text(json.dumps({"alice": ["0"]}))
    before = snapshot(run)
    with pytest.raises(SystemExit, match="shards 1, which user 'alice' may not access"):
        evaluate.main(["--run", str(run), "--samples", "s01", "--rights", str(rights), "--user", "alice"])
    assert snapshot(run) == before
    forget.main(["--run", str(run), "--shard", "1"])
    assert (run / "samples" / "s0" / "eval.json").is_file()  # derived from shard 0 alone: kept
    assert_forgotten(run, "1")
    # after the forget, on alice's behalf: shard 1 is never read again (what the baselines would train on is the
    # real training data handed to dpldm.evaluate; they are skipped here, measured above)
    real_evaluate = evaluate.evaluate_stage.run

    def spy_real(cfg: dict, synthetic: object, real: object, *a: object, **k: object) -> dict:
        trained_on.append(np.sort(real.train.labels))
        return real_evaluate(cfg, synthetic, real, *a, **k)

    monkeypatch.setattr(evaluate.evaluate_stage, "run", spy_real)
    evaluate.main(["--run", str(run), "--samples", "s0", "--rights", str(rights), "--user", "alice",
                   "--no-baselines"])
    assert len(trained_on) == 2 and np.array_equal(trained_on[1], zero)


@pytest.mark.slow
def test_a_reused_sample_name_never_hides_files_from_forget(class_run: Path, tmp_path: Path) -> None:
    """Item 10: a second request under the same --name is refused; --overwrite deletes the earlier folder first,
    so its attribution and log lines (shard 1's) do not survive under the new request's lineage."""
    run = copy_run(class_run, tmp_path)
    argv = ["--run", str(run), "--per-class", "1", "--ddim-steps", "2", "--name", "x"]
    sample.main([*argv, "--shards", "0,1"])
    attribute.main(["--run", str(run), "--samples", "x"])
    before = snapshot(run)
    with pytest.raises(SystemExit, match="samples 'x' exist"):
        sample.main([*argv, "--shards", "0"])
    assert snapshot(run) == before
    sample.main([*argv, "--shards", "0", "--overwrite"])
    folder = run / "samples" / "x"
    assert not (folder / "attribution.json").exists()
    assert all("shards 0, 1" not in line and "shards 0,1" not in line
               for line in (folder / "log.jsonl").read_text().splitlines())
    forget.main(["--run", str(run), "--shard", "1"])
    assert (folder / "samples.npz").is_file()  # the new request used shard 0 only: kept
    assert_forgotten(run, "1")
    with np.load(folder / "samples.npz") as z:
        assert [str(n) for n in z["shards"]] == ["0"]


def forget_in_another_process(run: Path, shard: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpldm.compartments", "forget", "--run", str(run), "--shard", shard],
                          check=False, capture_output=True, text=True, timeout=300)


def test_forget_is_refused_while_a_sample_is_working_on_the_run(class_run: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Review finding 4: a forget (another process) between a sample's reading of the registry and its writing of
    samples trained on the shard left those samples behind under a lineage that survived the forget. Every stage
    now holds the run's lock: the forget is refused and changes nothing; once the sample is done it removes it."""
    run = copy_run(class_run, tmp_path)
    real, seen = sample.base_vae, {}

    def load_then_forget(*a: object, **k: object) -> object:
        seen["forget"] = forget_in_another_process(run, "1")
        return real(*a, **k)

    monkeypatch.setattr(sample, "base_vae", load_then_forget)
    sample.main(["--run", str(run), "--shards", "0,1", "--per-class", "1", "--ddim-steps", "2", "--name", "s"])
    assert seen["forget"].returncode != 0 and "another stage is working on this run" in seen["forget"].stderr, seen
    reg, _ = registry.load(run)
    assert "1" in reg["shards"] and (run / "samples" / "s" / "samples.npz").is_file()
    done = forget_in_another_process(run, "1")
    assert done.returncode == 0, done.stderr
    assert not (run / "samples" / "s").exists()
    assert_forgotten(run, "1")


def test_a_killed_stage_releases_the_run_lock(tmp_path: Path) -> None:
    """The lock is the kernel's: a stage killed while it holds it never blocks the run."""
    hold = ("import sys, time; from dpldm.compartments import registry\n"
            "with registry.locked(sys.argv[1], create=True):\n print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = f"another stage is working on this run \\(process {holder.pid}"
        with pytest.raises(registry.RunError, match=busy), registry.locked(tmp_path):
            pass
    finally:
        holder.kill()
        holder.wait()
    with registry.locked(tmp_path):
        assert (tmp_path / registry.LOCK).read_text() == str(os.getpid())


class Killed(BaseException):
    """Stands for SIGKILL: no `except Exception` in the code under test catches it."""


# ~30 s to build: its tests are marked slow, like router_run's
@pytest.fixture(scope="module")
def killed_run(tiny_runs: Path, tiny_private: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """A class run killed while shard 1 trained, right after its second checkpoint, with the temporary folder of a
    checkpoint write killed half-way beside it (what SIGKILL during a write leaves)."""
    from dpldm import train as train_stage

    out = tmp_path_factory.mktemp("cdm") / "killed"
    real, real_run = train_stage.save_train_state, train_stage.run
    saved = []

    def every_step(cfg: dict, opts: train_stage.TrainOptions, **k: object) -> object:
        # a checkpoint after every step: the kill lands between two of them
        return real_run(cfg, dataclasses.replace(opts, checkpoint_every=1), **k)

    def save_then_die(folder: Path, *a: object, **k: object) -> None:
        real(folder, *a, **k)
        if Path(folder).parent.name == "1":
            saved.append(folder)
            if len(saved) == 2:
                shutil.copytree(folder, Path(folder).parent / ".checkpoint.tmp-killed")
                raise Killed

    argv = train_argv(tiny_runs, tiny_private, out, "--shard-by", "class", "--num-shards", "2")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_stage, "save_train_state", save_then_die)
        mp.setattr(train_stage, "run", every_step)
        with pytest.raises(Killed), pytest.warns(UserWarning, match="NO privacy"):
            ctrain.main(argv)
    assert (out / "work" / "1" / "checkpoint" / "state.pt").is_file()
    return out


@pytest.mark.slow
def test_a_killed_train_resumes_shard_by_shard(killed_run: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 11: `train --resume` keeps the trained shard, continues the killed one from its checkpoint (its
    accountant history continued, not restarted), and leaves no private file; until then only trained shards
    are served, and a plain `train` or a resume with other settings is refused."""
    from dpldm import train as train_stage

    run = copy_run(killed_run, tmp_path)
    reg, _ = registry.load(run)
    assert [n for n, info in reg["shards"].items() if info.get("trained", True)] == ["0"]  # 1 is not served
    res = sample.main(["--run", str(run), "--per-class", "1", "--ddim-steps", "2"])
    assert res["shards"] == ["0"]
    with pytest.raises(SystemExit, match="not trained yet"):
        sample.main(["--run", str(run), "--shards", "1", "--per-class", "1", "--ddim-steps", "2"])
    with pytest.raises(SystemExit, match="unfinished compartments run.*--resume"):
        ctrain.main(["--config", "tiny", "--out", str(run)])
    with pytest.raises(SystemExit, match="drop --epochs"):
        ctrain.main(["--resume", "--out", str(run), "--epochs", "3"])
    calls = []
    real = train_stage.run

    def spy(cfg: dict, targs: object, **k: object) -> object:
        calls.append((targs.out.name, targs.resume))
        return real(cfg, targs, **k)

    monkeypatch.setattr(train_stage, "run", spy)
    weights0 = (run / "compartments" / "0" / store.WEIGHTS).read_bytes()
    with pytest.warns(UserWarning, match="NO privacy"):
        report = ctrain.main(["--resume", "--out", str(run)])
    assert calls == [("1", True)]  # shard 0 kept, shard 1 continued from its checkpoint
    assert (run / "compartments" / "0" / store.WEIGHTS).read_bytes() == weights0
    reg, lineage = registry.load(run)
    assert registry.complete(reg, run) and set(report["epsilon_per_shard"]) == {"0", "1"}
    meta = store.read_meta(run / "compartments" / "1")
    assert sum(n for _, _, n in meta["accountant_history"]) == meta["steps"]  # one run of steps, not 2 + all
    assert EPS * 0.97 < meta["epsilon"] <= EPS * 1.001
    assert not (run / "work").exists() and registry.unaccounted_files(run, lineage) == []
    with pytest.raises(SystemExit, match="nothing to resume"):
        ctrain.main(["--resume", "--out", str(run)])


@pytest.mark.slow
def test_forget_of_a_killed_shard_deletes_its_private_checkpoint(killed_run: Path, tmp_path: Path) -> None:
    """Item 11: forgetting the shard that was training deletes its work folder (checkpoint with the noise seeds,
    .prev, a killed write's temporary folder) and a killed compartment write's temporary sibling; the run is
    then complete with the shards left."""
    run = copy_run(killed_run, tmp_path)
    ckpt = run / "work" / "1"
    assert {p.name for p in ckpt.iterdir()} >= {"checkpoint", "checkpoint.prev", ".checkpoint.tmp-killed"}
    # a compartment write killed between filling its temporary folder and the rename
    partial = run / "compartments" / ".1.tmp-killed"
    partial.mkdir(parents=True)
    (partial / store.WEIGHTS).write_bytes(b"shard 1's weights")
    res = forget.main(["--run", str(run), "--shard", "1"])
    assert "work/1" in res["removed"] and not partial.exists() and not (run / "work").exists()
    assert_forgotten(run, "1")
    assert not [p for p in run.rglob("*") if p.name in ("state.pt", "PRIVATE.txt")]
    reg, _ = registry.load(run)
    assert registry.complete(reg, run) and reg["forgotten"] == ["1"]
    with pytest.raises(SystemExit, match="nothing to resume"):
        ctrain.main(["--resume", "--out", str(run)])
    sample.main(["--run", str(run), "--per-class", "1", "--ddim-steps", "2"])


def perturb_safetensors(path: Path) -> None:
    """Rewrite a weight file as a valid one whose first tensor changed a little: loads fine, gives another model."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    first = min(tensors)
    tensors[first] = tensors[first] + 1e-3
    save_file(tensors, path)


@pytest.mark.parametrize("part, match", [("ldm", "base LDM .* changed since the run was created"),
                                         ("autoencoder", "base autoencoder .* changed since the run was created")])
def test_sample_refuses_a_changed_base(class_run: Path, tmp_path: Path, part: str, match: str) -> None:
    """Item 12: the base the compartments are differences to is hashed again by `sample`: a changed one (still a
    valid model) is refused, and nothing is written."""
    run = copy_run(class_run, tmp_path)
    reg, lineage = registry.load(run)
    base = tmp_path / "base"
    for key in ("ldm", "autoencoder"):  # the run's base, moved to where the test may change it
        shutil.copytree(reg["base"][key], base / key)
        reg["base"][key] = str(base / key)
    registry.save(run, reg, lineage)
    weights = next(p for p in sorted((base / part).rglob("*.safetensors")))
    perturb_safetensors(weights)
    before = snapshot(run)
    with pytest.raises(SystemExit, match=match):
        sample.main(["--run", str(run), "--shards", "0", "--per-class", "1", "--ddim-steps", "2"])
    assert snapshot(run) == before


@pytest.mark.parametrize("flags", [[], ["--no-dp"]])
def test_add_refuses_examples_already_in_the_run(class_run: Path, tmp_path: Path, tiny_private: Path,  # noqa: F811
                                                 new_digits: Path, flags: list[str]) -> None:
    """Item 13: data holding an example of one of the run's shards (the same image) is refused before anything is
    trained, whether it is the run's own data again or one of shard 1's images hidden among new ones (a --no-dp
    shard too: it would train a private example without noise)."""
    run = copy_run(class_run, tmp_path)
    reg, _ = registry.load(run)
    private, shards, _ = run_data(reg, registry.config_of(reg))
    one = shards[1].index[3]
    with np.load(new_digits) as z:
        images, labels = z["images"], z["labels"]
    mixed = tmp_path / "mixed.npz"
    np.savez(mixed, images=np.concatenate([images, private.train.images[[one], ..., 0]]),
             labels=np.concatenate([labels, [(private.train.labels[one] + 1) % 10]]))  # relabelled: still the image
    before = snapshot(run)
    add = ["--run", str(run), "--epochs", "1", "--target-epsilon", str(EPS), "--lora-rank", "2", *flags]
    with pytest.raises(SystemExit, match=r"examples already in this run \(same image\): \d+ of shard 0, \d+ of shard 1"):
        ctrain.main_add([*add, "--name", "again", "--data", str(tiny_private)])
    with pytest.raises(SystemExit, match=r"examples already in this run \(same image\): 1 of shard 1\. "):
        ctrain.main_add([*add, "--name", "mixed", "--data", str(mixed)])
    assert snapshot(run) == before


def test_an_empty_class_shard_is_refused_before_anything_is_trained(tiny_runs: Path, tiny_private: Path,  # noqa: F811
                                                                    tmp_path: Path) -> None:
    """Item 14: data without classes 5-9 split by class into 2 shards: shard 1 would be empty. Refused at once,
    with no run folder written (before, shard 0 was trained first and the run left half-built)."""
    with np.load(tiny_private) as z:
        keep = z["labels"] < 5
        data = tmp_path / "low.npz"
        np.savez(data, images=z["images"][keep], labels=z["labels"][keep])
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"shard\(s\) 1 \(classes \[5, 6, 7, 8, 9\]\) hold no training example"):
        ctrain.main(train_argv(tiny_runs, data, out, "--shard-by", "class", "--num-shards", "2"))
    assert not out.exists()


@pytest.mark.slow
def test_every_shard_trains_at_the_whole_datas_rate_unless_too_small(tiny_runs: Path, tiny_private: Path,  # noqa: F811
                                                                    tmp_path: Path) -> None:
    """Item 14: with N = 51 and B = 16, one model on all the data is sampled at q = 1/4. A shard of 24 examples is
    trained at exactly that rate (scaling B by its share and rounding gave it 1/3); a shard of one example cannot
    be (q = 1): it is reported before training and recorded, and its noise is calibrated for its rate, so it
    spends the target epsilon, not more. (The manifest leaves the other rows out: N is still the data's 51.)"""
    from dpldm.common import load_private
    from dpldm.config import load_config

    rows = [int(r) for r in load_private(str(tiny_private), load_config("tiny")).train.rows]
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"one": rows[:1], "a": rows[1:25]}))
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="NO privacy"):  # RDP: calibrates in milliseconds, PRV in seconds
        report = ctrain.main(train_argv(tiny_runs, tiny_private, out, "--shard-by", "manifest", "--manifest",
                                        str(manifest), "--accountant", "rdp"))
    whole = 1 / np.ceil(len(rows) / 16)
    for name, rate in (("a", whole), ("one", 1.0)):  # what was trained and accounted
        meta = store.read_meta(out / "compartments" / name)
        assert {q for _, q, _ in meta["accountant_history"]} == {rate}, name
        assert EPS * 0.97 < meta["epsilon"] <= EPS * 1.001, name
    reg, _ = registry.load(out)
    assert reg["n_train"] == len(rows) and {n: i["sample_rate"] for n, i in reg["shards"].items()} == {
        "one": 1.0, "a": whole}
    assert report["sample_rate_per_shard"] == {"one": 1.0, "a": whole}
    notes = [json.loads(line)["msg"] for line in (out / "logs" / "train" / "log.jsonl").read_text().splitlines()]
    assert [m for m in notes if m.startswith("shard one: 1 examples, sampling rate 1 instead of the whole data's")]
    assert not [m for m in notes if m.startswith("shard a:")]


def test_batch_for_gives_the_whole_datas_rate_whenever_a_batch_size_can() -> None:
    """Item 14: for every shard size of a few data sets, the rate 1/ceil(size/b) of the batch chosen is the whole
    data's, 1/ceil(N/B), whenever any batch size gives it, and otherwise the nearest one."""
    import math

    for n, full in ((51, 16), (48, 16), (5000, 500), (4000, 1024), (300, 300)):
        m = math.ceil(n / full)
        for size in range(1, n + 1):
            rates = {1 / math.ceil(size / b) for b in range(1, size + 1)}
            best = min(rates, key=lambda q: abs(q - 1 / m))
            b = ctrain.batch_for(size, full, n)
            assert 1 <= b <= size and 1 / math.ceil(size / b) == best, (n, full, size, b)


@pytest.mark.parametrize("target, damage, command, match", [
    ("compartments.json", b"{not json", "sample", r"compartments\.json: unreadable or corrupt"),
    ("compartments.json", b"[]", "forget", r"compartments\.json: corrupt \(expected a JSON object"),
    ("lineage.json", None, "forget", r"lineage\.json: missing .*deleting the whole run folder"),
    ("lineage.json", b"\x00\xff", "sample", r"lineage\.json: unreadable or corrupt"),
    ("compartments/0/compartment.json", b"{", "sample", r"compartment\.json: unreadable or corrupt"),
])
def test_corrupt_run_files_are_refused_with_the_file_and_the_fix(class_run: Path, tmp_path: Path, target: str,
                                                                 damage: bytes | None, command: str, match: str) -> None:
    """Item 14: a corrupt or missing metadata file stops the stage with one line naming the file and what to do,
    not a traceback, and nothing is written."""
    run = copy_run(class_run, tmp_path)
    if damage is None:
        (run / target).unlink()
    else:
        (run / target).write_bytes(damage)
    before = snapshot(run)
    argv = {"sample": (sample.main, ["--run", str(run), "--shards", "0", "--per-class", "1", "--ddim-steps", "2"]),
            "forget": (forget.main, ["--run", str(run), "--shard", "1"])}[command]
    with pytest.raises(SystemExit, match=match):
        argv[0](argv[1])
    assert snapshot(run) == before


@pytest.mark.parametrize("damage, match", [
    ("router.safetensors", r"router\.safetensors: missing or changed since it was written"),
    ("router.json", r"router\.json: missing or corrupt"),
    ("perturbed", r"router\.safetensors: missing or changed since it was written"),
])
@pytest.mark.slow
def test_a_corrupt_or_changed_router_is_refused(router_run: Path, tmp_path: Path, damage: str, match: str) -> None:
    """Item 14: the router's weights are hash-checked like a compartment's: garbage, a corrupt router.json, or a
    valid file with other weights are refused with the fix."""
    run = copy_run(router_run, tmp_path)
    if damage == "perturbed":
        perturb_safetensors(run / "router" / "router.safetensors")
    else:
        (run / "router" / damage).write_bytes(b"\x00garbage")
    before = snapshot(run)
    with pytest.raises(SystemExit, match=match + ".*--rule density"):
        sample.main(["--run", str(run), "--rule", "router", "--per-class", "1", "--ddim-steps", "2"])
    assert snapshot(run) == before
