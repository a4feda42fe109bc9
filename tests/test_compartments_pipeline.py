"""Compartments of a diffusers pipeline (issue 20): `dpldm.compartments train --pipeline DIR --data FOLDER --prompt
TEMPLATE` on the tiny text-conditioned pipeline, then sample, evaluate, add and forget; each shard trained from the
pipeline itself, never from another shard's weights; a changed pipeline refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dpldm import tiny_pipeline
from dpldm.compartments import evaluate, forget, registry, sample, store
from dpldm.compartments import train as ctrain
from dpldm.compartments.pipeline_base import CLASS_NAMES

CLASSES = ("one", "seven", "zero")  # sorted: labels 0, 1, 2; --num-shards 2 -> shard 0 {one, seven}, shard 1 {zero}
PROMPT = "a handwritten {label}"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_pipeline.build(tmp_path_factory.mktemp("pipe") / "tiny")


def class_folders(root: Path, per_class: int = 10, classes: tuple[str, ...] = CLASSES, shade: int = 0,
                  seed: int = 0) -> Path:
    """RGB images in class sub-folders; `shade` changes every image of class "one" (the data of shard 0 only)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            level = 40 + 80 * CLASSES.index(c) + (shade if c == "one" else 0)
            img = np.full((32, 32, 3), level, np.uint8) + rng.integers(0, 40, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / c / f"{i}.png")
    return root


def train_argv(pipe: Path, data: Path, out: Path, *extra: str) -> list[str]:
    # attention weights, not adapters: training changes them in the UNet it is given, so a shard that started from
    # another's UNet would show it (fresh LoRA adapters would hide it). The GDP accountant: PRV's calibration at
    # these tiny shards' sampling rates takes 95% of a run (36 of 38 s); PRV is tested in test_compartments_stages
    return ["--config", "tiny", "--pipeline", str(pipe), "--data", str(data), "--prompt", PROMPT, "--out", str(out),
            "--shard-by", "class", "--num-shards", "2", "--epochs", "1", "--target-epsilon", "8", "--batch-size", "8",
            "--max-physical-batch-size", "8", "--trainable", "attention", "--accountant", "gdp",
            "--deterministic-noise", *extra]


def weights_sha(run: Path) -> dict[str, str]:
    return {p.name: store.read_meta(p)["sha256"] for p in sorted((run / "compartments").iterdir())}


