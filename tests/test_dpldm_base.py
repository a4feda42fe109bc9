"""Shipped base models: what the pre-training stages record, `python -m dpldm.ship`, SHA256SUMS verification,
loading (fp16 stored, fp32 loaded), and `dpldm.train` starting from a base named by the config."""

# ruff: noqa: F811  (pytest fixtures imported from tests.dpldm_helpers are redefined as arguments)
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dpldm import data as data_mod
from dpldm import ship, train
from dpldm.base_models import BASES_ENV, CARD, MANIFEST, files_in, load_base, shipped_bases, verify_base
from dpldm.config import load_config
from dpldm.files import sha256_file
from dpldm.models import CheckpointError, load_autoencoder, load_ldm
from dpldm.provenance import autoencoder_hashes
from dpldm.runlog import RunLog
from tests.dpldm_helpers import tiny_private, tiny_runs, train_args  # noqa: F401 (fixtures)

NAME = "tiny-base"
REBUILD = ("python -m dpldm.pretrain_autoencoder --config tiny --steps 2 && "
           "python -m dpldm.pretrain --config tiny --steps 2")
UNET_WEIGHTS = "ldm/unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="session")
def tiny_base(tiny_runs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pre-trained pair shipped as a base by the CLI, in a folder of its own (read-only for tests)."""
    pub = tiny_runs / "tiny" / "public"
    dest = tmp_path_factory.mktemp("bases")
    return ship.main(["--autoencoder", str(pub / "autoencoder"), "--ldm", str(pub / "ldm"), "--name", NAME,
                      "--dest", str(dest), "--command", REBUILD])


@pytest.fixture
def base_copy(tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the tiny base that a test may damage, found by name through $DPLDM_BASES."""
    folder = tmp_path / "bases" / NAME
    shutil.copytree(tiny_base, folder)
    monkeypatch.setenv(BASES_ENV, str(folder.parent))
    return folder


@pytest.fixture
def installed(tiny_base: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(BASES_ENV, str(tiny_base.parent))
    return tiny_base


def flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


# --- what the pre-training stages record ---------------------------------------------------------------------

def test_pretrain_stages_record_run(tiny_runs: Path) -> None:
    pub = tiny_runs / "tiny" / "public"
    for folder, meta_file, module in ((pub / "autoencoder", "dpldm.json", "dpldm.pretrain_autoencoder"),
                                      (pub / "ldm", "ldm.json", "dpldm.pretrain")):
        meta = json.loads((folder / meta_file).read_text())
        assert meta["steps"] == 2 and meta["batch_size"] == 16 and meta["seed"] == 0
        assert meta["public_images"] == 1500 and meta["wall_s"] > 0 and meta["finished"]
        assert meta["command"] == f"python -m {module} --config tiny --runs {tiny_runs} --steps 2"
        assert meta["config"]["name"] == "tiny" and meta["config"]["unet"] == load_config("tiny")["unet"]
        m = meta["machine"]
        assert m["torch"] == torch.__version__ and m["cores"] >= 1 and m["cpu"] and m["device"] == "cpu"
    ldm_meta = json.loads((pub / "ldm" / "ldm.json").read_text())
    assert ldm_meta["autoencoder_sha256"] == autoencoder_hashes(pub / "autoencoder")
    assert set(ldm_meta["autoencoder_sha256"]) == {"config.json", "diffusion_pytorch_model.safetensors"}


# --- shipping ------------------------------------------------------------------------------------------------

def test_ship_layout_fp16_and_manifest(tiny_base: Path) -> None:
    files = files_in(tiny_base)
    assert files == {CARD, "base.json", "autoencoder/config.json", "autoencoder/diffusion_pytorch_model.safetensors",
                     "autoencoder/dpldm.json", "ldm/ldm.json", "ldm/unet/config.json", UNET_WEIGHTS,
                     "ldm/class_embedder/config.json", "ldm/class_embedder/model.safetensors"}
    for rel in (f for f in files if f.endswith(".safetensors")):
        assert {t.dtype for t in load_file(tiny_base / rel).values()} == {torch.float16}, rel
    lines = (tiny_base / MANIFEST).read_text().splitlines()
    assert lines == [f"{sha256_file(tiny_base / rel)}  {rel}" for rel in sorted(files)]  # sha256sum -c format
    assert sum((tiny_base / f).stat().st_size for f in files) < 2e6


def test_card_lists_every_file_its_sha256_and_the_rebuild_command(tiny_base: Path) -> None:
    card = (tiny_base / CARD).read_text()
    rows = {line.split("`")[1]: line for line in card.splitlines() if line.startswith("| `")}
    assert set(rows) == files_in(tiny_base) - {CARD}
    for rel, row in rows.items():
        assert f"`{sha256_file(tiny_base / rel)}`" in row and f"{(tiny_base / rel).stat().st_size:,}" in row, rel
    assert f"```bash\n{REBUILD}\n```" in card
    for stage in ("autoencoder", "LDM"):  # steps, batch size, seed of each stage, as recorded
        assert f"| {stage} | 2 | 16 | 0 | 0h 00m" in card
    meta = json.loads((tiny_base / "ldm" / "ldm.json").read_text())
    assert meta["machine"]["cpu"] in card and f"torch {torch.__version__}" in card
    assert "`digits`, 1500 training images: sklearn's 1,797 8x8 digits" in card


def test_ship_refuses_a_fine_tuned_or_mismatched_pair(tiny_runs: Path, tmp_path: Path) -> None:
    pub = tiny_runs / "tiny" / "public"
    dp = tmp_path / "dp-ldm"
    shutil.copytree(pub / "ldm", dp)
    meta = json.loads((dp / "ldm.json").read_text())
    (dp / "ldm.json").write_text(json.dumps({**meta, "stage": "train"}))
    with pytest.raises(CheckpointError, match="a DP fine-tuned model is not a public base"):
        ship.ship(pub / "autoencoder", dp, "x", tmp_path / "bases")
    other_ae = tmp_path / "other-ae"
    shutil.copytree(pub / "autoencoder", other_ae)
    config = json.loads((other_ae / "config.json").read_text())
    (other_ae / "config.json").write_text(json.dumps({**config, "scaling_factor": 1.0}))
    with pytest.raises(CheckpointError, match="trained on the latents of another autoencoder"):
        ship.ship(other_ae, pub / "ldm", "x", tmp_path / "bases")
    assert not (tmp_path / "bases" / "x").exists()
    (tmp_path / "bases" / "taken").mkdir(parents=True)
    with pytest.raises(SystemExit, match="exists: pass --force to replace it"):
        ship.main(["--autoencoder", str(pub / "autoencoder"), "--ldm", str(pub / "ldm"), "--name", "taken",
                   "--dest", str(tmp_path / "bases")])


# --- loading and verification --------------------------------------------------------------------------------

def test_load_base_gives_the_fp16_rounded_fp32_weights(installed: Path, tiny_runs: Path) -> None:
    cfg = load_config("tiny")
    vae, model, record = load_base(NAME, cfg)
    pub = tiny_runs / "tiny" / "public"
    originals = (load_autoencoder(pub / "autoencoder", cfg), load_ldm(pub / "ldm", cfg)[0])
    for loaded, original in zip((vae, model), originals, strict=True):
        got, want = loaded.state_dict(), original.state_dict()
        assert got.keys() == want.keys()
        for k in got:
            assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k].half().float()), k
    assert vae.config.scaling_factor == originals[0].config.scaling_factor
    assert record["name"] == NAME and record["dtype"] == "float16" and record["rebuild_command"] == REBUILD


