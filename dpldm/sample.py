"""Stage 4: DDIM sampling, N images per class, optional classifier-free guidance -> samples.npz + grid.png.

    python -m dpldm.sample --ldm runs/mnist/dp-attention-eps10/ldm --autoencoder runs/mnist/public/autoencoder \
        --per-class 500 --guidance-scale 2 --out runs/mnist/dp-attention-eps10
    python -m dpldm.sample --pipeline SD_FOLDER --lora RUN --prompts prompts.txt --out samples/
        (a diffusers pipeline, with the LoRA adapters or --unet of a `dpldm.train --pipeline` run; one class per
        prompt line)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpldm.base_models import config_base
from dpldm.common import add_config_args, config_from, public_dir, seed_all
from dpldm.data import from_model_tensor
from dpldm.diffusion import ddim_sample, decode_latents
from dpldm.models import ConditionalUNet, load_autoencoder, load_ldm
from dpldm.runlog import RunLog, progress


def parser() -> argparse.ArgumentParser:
    """The command line of `python -m dpldm.sample`.

    Returns:
        The parser.
    """
    p = argparse.ArgumentParser(prog="python -m dpldm.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--ldm", type=Path, help="LDM folder (unet/, class_embedder/); or --pipeline")
    p.add_argument("--autoencoder", type=Path, help="default: the one the LDM was trained with (its ldm.json), "
                                                      "else the config's base, else <runs>/<config>/public/autoencoder")
    p.add_argument("--out", type=Path, required=True, help="folder for samples.npz and grid.png")
    p.add_argument("--per-class", type=int, help="images per class (default from config)")
    p.add_argument("--ddim-steps", type=int)
    p.add_argument("--guidance-scale", type=float, help="1 = no guidance")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--pipeline", type=Path, help="a diffusers pipeline folder (text-conditioned), or a shipped "
                                                 "pipeline base's name, instead of --ldm")
    p.add_argument("--lora", type=Path, help="with --pipeline: a run folder with LoRA adapters to load into it")
    p.add_argument("--unet", type=Path, help="with --pipeline: a fine-tuned UNet folder to use in place of its own")
    p.add_argument("--prompts", type=Path, help="with --pipeline: prompts, one per line (a class each)")
    return p


def save_grid(images: np.ndarray, labels: np.ndarray, path: Path, per_row: int = 10, scale: int = 4,
              names: list[str] | None = None) -> None:
    """One labelled row per class: a label column (class name or index), then the first `per_row` images of the
    class, black where it has fewer; every pixel upscaled `scale` x `scale` (nearest, no blur).

    Args:
        images: uint8 [N, H, W, C].
        labels: [N].
        path: the PNG to write.
        per_row: images per class.
        scale: the upscaling factor.
        names: class names for the label column (default the indices).
    """
    from PIL import Image

    rows = []
    for c in np.unique(labels):
        imgs = images[labels == c][:per_row]
        if len(imgs) < per_row:
            imgs = np.concatenate([imgs, np.zeros((per_row - len(imgs), *imgs.shape[1:]), np.uint8)])
        rows.append(np.concatenate(list(imgs), axis=1))
    grid = np.concatenate(rows, axis=0)
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    cell = images.shape[1] * scale
    texts = [names[c] if names else str(c) for c in np.unique(labels)]
    column = label_column(texts, cell, grid.shape[-1])
    Image.fromarray(np.concatenate([column, grid], axis=1).squeeze(-1) if grid.shape[-1] == 1
                    else np.concatenate([column, grid], axis=1)).save(path)


def label_column(texts: list[str], cell: int, channels: int) -> np.ndarray:
    """The grid's label column: white text on black, one label per row of height `cell`, vertically centred; wide
    enough for the longest label.

    Args:
        texts: one label per row.
        cell: the row height in pixels.
        channels: the images' channels.

    Returns:
        uint8 [len(texts) * cell, width, channels].
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=max(10, cell // 2))
    pad = max(4, cell // 8)
    width = 2 * pad + max(int(font.getlength(t)) for t in texts)
    img = Image.new("L", (width, cell * len(texts)))
    draw = ImageDraw.Draw(img)
    for i, t in enumerate(texts):  # anchor "rm": right end, vertical middle, next to the row's first image
        draw.text((width - pad, i * cell + cell // 2), t, fill=255, font=font, anchor="rm")
    column = np.asarray(img)[..., None]
    return column.repeat(channels, axis=-1)


def run(cfg: dict[str, Any], model: ConditionalUNet, vae: Any, out: Path, per_class: int | None = None,
        ddim_steps: int | None = None, guidance_scale: float | None = None, batch_size: int | None = None,
        seed: int = 0, device: str = "cpu", names: list[str] | None = None) -> tuple[Path, Path]:
    """Sample `per_class` images of every class with DDIM and save samples.npz and grid.png.

    Args:
        cfg: the config (its sample section gives the defaults).
        model: the LDM.
        vae: its autoencoder.
        out: the folder to write.
        per_class: images per class.
        ddim_steps: sampling steps.
        guidance_scale: classifier-free guidance; 1 = none.
        batch_size: images per sampling batch.
        seed: the sampling seed.
        device: where to sample.
        names: the grid's row labels (default the class indices).

    Returns:
        (samples.npz, grid.png).
    """
    hp = cfg["sample"]
    per_class = per_class or hp["per_class"]
    ddim_steps = ddim_steps or hp["ddim_steps"]
    guidance_scale = hp["guidance_scale"] if guidance_scale is None else guidance_scale
    batch_size = batch_size or hp["batch_size"]
    gen = seed_all(seed)
    log = RunLog(out, "sample")
    model, vae = model.to(device).eval(), vae.to(device).eval()
    labels = torch.arange(model.class_embedder.num_classes).repeat_interleave(per_class)
    images = []
    bar = progress(len(labels), "sample")
    for i in range(0, len(labels), batch_size):
        y = labels[i : i + batch_size]
        z = ddim_sample(model, cfg, y.to(device), ddim_steps, guidance_scale, generator=gen)
        x = decode_latents(vae, z)
        images.append(from_model_tensor(x, cfg["data"]["image_size"]))
        bar.update(len(y))
    bar.close()
    imgs, labs = np.concatenate(images), labels.numpy()
    out.mkdir(parents=True, exist_ok=True)
    npz, grid = out / "samples.npz", out / "grid.png"
    tmp = out / ".samples.tmp.npz"
    np.savez_compressed(tmp, images=imgs, labels=labs)
    tmp.replace(npz)
    save_grid(imgs, labs, grid, hp.get("grid_per_row", 10), hp.get("grid_scale", 4), names)
    log.print(f"{len(labs)} samples ({per_class} per class, {ddim_steps} DDIM steps, guidance {guidance_scale}) "
              f"-> {npz}, grid {grid}", samples=str(npz), grid=str(grid))
    return npz, grid


def default_autoencoder(args: argparse.Namespace, cfg: dict[str, Any], ldm_meta: dict[str, Any]) -> Path:
    """The autoencoder the LDM was trained with: its run's adapted one beside it, or the one its ldm.json records,
    else the config's shipped base's, else the public cache <runs>/<config>/public/autoencoder.

    Args:
        args: the parsed command line (--runs).
        cfg: the config.
        ldm_meta: the LDM's ldm.json.

    Returns:
        The autoencoder folder.

    Raises:
        FileNotFoundError: the run's adapted autoencoder is not beside its LDM.
    """
    if ldm_meta.get("autoencoder_adapted"):  # the run adapted it (dpldm.adapt_autoencoder): never the base's
        beside = Path(args.ldm).parent / "autoencoder"
        if not beside.is_dir():
            raise FileNotFoundError(f"{args.ldm} was trained with its run's adapted autoencoder, which is not "
                                    f"beside it ({beside}): pass --autoencoder FOLDER")
        return beside
    if ldm_meta.get("autoencoder") and Path(ldm_meta["autoencoder"]).is_dir():
        return Path(ldm_meta["autoencoder"])
    base = config_base(cfg)
    return base / "autoencoder" if base is not None else public_dir(args, cfg) / "autoencoder"


def main(argv: list[str] | None = None) -> None:
    """The command line.

    Args:
        argv: the arguments (default sys.argv[1:]).
    """
    args = parser().parse_args(argv)
    cfg = config_from(args)
    if args.pipeline is not None:
        try:
            cfg, model, vae, prompts = pipeline_model(cfg, args)
        except (ValueError, OSError) as e:
            raise SystemExit(f"error: {e}") from None
        run(cfg, model, vae, args.out, args.per_class, args.ddim_steps, args.guidance_scale, args.batch_size,
            args.seed, args.device, names=prompts)
        return
    if args.ldm is None or args.lora or args.unet or args.prompts:
        raise SystemExit("error: pass --ldm FOLDER, or --pipeline DIR (with --lora/--unet and --prompts)")
    model, meta = load_ldm(args.ldm, cfg)
    try:
        ae_dir = args.autoencoder or default_autoencoder(args, cfg, meta)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    vae = load_autoencoder(ae_dir, cfg)
    run(cfg, model, vae, args.out, args.per_class, args.ddim_steps, args.guidance_scale, args.batch_size,
        args.seed, args.device)


def pipeline_model(cfg: dict[str, Any], args: argparse.Namespace) -> tuple[dict[str, Any], Any, Any, list[str]]:
    """The model `--pipeline` samples: the pipeline's UNet (its LoRA adapters from --lora loaded by diffusers, or
    --unet in its place) on the contexts of the --prompts lines.

    Args:
        cfg: the preset's config (its sample section).
        args: the parsed command line.

    Returns:
        (the run's config, the model, the VAE, the prompts).

    Raises:
        ValueError: no prompts, or --lora and --unet together.
    """
    from diffusers import UNet2DConditionModel

    from dpldm import pipeline as pipeline_mod

    if args.prompts is None:
        raise ValueError("--pipeline needs --prompts FILE: one prompt per line")
    prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{args.prompts}: no prompt in it")
    if args.lora and args.unet:
        raise ValueError("--lora and --unet exclude each other: a run saves one of them")
    pipe = pipeline_mod.load_pipeline(args.pipeline)
    if args.lora is not None:
        pipe.pipe.load_lora_weights(args.lora)
    if args.unet is not None:
        pipe.pipe.unet = UNet2DConditionModel.from_pretrained(args.unet).eval()
    table = pipeline_mod.CaptionContexts(pipeline_mod.encode_captions(pipe, prompts),
                                         pipeline_mod.encode_captions(pipe, [""]))
    model = pipeline_mod.TextConditionalUNet(pipe.unet, table)
    return pipeline_mod.run_config(cfg, pipe, len(prompts)), model, pipe.vae, prompts


if __name__ == "__main__":
    main()