@pytest.fixture(scope="module")
def pipeline_run(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cdm-pipe")
    out = root / "run"
    with pytest.warns(UserWarning, match="NO privacy"):
        ctrain.main(train_argv(tiny_folder, class_folders(root / "data"), out, "--router", "--router-epsilon", "8"))
    return out


@pytest.mark.slow
def test_a_pipeline_run_records_its_base_and_trains_each_shard_from_the_pipeline(
        pipeline_run: Path, tiny_folder: Path, tmp_path: Path) -> None:
    from dpldm.pipeline import folder_sha256

    reg, lineage = registry.load(pipeline_run)
    base = reg["base"]
    assert base["id"] == folder_sha256(tiny_folder) and base["prompts"] == [PROMPT.format(label=c) for c in CLASSES]
    assert registry.config_of(reg)["data"][CLASS_NAMES] == list(CLASSES)
    assert [reg["shards"][s]["classes"] for s in ("0", "1")] == [[0, 1], [2]]
    report = ctrain.report_of(pipeline_run)
    assert 0 < report["epsilon"] <= 8 + 1e-6 and set(report["epsilon_per_shard"]) == {"0", "1"}
    assert registry.unaccounted_files(pipeline_run, lineage) == []
    for name in ("0", "1"):
        tensors = store.load_file(pipeline_run / "compartments" / name / store.WEIGHTS)
        assert tensors and all(k.startswith("unet.") and ".attentions." in k for k in tensors)  # DP-LDM's set
    # the same run on data whose shard 0 differs: shard 1 must come out bit for bit the same, so it did not start
    # from shard 0's trained weights (training changes the pipeline's UNet in place) nor see its data
    other = tmp_path / "run"
    with pytest.warns(UserWarning, match="NO privacy"):
        ctrain.main(train_argv(tiny_folder, class_folders(tmp_path / "data", shade=60), other))
    first, second = weights_sha(pipeline_run), weights_sha(other)
    assert first["1"] == second["1"] and first["0"] != second["0"]


@pytest.mark.slow
def test_sampling_evaluating_adding_and_forgetting_on_a_pipeline(pipeline_run: Path, tiny_folder: Path,
                                                                  tmp_path: Path) -> None:
    import torch

    from dpldm.pipeline import TextConditionalUNet, encode_captions, load_pipeline
    from dpldm.trainable import add_lora

    run = tmp_path / "run"
    shutil.copytree(pipeline_run, run)
    reg, _ = registry.load(run)
    res = sample.main(["--run", str(run), "--per-class", "2", "--ddim-steps", "3"])
    with np.load(run / "samples" / "density-0_1" / "samples.npz") as z:
        assert z["images"].shape == (6, 32, 32, 3) and sorted(z["labels"].tolist()) == [0, 0, 1, 1, 2, 2]
    assert res["trained_on"] == ["0", "1"]
    res = sample.main(["--run", str(run), "--per-class", "1", "--ddim-steps", "2", "--rule", "router"])
    assert res["trained_on"] == ["0", "1"] and res["rule"] == "router"
    result = evaluate.main(["--run", str(run), "--samples", "density-0_1", "--no-baselines"])
    assert 0 <= result["cnn_test_acc"] <= 1
    # add: a folder with some of the run's classes only (each takes its label from the run's order), as LoRA
    # adapters beside the run's attention compartments
    new = class_folders(tmp_path / "new", per_class=6, classes=("zero",), seed=1)  # not the run's images
    assert ctrain.new_shard_data(str(new), registry.config_of(reg)).train.labels.tolist() == [2] * 6
    with pytest.warns(UserWarning, match="NO privacy"):
        ctrain.main_add(["--run", str(run), "--name", "extra", "--data", str(new), "--trainable", "lora",
                         "--lora-rank", "2", "--deterministic-noise"])
    public = class_folders(tmp_path / "public", per_class=4, classes=("one", "zero"), seed=2)
    ctrain.main_add(["--run", str(run), "--name", "public", "--data", str(public), "--no-dp"])
    reg, _ = registry.load(run)
    assert registry.trained(reg) == ["0", "1", "extra", "public"]
    extra = store.read_meta(run / "compartments" / "extra")  # unset options are the run's: epsilon 8, not the config's
    assert extra["mode"] == "lora" and 7.9 < extra["epsilon"] <= 8 + 1e-6
    assert store.read_meta(run / "compartments" / "public")["public"] is True
    # what sampling loads is the pipeline's UNet with the stored adapters, on the class prompts' contexts
    model = store.load_compartment(run / "compartments" / "extra", reg["base"], registry.config_of(reg))
    pipe = load_pipeline(tiny_folder)
    add_lora(TextConditionalUNet(pipe.unet, model.class_embedder), 2)
    stored = store.load_file(run / "compartments" / "extra" / store.WEIGHTS)
    assert stored and all(".lora_" in k for k in stored)
    for name, value in stored.items():
        pipe.unet.get_parameter(name.removeprefix("unet.")).data.copy_(value)
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500])
    context = encode_captions(pipe, [PROMPT.format(label="zero")] * 2)
    with torch.no_grad():
        want = pipe.unet.eval()(z, t, encoder_hidden_states=context).sample
        torch.testing.assert_close(model(z, t, torch.tensor([2, 2])), want, rtol=1e-5, atol=1e-6)
        assert (want - load_pipeline(tiny_folder).unet(z, t, encoder_hidden_states=context).sample).abs().max() > 1e-5
    forget.main(["--run", str(run), "--shard", "0"])
    assert not (run / "compartments" / "0").exists() and not (run / "samples" / "density-0_1").exists()
    assert json.loads((run / "router" / "router.json").read_text())["shards"] == ["1", "extra", "public"]
    res = sample.main(["--run", str(run), "--per-class", "1", "--ddim-steps", "2"])
    assert res["shards"] == ["1", "extra", "public"]
    # a changed pipeline is never used silently
    changed = tmp_path / "pipe"
    shutil.copytree(tiny_folder, changed)
    reg["base"]["pipeline"] = str(changed)
    (run / registry.REGISTRY).write_text(json.dumps(reg))
    config = changed / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace("0.012", "0.0125"))
    with pytest.raises(SystemExit, match="changed since the run was created"):
        sample.main(["--run", str(run), "--per-class", "1", "--ddim-steps", "2", "--name", "again"])


@pytest.mark.parametrize("change,match", [
    ({"--prompt": None}, "needs --prompt TEMPLATE"),
    ({"--prompt": "no label"}, "needs {label}"),
    ({"--base": "mnist-fontdigits"}, "drop --base"),
    ({"--pipeline": None}, "--prompt goes with --pipeline"),
    ({"--data": "DATA.npz"}, "FOLDER of class sub-folders"),
])
def test_bad_pipeline_compartments_are_refused_before_anything_is_written(
        tmp_path: Path, change: dict[str, str | None], match: str) -> None:
    argv = train_argv(tmp_path / "pipe", class_folders(tmp_path / "data", per_class=2), tmp_path / "run")
    for flag, value in change.items():
        i = argv.index(flag) if flag in argv else len(argv)
        argv[i:i + 2] = [] if value is None else [flag, value.replace("DATA.npz", str(tmp_path / "d.npz"))]
    with pytest.raises(SystemExit, match=match):
        ctrain.main(argv)
    assert not (tmp_path / "run").exists()


def test_a_pipeline_preset_without_a_pipeline_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="pass --pipeline DIR"):
        ctrain.main(["--config", "sd", "--data", str(class_folders(tmp_path / "data", per_class=2)),
                     "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