@pytest.mark.parametrize("rel", [UNET_WEIGHTS, "autoencoder/config.json", CARD])
def test_a_changed_byte_is_refused(base_copy: Path, rel: str) -> None:
    before = sha256_file(base_copy / rel)
    flip_byte(base_copy / rel)
    after = sha256_file(base_copy / rel)
    with pytest.raises(CheckpointError, match=f"{rel} has sha256 {after}, but SHA256SUMS says {before}"):
        load_base(NAME, load_config("tiny"))


def test_a_missing_file_is_refused(base_copy: Path) -> None:
    rel = "ldm/class_embedder/model.safetensors"
    digest = sha256_file(base_copy / rel)
    (base_copy / rel).unlink()
    with pytest.raises(CheckpointError, match=f"{rel} is missing \\(SHA256SUMS expects sha256 {digest}\\)"):
        load_base(NAME, load_config("tiny"))


def test_an_unlisted_file_is_refused(base_copy: Path) -> None:
    extra = base_copy / "ldm" / "unet" / "diffusion_pytorch_model.bin"
    extra.write_bytes(b"weights diffusers would also read")
    with pytest.raises(CheckpointError, match="ldm/unet/diffusion_pytorch_model.bin is not listed in SHA256SUMS"):
        load_base(NAME, load_config("tiny"))


