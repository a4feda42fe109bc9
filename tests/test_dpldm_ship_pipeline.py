"""Shipped pipeline bases (issue 20): `python -m dpldm.ship_pipeline` turns a text-conditioned pipeline pre-trained on
public captions into a hashed base with a card; `--pipeline NAME` finds it, checks every file, loads fp32."""

# ruff: noqa: F811  (pytest fixtures imported from tests.dpldm_helpers are redefined as arguments)
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dpldm import pipeline as pipeline_mod
from dpldm import pretrain_pipeline, ship_pipeline, tiny_pipeline
from dpldm.base_models import BASES_ENV, CARD, MANIFEST, files_in, load_base, verify_base
from dpldm.config import load_config
from dpldm.files import sha256_file
from dpldm.models import CheckpointError
from tests.dpldm_helpers import tiny_runs  # noqa: F401 (fixture)

NAME = "tiny-text-base"
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def pretrained(tiny_runs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A text-conditioned pipeline pre-trained (3 steps) by the real stage on the tiny config's public digits."""
    out = tmp_path_factory.mktemp("text") / "text-base"
    pretrain_pipeline.main(["--config", "tiny", "--out", str(out), "--prompt", "a handwritten {label}",
                            "--class-names", ",".join(NAMES), "--steps", "3", "--autoencoder",
                            str(tiny_runs / "tiny" / "public" / "autoencoder")])
    return out


@pytest.fixture(scope="module")
def shipped(pretrained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pipeline shipped by the CLI into a folder of its own (read-only for tests)."""
    return ship_pipeline.main(["--pipeline", str(pretrained), "--name", NAME,
                               "--dest", str(tmp_path_factory.mktemp("bases"))])


@pytest.fixture
def base_copy(shipped: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy a test may damage, found by name through $DPLDM_BASES."""
    folder = tmp_path / "bases" / NAME
    shutil.copytree(shipped, folder)
    monkeypatch.setenv(BASES_ENV, str(folder.parent))
    return folder


def test_the_base_is_a_pipeline_folder_in_fp16_with_its_card_and_manifest(shipped: Path, pretrained: Path) -> None:
    expected = verify_base(shipped, kind="pipeline")
    assert set(expected) == files_in(shipped) and "model_index.json" in expected and "dpldm.json" in expected
    with safe_open(shipped / UNET_WEIGHTS, "pt") as f:
        keys = list(f.keys())
        assert keys and {f.get_tensor(k).dtype for k in keys} == {torch.float16}
    card = (shipped / CARD).read_text()
    for rel in expected.keys() - {CARD}:
        assert f"| `{rel}` |" in card and expected[rel] in card, f"the card does not list {rel} with its sha256"
    recorded = json.loads((pretrained / "dpldm.json").read_text())
    assert recorded["command"] in card  # the rebuild command, as the pre-training recorded it
    assert "a handwritten {label}" in card and ", ".join(NAMES) in card
    assert "--pipeline tiny-text-base" in card
    assert json.loads((shipped / "base.json").read_text())["kind"] == "pipeline"


def test_by_name_it_loads_as_the_fp16_rounded_weights_in_fp32(shipped: Path, pretrained: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BASES_ENV, str(shipped.parent))
    pipe = pipeline_mod.load_pipeline(NAME)
    original = pipeline_mod.load_pipeline(pretrained)
    assert pipe.folder.resolve() == shipped.resolve()
    for part in ("unet", "vae", "text_encoder"):
        got, want = getattr(pipe.pipe, part).state_dict(), getattr(original.pipe, part).state_dict()
        assert got.keys() == want.keys()
        for k, v in want.items():
            assert got[k].dtype == torch.float32, f"{part}.{k} is not loaded as float32"
            torch.testing.assert_close(got[k], v.half().float(), rtol=0, atol=0, msg=f"{part}.{k}")
    ctx = pipeline_mod.encode_captions(pipe, ["a handwritten seven"])
    torch.testing.assert_close(ctx, pipeline_mod.encode_captions(original, ["a handwritten seven"]), rtol=1e-2,
                               atol=1e-2)  # the text encoder's weights rounded to fp16, nothing else


@pytest.mark.parametrize("damage", ["changed byte", "unlisted file", "missing file"])
def test_a_damaged_pipeline_base_is_refused_before_loading(base_copy: Path, damage: str) -> None:
    if damage == "changed byte":
        raw = bytearray((base_copy / UNET_WEIGHTS).read_bytes())
        raw[len(raw) // 2] ^= 0x01
        (base_copy / UNET_WEIGHTS).write_bytes(bytes(raw))
        match = f"{UNET_WEIGHTS} has sha256"
    elif damage == "unlisted file":
        shutil.copy(base_copy / UNET_WEIGHTS, base_copy / "unet" / "diffusion_pytorch_model.bin")
        match = "unet/diffusion_pytorch_model.bin is not listed"
    else:
        (base_copy / "text_encoder" / "model.safetensors").unlink()
        match = "text_encoder/model.safetensors is missing"
    with pytest.raises(pipeline_mod.PipelineError, match=match):
        pipeline_mod.load_pipeline(NAME)
    with pytest.raises(pipeline_mod.PipelineError, match=match):  # by its folder too: a base is always checked
        pipeline_mod.load_pipeline(base_copy)


def test_a_manifest_that_drops_the_pipeline_files_is_refused(base_copy: Path) -> None:
    """Removing model_index.json and its line does not turn the folder into a base that is checked less."""
    (base_copy / "model_index.json").unlink()
    lines = (base_copy / MANIFEST).read_text().splitlines()
    (base_copy / MANIFEST).write_text("\n".join(x for x in lines if not x.endswith("model_index.json")) + "\n")
    with pytest.raises(pipeline_mod.PipelineError, match="does not list autoencoder/config.json"):
        pipeline_mod.load_pipeline(NAME)


def test_a_base_of_the_other_kind_is_refused_by_name(shipped: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BASES_ENV, str(shipped.parent))
    with pytest.raises(CheckpointError, match=f"pass it as --pipeline {NAME}"):
        load_base(NAME, load_config("tiny"))
    with pytest.raises(pipeline_mod.PipelineError, match="pass it as --base mnist-fontdigits"):
        pipeline_mod.load_pipeline("mnist-fontdigits")
    with pytest.raises(pipeline_mod.PipelineError, match="no such folder, and no installed pipeline base"):
        pipeline_mod.load_pipeline("no-such-base")


def test_only_a_public_pretraining_is_shipped(pretrained: Path, tmp_path: Path) -> None:
    bare = tiny_pipeline.build(tmp_path / "bare")  # random weights, no record of how it was made
    with pytest.raises(CheckpointError, match="not written by python -m dpldm.pretrain_pipeline"):
        ship_pipeline.ship(bare, "x", tmp_path / "bases")
    relabelled = tmp_path / "relabelled"
    shutil.copytree(pretrained, relabelled)
    meta = json.loads((relabelled / "dpldm.json").read_text())
    (relabelled / "dpldm.json").write_text(json.dumps({**meta, "stage": "train"}))
    with pytest.raises(CheckpointError, match="stage 'train'"):
        ship_pipeline.ship(relabelled, "x", tmp_path / "bases")
    with pytest.raises(ValueError, match="folder name"):
        ship_pipeline.ship(pretrained, "../x", tmp_path / "bases")
    assert not (tmp_path / "bases" / "x").exists()


def test_shipping_again_needs_force_and_keeps_the_old_base_until_then(shipped: Path, pretrained: Path) -> None:
    before = sha256_file(shipped / MANIFEST)
    with pytest.raises(FileExistsError, match="--force"):
        ship_pipeline.ship(pretrained, NAME, shipped.parent)
    assert sha256_file(shipped / MANIFEST) == before


@pytest.mark.slow
def test_a_shipped_text_base_is_dp_fine_tuned_and_sampled_by_name(shipped: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole path of issue 20's demonstration on the tiny config: pre-trained on public captions (the fixture),
    shipped, then `dpldm.train --pipeline NAME` on private class folders with a class prompt, and `dpldm.sample`."""
    import numpy as np
    from PIL import Image

    from dpldm import sample, train
    from dpldm.data import mnist5k

    monkeypatch.setenv(BASES_ENV, str(shipped.parent))
    ds = mnist5k()
    private = tmp_path / "digits"
    for i in range(40):  # 4 per digit, as class folders named like the captions
        (private / NAMES[ds.train.labels[i]]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(ds.train.images[i, ..., 0]).save(private / NAMES[ds.train.labels[i]] / f"{i}.png")
    with pytest.warns(UserWarning, match="NO privacy"):
        result = train.main(["--config", "tiny", "--pipeline", NAME, "--data", str(private), "--prompt",
                             "a handwritten {label}", "--out", str(tmp_path / "run"), "--batch-size", "8",
                             "--max-physical-batch-size", "8", "--epochs", "1", "--per-class", "1",
                             "--deterministic-noise", "--no-baselines"])
    assert result["epsilon"] <= 10 + 1e-6 and "cnn_test_acc" in result
    with np.load(tmp_path / "run" / "samples.npz") as f:
        assert f["images"].shape[1:] == (28, 28, 1)  # the tiny preset's layout: 28 px padded to 32
    card = (tmp_path / "run" / "README.md").read_text()
    assert str(shipped.resolve()) in card and pipeline_mod.folder_sha256(shipped) in card
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten seven\na handwritten one\n")
    sample.main(["--config", "tiny", "--pipeline", NAME, "--unet", str(tmp_path / "run" / "unet"), "--prompts",
                 str(prompts), "--out", str(tmp_path / "samples"), "--per-class", "2", "--ddim-steps", "2"])
    with np.load(tmp_path / "samples" / "samples.npz") as f:
        assert f["images"].shape == (4, 28, 28, 1) and sorted(set(f["labels"].tolist())) == [0, 1]
