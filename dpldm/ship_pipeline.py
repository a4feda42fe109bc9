"""Turn a text-conditioned pipeline pre-trained on public data into a shipped base: fp16 weights, card, SHA256SUMS.

    python -m dpldm.ship_pipeline --pipeline runs/fontdigits-text --name mnist-fontdigits-text

Writes dpldm/bases/<name>/ (or <--dest>/<name>/): the diffusers pipeline folder (model_index.json, unet/, vae/,
text_encoder/, tokenizer/, scheduler/; weights as fp16 safetensors, loaded back as fp32), dpldm.json (the
pre-training's record), base.json, MODEL_CARD.md and SHA256SUMS. `--pipeline NAME` on dpldm.train and dpldm.sample
then finds it by name and checks every file before loading. Only what `python -m dpldm.pretrain_pipeline` wrote is
accepted (public data only): any other pipeline folder, a DP fine-tuned one included, is refused.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

import torch

from dpldm.base_models import BASES_DIR, CARD, MANIFEST, RECORD, files_in, verify_base
from dpldm.files import atomic_dir, read_json_or_empty, sha256_file, write_sha256sums
from dpldm.models import CheckpointError
from dpldm.pipeline import load_pipeline
from dpldm.provenance import command_line
from dpldm.ship import DTYPES, base_folder, count, describe_public, hms, machine_line, warn_if_large

STAGE_RECORD = "dpldm.json"  # what python -m dpldm.pretrain_pipeline records beside the pipeline
PARTS = ("unet", "vae", "text_encoder")


def check_public_pipeline(folder: Path, meta: dict[str, Any]) -> None:
    """Refuse anything but a public pre-training: the base ships without any privacy accounting.

    Args:
        folder: the pipeline folder.
        meta: its dpldm.json.

    Raises:
        CheckpointError: a folder not written by python -m dpldm.pretrain_pipeline.
    """
    if meta.get("stage") != "pretrain_pipeline":
        raise CheckpointError(f"{folder}: not written by python -m dpldm.pretrain_pipeline (its {STAGE_RECORD} says "
                              f"stage {meta.get('stage')!r}); a base holds public pre-training only")


def read_pipeline(folder: Path, dtype: torch.dtype) -> Any:
    """The diffusers pipeline, its weights converted to `dtype`; a weight that is not finite there is refused.

    Args:
        folder: the pipeline folder.
        dtype: the dtype to store.

    Returns:
        The diffusers pipeline.
    """
    pipe = load_pipeline(folder).pipe
    for name in PARTS:
        module = getattr(pipe, name).to(dtype)
        for key, t in module.state_dict().items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise CheckpointError(f"{name} weight {key} is not finite in {dtype} (out of range, or a broken "
                                      "checkpoint); ship with --dtype float32 if it is finite there")
    return pipe


def card_text(rec: dict[str, Any], meta: dict[str, Any], files: dict[str, tuple[int, str]]) -> str:
    """MODEL_CARD.md: everything a reader needs to trust, rebuild, load and check the base.

    Args:
        rec: base.json's content.
        meta: the pre-training's dpldm.json.
        files: {relative path: (bytes, sha256)} of the base's other files.

    Returns:
        The card's Markdown.
    """
    total = sum(size for size, _ in files.values())
    cfg = meta.get("config") or {}
    d, p, names = cfg.get("data", {}), rec["parameters"], meta.get("class_names") or []
    intro = ("A text-conditioned latent diffusion pipeline in diffusers' format (`AutoencoderKL`, CLIP text encoder "
             "and tokenizer, `UNet2DConditionModel` cross-attending to the text encoder's hidden states, "
             "`DDPMScheduler`) whose UNet was pre-trained on PUBLIC data only, with ordinary (non-private) training. "
             "The text encoder has random weights (seeded) and is frozen: a fixed map from captions to contexts. "
             f"The autoencoder is the one of {meta.get('autoencoder', 'not recorded')} (its own card says how it was "
             "made). No private data went into these weights.")
    train_cmd = (f"python -m dpldm.train --config {cfg.get('name', 'CONFIG')} --pipeline {rec['name']} "
                 f"--data CLASS_FOLDERS --prompt {json.dumps(meta.get('prompt', 'a photo of a {label}'))}")
    in_python = ("or in Python: `DiffusionPipeline.from_pretrained(<this folder>)` (weights stored as fp16: pass "
                 "`torch_dtype=torch.float32` to train).")
    model = (f"Config `{cfg.get('name', '?')}`: {d.get('channels', '?')} channel(s), {d.get('image_size', '?')} px "
             f"(padded to {d.get('pad_to', '?')}). Parameters: UNet {p['unet']:,}, autoencoder {p['vae']:,}, text "
             f"encoder {p['text_encoder']:,}. Size: {total / 1e6:.2f} MB in {len(files)} files (without this card "
             f"and {MANIFEST}).")
    check = (f"`{MANIFEST}` lists these and this card; dpldm checks every file against it before loading and refuses "
             f"a changed, missing or unlisted one. By hand: `cd <this folder> && sha256sum -c {MANIFEST}`.")
    shipped = f"Shipped {rec['created']} with `{rec['ship_command']}`. Weights: {rec['dtype']} safetensors."
    public = (f"- `{meta.get('public')}`, {meta.get('public_images', 'not recorded')} training images: "
              f"{describe_public(meta.get('public'))}")
    captions = (f"- each captioned `{meta.get('prompt')}` with its class name: {', '.join(names) or 'not recorded'} "
                f"(caption dropout to the empty caption: {cfg.get('pretrain', {}).get('label_dropout', '?')})")
    stage = (f"| UNet | {meta.get('steps', '?')} | {meta.get('batch_size', '?')} | {meta.get('seed', '?')} | "
             f"{hms(meta.get('wall_s'))} | {meta.get('finished', '?')} | {machine_line(meta.get('machine'))} |")
    lines = [f"# dpldm pipeline base `{rec['name']}`", "", intro, "", shipped, "", "## Use", "", "```bash",
             train_cmd, "```", "", in_python, "", "## Rebuild", "", "```bash", rec["rebuild_command"], "```", "",
             "## Public data and captions", "", public, captions]
    if rec.get("public_note"):
        lines += ["", rec["public_note"]]
    lines += ["", "## Training", "", "| stage | steps | batch size | seed | wall time | finished | machine |",
              "|---|---|---|---|---|---|---|", stage,
              "", f"Command as the stage recorded it: `{meta.get('command') or 'not recorded (run from Python)'}`",
              "", "## Model", "", model, "", "## Files", "", "| file | bytes | sha256 |", "|---|---|---|"]
    lines += [f"| `{rel}` | {size:,} | `{digest}` |" for rel, (size, digest) in sorted(files.items())]
    lines += ["", check, ""]
    return "\n".join(lines)


def write_base(folder: Path, pipe: Any, meta: dict[str, Any], rec: dict[str, Any]) -> None:
    """Fill a base folder: the pipeline, dpldm.json, base.json, MODEL_CARD.md, then SHA256SUMS over all of them.

    Args:
        folder: the (temporary) folder.
        pipe: the diffusers pipeline, in the stored dtype.
        meta: the pre-training's dpldm.json.
        rec: base.json's content.
    """
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / STAGE_RECORD).write_text(json.dumps(meta, indent=1))
    (folder / RECORD).write_text(json.dumps(rec, indent=1))
    files = {rel: ((folder / rel).stat().st_size, sha256_file(folder / rel)) for rel in files_in(folder)}
    (folder / CARD).write_text(card_text(rec, meta, files))
    write_sha256sums(folder, sorted(files_in(folder)))  # every file, the card included


def ship(src: Path, name: str, dest: Path = BASES_DIR, command: str | None = None, public_note: str = "",
         dtype: str = "float16", force: bool = False, ship_command: str | None = None) -> Path:
    """Write <dest>/<name>/ from a pipeline folder python -m dpldm.pretrain_pipeline wrote.

    Args:
        src: the pipeline folder.
        name: the base's name (a folder name).
        dest: the parent folder.
        command: the rebuild command for the card (default: the one the pre-training recorded, then this one).
        public_note: more about the public data, for the card.
        dtype: "float16" or "float32".
        force: replace an existing base of that name.
        ship_command: this command, as typed.

    Returns:
        The base folder, verified.

    Raises:
        ValueError: a bad name.
        FileExistsError: the base exists and not `force`.
        CheckpointError: not a public pre-training, or weights out of `dtype`'s range.
    """
    folder = base_folder(name, dest, force)
    src = Path(src)
    meta = read_json_or_empty(src / STAGE_RECORD)
    check_public_pipeline(src, meta)
    pipe = read_pipeline(src, DTYPES[dtype])
    ship_command = ship_command or f"dpldm.ship_pipeline.ship({str(src)!r}, {name!r})"
    stage = meta.get("command") or "not recorded: pass --command (the resolved config is in dpldm.json)"
    rec = {"name": name, "kind": "pipeline",
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "dtype": dtype,
           "rebuild_command": command or f"{stage} && \\\n  {ship_command}", "ship_command": ship_command,
           "public": meta.get("public"), "prompt": meta.get("prompt"), "class_names": meta.get("class_names"),
           "public_note": public_note, "config": (meta.get("config") or {}).get("name"),
           "parameters": {part: count(getattr(pipe, part)) for part in PARTS}}
    atomic_dir(folder, lambda tmp: write_base(tmp, pipe, meta, rec))
    verify_base(folder, kind="pipeline")
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
    p = argparse.ArgumentParser(prog="python -m dpldm.ship_pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", type=Path, required=True, help="folder written by python -m dpldm.pretrain_pipeline")
    p.add_argument("--name", required=True, help="base name, e.g. mnist-fontdigits-text (letters, digits, . _ -)")
    p.add_argument("--dest", type=Path, default=BASES_DIR, help=f"parent folder (default the package's, {BASES_DIR})")
    p.add_argument("--command", help="the exact command(s) that rebuild the pipeline, for the card (default: the "
                                     "command the pre-training recorded, then this one)")
    p.add_argument("--public-note", default="", help="how the public data was made, if the card should say more")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float16", help="stored weight dtype (default float16)")
    p.add_argument("--force", action="store_true", help="replace an existing base of that name")
    args = p.parse_args(argv)
    try:
        folder = ship(args.pipeline, args.name, args.dest, args.command, args.public_note, args.dtype, args.force,
                      command_line("dpldm.ship_pipeline", argv))
    except (CheckpointError, FileExistsError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"base {args.name} written to {folder} ({MANIFEST} verified); card: {folder / CARD}")
    return folder


if __name__ == "__main__":
    main()
