"""Turn a pre-trained autoencoder folder + LDM folder into a shipped base: fp16 weights, card and SHA256SUMS.

    python -m dpldm.ship --autoencoder runs/mnist/public/autoencoder --ldm runs/mnist/public/ldm \\
        --name mnist-fontdigits --command "<the exact commands that rebuilt both folders>"

Writes dpldm/bases/<name>/ (or <--dest>/<name>/): autoencoder/ and ldm/ in the diffusers layouts the stages use,
weights as fp16 safetensors (loaded back as fp32), base.json, MODEL_CARD.md (rebuild command, public data, steps,
wall time and machine of each stage as they recorded them, parameter counts, size, the sha256 of every file)
and SHA256SUMS. Only what the pre-training stages wrote (public data) is accepted: an LDM written by dpldm.train
(fine-tuned on private data) is refused, and so is an LDM trained on another autoencoder than the one given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file

from dpldm import data as data_mod
from dpldm.base_models import BASES_DIR, CARD, MANIFEST, RECORD, files_in, verify_base
from dpldm.files import atomic_dir, read_json_or_empty, sha256_file, write_sha256sums
from dpldm.models import CheckpointError, ClassEmbedder, ConditionalUNet, save_autoencoder, save_ldm
from dpldm.provenance import autoencoder_hashes, command_line

SIZE_BUDGET_MB = 20.0  # issue 9: a base small enough to live in the package
DTYPES = {"float16": torch.float16, "float32": torch.float32}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def parser() -> argparse.ArgumentParser:
    """The command line of `python -m dpldm.ship`.

    Returns:
        The parser.
    """
    p = argparse.ArgumentParser(prog="python -m dpldm.ship", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--autoencoder", type=Path, required=True, help="folder written by python -m dpldm.pretrain_autoencoder")
    p.add_argument("--ldm", type=Path, required=True, help="folder written by python -m dpldm.pretrain")
    p.add_argument("--name", required=True, help="base name, e.g. mnist-fontdigits (letters, digits, . _ -)")
    p.add_argument("--dest", type=Path, default=BASES_DIR, help=f"parent folder (default the package's, {BASES_DIR})")
    p.add_argument("--command", help="the exact command(s) that rebuild both folders, for the card (default: the "
                                     "commands the two stages recorded, then this one)")
    p.add_argument("--public-note", default="", help="how the public data was made, if the card should say more")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float16", help="stored weight dtype (default float16)")
    p.add_argument("--force", action="store_true", help="replace an existing base of that name")
    return p


def check_public_pair(ae_dir: Path, ldm_dir: Path, ae_meta: dict[str, Any], ldm_meta: dict[str, Any]) -> None:
    """Refuse anything but a public pre-training pair: the base ships without any privacy accounting.

    Args:
        ae_dir: the autoencoder folder.
        ldm_dir: the LDM folder.
        ae_meta: its dpldm.json.
        ldm_meta: the LDM's ldm.json.

    Raises:
        CheckpointError: a folder not written by its pre-training stage, or an LDM trained on another autoencoder.
    """
    if ae_meta.get("stage") != "pretrain_autoencoder":
        raise CheckpointError(f"{ae_dir}: not written by python -m dpldm.pretrain_autoencoder (its dpldm.json says "
                              f"stage {ae_meta.get('stage')!r}); a base holds public pre-training only")
    if ldm_meta.get("stage") != "pretrain":
        raise CheckpointError(f"{ldm_dir}: not written by python -m dpldm.pretrain (its ldm.json says stage "
                              f"{ldm_meta.get('stage')!r}); a DP fine-tuned model is not a public base")
    recorded = ldm_meta.get("autoencoder_sha256")
    if recorded is None:
        warnings.warn(f"{ldm_dir}/ldm.json does not record which autoencoder it was trained on (older dpldm): "
                      f"make sure it was {ae_dir}", UserWarning, stacklevel=2)
    elif recorded != autoencoder_hashes(ae_dir):
        raise CheckpointError(f"{ldm_dir} was trained on the latents of another autoencoder than {ae_dir} (the sha256 "
                              "of its files differ from those ldm.json records): ship the pair that was trained together")


def read_pair(ae_dir: Path, ldm_dir: Path, dtype: torch.dtype) -> tuple[AutoencoderKL, ConditionalUNet]:
    """Both models, converted to `dtype` on loading (as diffusers recommends); no config to check against: the
    base's config is theirs. A weight that is not finite in `dtype` (out of fp16's range) is refused.

    Args:
        ae_dir: the autoencoder folder.
        ldm_dir: the LDM folder.
        dtype: the dtype to store.

    Returns:
        (autoencoder, LDM).
    """
    for f in (ae_dir / "config.json", ldm_dir / "unet" / "config.json", ldm_dir / "class_embedder" / "config.json"):
        if not f.is_file():
            raise CheckpointError(f"{f}: missing; --autoencoder and --ldm take the folders the pre-training stages write")
    vae = AutoencoderKL.from_pretrained(ae_dir, torch_dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(ldm_dir / "unet", torch_dtype=dtype)
    meta = read_json_or_empty(ldm_dir / "class_embedder" / "config.json")
    emb = ClassEmbedder(meta["num_classes"], meta["ctx_dim"])
    emb.embedding.weight.data.copy_(load_file(ldm_dir / "class_embedder" / "model.safetensors")["weight"])
    model = ConditionalUNet(unet, emb.to(dtype))
    for what, module in (("autoencoder", vae), ("LDM", model)):
        for name, t in module.state_dict().items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise CheckpointError(f"{what} weight {name} is not finite in {dtype} (out of range, or a broken "
                                      "checkpoint); ship with --dtype float32 if it is finite there")
    return vae, model


def count(module: torch.nn.Module) -> int:
    """A parameter count for the card.

    Args:
        module: the model.

    Returns:
        Its number of parameters.
    """
    return sum(p.numel() for p in module.parameters())


def describe_public(source: str | None) -> str:
    """How a public source was made: the built-in loader's own description, else the path the user gave.

    Args:
        source: the `public` entry a stage recorded.

    Returns:
        One line for the card.
    """
    loader = data_mod.BUILT_IN.get(source or "")
    if loader is not None and loader.__doc__:
        return " ".join(loader.__doc__.split())  # the whole docstring, on one line
    return "not recorded" if source is None else "user data (a folder of class sub-folders or an .npz) at that path"


def hms(seconds: float | None) -> str:
    """A wall time for the card.

    Args:
        seconds: the time, or None.

    Returns:
        `Hh MMm SSs`, or "not recorded".
    """
    if seconds is None:
        return "not recorded"
    s = round(seconds)
    return f"{s // 3600}h {s % 3600 // 60:02d}m {s % 60:02d}s"


def machine_line(m: dict[str, Any] | None) -> str:
    """A stage's machine for the card.

    Args:
        m: what dpldm.provenance.machine_info recorded, or None.

    Returns:
        One line, or "not recorded".
    """
    if not m:
        return "not recorded"
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return (f"{m.get('cpu')}, {m.get('cores')} cores (torch threads {m.get('torch_threads')}), device "
            f"{m.get('device')}{gpu}; torch {m.get('torch')}, diffusers {m.get('diffusers')}, python {m.get('python')}")


def default_command(ae_meta: dict[str, Any], ldm_meta: dict[str, Any], ship_command: str) -> str:
    """The rebuild command when --command is not given.

    Args:
        ae_meta: the autoencoder's dpldm.json.
        ldm_meta: the LDM's ldm.json.
        ship_command: this shipping's command.

    Returns:
        The two stages' recorded commands and `ship_command`, joined with &&; or a note if one is not recorded.
    """
    stages = [m.get("command") for m in (ae_meta, ldm_meta)]
    if None in stages:
        return "not recorded: pass --command to python -m dpldm.ship (the resolved configs are in the stages' json)"
    return " && \\\n  ".join([*stages, ship_command])


def card_text(rec: dict[str, Any], ae_meta: dict[str, Any], ldm_meta: dict[str, Any],
              files: dict[str, tuple[int, str]]) -> str:
    """MODEL_CARD.md: everything a reader needs to trust, rebuild and check the base.

    Args:
        rec: base.json's content.
        ae_meta: the autoencoder's dpldm.json.
        ldm_meta: the LDM's ldm.json.
        files: {relative path: (bytes, sha256)} of the base's other files.

    Returns:
        The card's Markdown.
    """
    stages = (("autoencoder", ae_meta), ("LDM", ldm_meta))
    total = sum(size for size, _ in files.values())
    cfg = ldm_meta.get("config") or ae_meta.get("config") or {}
    d, p = cfg.get("data", {}), rec["parameters"]
    intro = ("A class-conditional latent diffusion model (diffusers `AutoencoderKL` + `UNet2DConditionModel`, a "
             "class embedder as cross-attention context) pre-trained on PUBLIC data only, with ordinary (non-private) "
             "training. `python -m dpldm.train` DP fine-tunes it on private data. No private data went into these "
             "weights.")
    shipped = (f"Shipped {rec['created']} with `{rec['ship_command']}`. Weights: {rec['dtype']} safetensors, loaded "
               "back as float32.")
    model = (f"Config `{cfg.get('name', '?')}`: {d.get('channels', '?')} channel(s), {d.get('image_size', '?')} px "
             f"(padded to {d.get('pad_to', '?')}), {d.get('num_classes', '?')} classes. Parameters: autoencoder "
             f"{p['autoencoder']:,}, UNet {p['unet']:,}, class embedder {p['class_embedder']:,}. Size: "
             f"{total / 1e6:.2f} MB in {len(files)} files (without this card and {MANIFEST}).")
    check = (f"`{MANIFEST}` lists these and this card; dpldm checks every file against it before loading and refuses "
             f"a changed, missing or unlisted one. By hand: `cd <this folder> && sha256sum -c {MANIFEST}`.")
    lines = [f"# dpldm base model `{rec['name']}`", "", intro, "", shipped, "",
             "## Rebuild", "", "```bash", rec["rebuild_command"], "```", "", "## Public data", ""]
    for label, m in stages:
        lines.append(f"- {label}: `{m.get('public')}`, {m.get('public_images', 'not recorded')} training images: "
                     f"{describe_public(m.get('public'))}")
    if rec.get("public_note"):
        lines += ["", rec["public_note"]]
    lines += ["", "## Training", "", "| stage | steps | batch size | seed | wall time | finished |",
              "|---|---|---|---|---|---|"]
    for label, m in stages:
        lines.append(f"| {label} | {m.get('steps', '?')} | {m.get('batch_size', '?')} | {m.get('seed', '?')} | "
                     f"{hms(m.get('wall_s'))} | {m.get('finished', '?')} |")
    lines += ["", "Commands as each stage recorded them:", ""]
    lines += [f"- {label}: `{m.get('command') or 'not recorded (run from Python)'}`" for label, m in stages]
    lines += ["", "## Machine", ""]
    lines += [f"- {label}: {machine_line(m.get('machine'))}" for label, m in stages]
    lines += ["", "## Model", "", model, "", "## Files", "", "| file | bytes | sha256 |", "|---|---|---|"]
    lines += [f"| `{rel}` | {size:,} | `{digest}` |" for rel, (size, digest) in sorted(files.items())]
    lines += ["", check, ""]
    return "\n".join(lines)


def write_base(folder: Path, vae: AutoencoderKL, model: ConditionalUNet, ae_meta: dict[str, Any],
               ldm_meta: dict[str, Any], rec: dict[str, Any]) -> None:
    """Fill a base folder: autoencoder/, ldm/, base.json, MODEL_CARD.md, then SHA256SUMS over all of them.

    Args:
        folder: the (temporary) folder.
        vae: the autoencoder, in the stored dtype.
        model: the LDM, in the stored dtype.
        ae_meta: the autoencoder's dpldm.json.
        ldm_meta: the LDM's ldm.json.
        rec: base.json's content.
    """
    save_autoencoder(vae, folder / "autoencoder", ae_meta)
    save_ldm(model, folder / "ldm", ldm_meta)
    (folder / RECORD).write_text(json.dumps(rec, indent=1))
    files = {rel: ((folder / rel).stat().st_size, sha256_file(folder / rel)) for rel in files_in(folder)}
    (folder / CARD).write_text(card_text(rec, ae_meta, ldm_meta, files))
    write_sha256sums(folder, sorted(files_in(folder)))  # every file, the card included


def base_folder(name: str, dest: Path, force: bool) -> Path:
    """Where a base of that name goes, refused before anything is read or written.

    Args:
        name: the base's name.
        dest: the parent folder.
        force: replace an existing base of that name.

    Returns:
        dest/name.

    Raises:
        ValueError: not a folder name.
        FileExistsError: the base exists and not `force`.
    """
    if not NAME.fullmatch(name):
        raise ValueError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (a folder name)")
    folder = Path(dest) / name
    if folder.exists() and not force:
        raise FileExistsError(f"{folder} exists: pass --force to replace it")
    return folder


def warn_if_large(folder: Path) -> None:
    """Warn when a written base is over the size a packaged base aims at.

    Args:
        folder: the base folder.
    """
    total = sum((folder / rel).stat().st_size for rel in files_in(folder))
    if total > SIZE_BUDGET_MB * 1e6:
        warnings.warn(f"base {folder.name} is {total / 1e6:.1f} MB, over the {SIZE_BUDGET_MB:g} MB a packaged base "
                      "aims at", UserWarning, stacklevel=3)


def ship(ae_dir: Path, ldm_dir: Path, name: str, dest: Path = BASES_DIR, command: str | None = None,
         public_note: str = "", dtype: str = "float16", force: bool = False, ship_command: str | None = None) -> Path:
    """Write <dest>/<name>/ from the two pre-trained folders.

    Args:
        ae_dir: the autoencoder folder (python -m dpldm.pretrain_autoencoder's).
        ldm_dir: the LDM folder (python -m dpldm.pretrain's).
        name: the base's name (a folder name).
        dest: the parent folder.
        command: the rebuild command for the card (default: the stages' recorded ones, then this one).
        public_note: more about the public data, for the card.
        dtype: "float16" or "float32".
        force: replace an existing base of that name.
        ship_command: this command, as typed.

    Returns:
        The base folder, verified.

    Raises:
        ValueError: a bad name.
        FileExistsError: the base exists and not `force`.
        CheckpointError: not a public pre-training pair, or weights out of `dtype`'s range.
    """
    folder = base_folder(name, dest, force)
    ae_dir, ldm_dir = Path(ae_dir), Path(ldm_dir)
    ae_meta, ldm_meta = read_json_or_empty(ae_dir / "dpldm.json"), read_json_or_empty(ldm_dir / "ldm.json")
    check_public_pair(ae_dir, ldm_dir, ae_meta, ldm_meta)
    vae, model = read_pair(ae_dir, ldm_dir, DTYPES[dtype])
    ship_command = ship_command or f"dpldm.ship.ship({str(ae_dir)!r}, {str(ldm_dir)!r}, {name!r})"
    rec = {"name": name, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "dtype": dtype, "rebuild_command": command or default_command(ae_meta, ldm_meta, ship_command),
           "ship_command": ship_command, "public": {"autoencoder": ae_meta.get("public"), "ldm": ldm_meta.get("public")},
           "public_note": public_note, "config": (ldm_meta.get("config") or {}).get("name"),
           "parameters": {"autoencoder": count(vae), "unet": count(model.unet),
                          "class_embedder": count(model.class_embedder)}}
    atomic_dir(folder, lambda tmp: write_base(tmp, vae, model, ae_meta, ldm_meta, rec))
    verify_base(folder)
    warn_if_large(folder)
    return folder


def main(argv: list[str] | None = None) -> Path:
    """The command line: errors become one line and an exit status.

    Args:
        argv: the arguments (default sys.argv[1:]).

    Returns:
        The base folder.
    """
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    try:
        folder = ship(args.autoencoder, args.ldm, args.name, args.dest, args.command, args.public_note, args.dtype,
                      args.force, command_line("dpldm.ship", argv))
    except (CheckpointError, FileExistsError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"base {args.name} written to {folder} ({MANIFEST} verified); card: {folder / CARD}")
    return folder


if __name__ == "__main__":
    main()