def test_a_bad_manifest_is_refused(base_copy: Path) -> None:
    manifest = base_copy / MANIFEST
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join([*lines, f"{'0' * 64}  ../outside.safetensors"]) + "\n")
    with pytest.raises(CheckpointError, match="malformed entry"):
        verify_base(base_copy)
    manifest.write_text("\n".join(line for line in lines if not line.endswith(UNET_WEIGHTS)) + "\n")
    with pytest.raises(CheckpointError, match=f"does not list {UNET_WEIGHTS}"):
        verify_base(base_copy)
    manifest.unlink()
    with pytest.raises(CheckpointError, match="no SHA256SUMS"):
        verify_base(base_copy)


def test_a_base_of_another_architecture_or_image_layout_is_refused(installed: Path, tiny_private: Path,
                                                                   tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"does not match the config \(block_out_channels"):
        load_base(NAME, load_config("tiny", ["unet.block_out_channels=[16, 48]"]))
    with pytest.raises(CheckpointError, match=r"laid out otherwise than config tiny says \(image_size: base 28 != "
                                              r"config 32\)"):
        load_base(NAME, load_config("tiny", ["data.image_size=32"]))
    with pytest.raises(SystemExit, match=r"\(image_size: base 28 != config 32\)"):
        train.main(train_args(tmp_path / "runs", tiny_private, tmp_path / "run", "--set", f"base={NAME}",
                              "--set", "data.image_size=32"))


@pytest.mark.parametrize("name", shipped_bases() or [pytest.param(None, marks=pytest.mark.skip("no base shipped yet"))])
def test_shipped_bases_verify(name: str) -> None:
    """Every base in the package passes its own SHA256SUMS and stays within the size budget."""
    from dpldm.base_models import BASES_DIR

    folder = BASES_DIR / name
    verify_base(folder)
    assert sum((folder / f).stat().st_size for f in files_in(folder)) <= ship.SIZE_BUDGET_MB * 1e6


# --- dpldm.train with a base ---------------------------------------------------------------------------------

def no_pretraining(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pre-trained although a base was named")

    monkeypatch.setattr(train.ae_stage, "run", refuse)
    monkeypatch.setattr(train.pretrain_stage, "run", refuse)


def test_train_starts_from_the_base_without_pretraining(installed: Path, tiny_private: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    no_pretraining(monkeypatch)
    runs, out = tmp_path / "runs", tmp_path / "run"
    res = train.main(train_args(runs, tiny_private, out, "--set", f"base={NAME}"))
    assert res["steps"] == res["total_steps"] == 4
    assert not (runs / "tiny" / "public").exists()
    meta = json.loads((out / "ldm" / "ldm.json").read_text())
    assert meta["autoencoder"] == str(installed / "autoencoder") and meta["pretrained"] == str(installed / "ldm")
    assert f"base model {NAME} ({installed}, files verified" in (out / "log.jsonl").read_text()


def test_train_refuses_a_base_that_is_not_installed(tiny_private: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    no_pretraining(monkeypatch)
    monkeypatch.setenv(BASES_ENV, str(tmp_path / "empty"))
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit, match=r"config tiny: base 'not-built' is not installed .*python -m dpldm.ship "
                                         r".*--name not-built\. Or pass --no-base"):
        train.main(train_args(runs, tiny_private, tmp_path / "a", "--set", "base=not-built"))
    with pytest.raises(SystemExit, match=r"--base: base '\./nowhere': no such folder\. Or pass --no-base"):
        train.main(train_args(runs, tiny_private, tmp_path / "b", "--base", "./nowhere"))
    assert not (runs / "tiny" / "public").exists()


def test_train_refuses_a_damaged_base(base_copy: Path, tiny_private: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    no_pretraining(monkeypatch)
    flip_byte(base_copy / UNET_WEIGHTS)
    with pytest.raises(SystemExit, match=f"{UNET_WEIGHTS} has sha256 [0-9a-f]{{64}}, but SHA256SUMS says"):
        train.main(train_args(tmp_path / "runs", tiny_private, tmp_path / "run", "--set", f"base={NAME}"))


def chosen_folders(tmp_path: Path, runs: Path, *argv: str) -> tuple[Path, Path]:
    """The (autoencoder, LDM) folders dpldm.train would fine-tune from, for these arguments."""
    args = train.parser().parse_args(["--config", "tiny", "--runs", str(runs), *argv])
    return train.ensure_pretrained(args, load_config("tiny", args.set), RunLog(tmp_path / "log", "train"))


def test_no_base_and_explicit_folders_override_the_base(installed: Path, tiny_runs: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    no_pretraining(monkeypatch)  # tiny_runs already holds the public cache
    pub = tiny_runs / "tiny" / "public"
    base_pair = (installed / "autoencoder", installed / "ldm")
    assert chosen_folders(tmp_path, tiny_runs, "--set", f"base={NAME}") == base_pair
    assert chosen_folders(tmp_path, tiny_runs, "--base", str(installed)) == base_pair  # a folder, not a name
    cache_pair = (pub / "autoencoder", pub / "ldm")
    assert chosen_folders(tmp_path, tiny_runs, "--set", "base=not-built", "--no-base") == cache_pair
    assert chosen_folders(tmp_path, tiny_runs, "--set", f"base={NAME}", "--pretrained", str(pub / "ldm")) == (
        installed / "autoencoder", pub / "ldm")  # the other part still comes from the base
    assert chosen_folders(tmp_path, tiny_runs, "--set", f"base={NAME}", "--autoencoder", str(pub / "autoencoder"),
                          "--pretrained", str(pub / "ldm")) == cache_pair


def write_folder_data(root: Path) -> None:
    """10 class folders of 20x20 grayscale and 40x40 RGB / RGBA PNGs: sizes other than the model's 28."""
    rng = np.random.default_rng(0)
    for c in range(10):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(root / f"class{c}" / f"s{i}.png")
        Image.new("RGB", (40, 40), (200, 100, 0)).save(root / f"class{c}" / "rgb.png")
        Image.new("RGBA", (40, 40), (0, 0, 255, 255)).save(root / f"class{c}" / "rgba.png")


@pytest.mark.slow
def test_folder_data_of_other_sizes_with_the_base(installed: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    no_pretraining(monkeypatch)
    folder = tmp_path / "digits"
    write_folder_data(folder)
    ds = data_mod.load(str(folder), 1, 10, 28)
    images = np.concatenate([ds.train.images, ds.test.images])
    assert images.shape == (40, 28, 28, 1) and images.dtype == np.uint8
    # converted to grayscale by Pillow (ITU-R 601-2 luma), then resized: a flat colour stays flat
    gray = {int(np.asarray(Image.new("RGB", (1, 1), rgb).convert("L"))[0, 0]) for rgb in ((200, 100, 0), (0, 0, 255))}
    flat = [int(img[0, 0, 0]) for img in images if (img == img[0, 0, 0]).all()]
    assert len(flat) == 20 and set(flat) == gray
    res = train.main(train_args(tmp_path / "runs", folder, tmp_path / "run", "--set", f"base={NAME}"))
    assert res["steps"] == res["total_steps"] == 2  # 32 train images, batch 16
