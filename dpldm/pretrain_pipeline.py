"""A text-conditioned base pre-trained on PUBLIC data, as a diffusers pipeline folder (issue 20's CPU demonstration).

Its VAE is a shipped base's autoencoder; its text encoder a small CLIP (dpldm.tiny_pipeline's tokenizer, random
weights, frozen: nothing public to pre-train it on here, and a fixed map from captions to contexts is all the UNet
needs); its UNet, the config's architecture cross-attending to that encoder, is trained non-privately on the
config's public images, each captioned PROMPT.format(label=its class name).

    python -m dpldm.pretrain_pipeline --config mnist --prompt "a handwritten {label}" \\
        --class-names zero,one,two,three,four,five,six,seven,eight,nine --out runs/fontdigits-text

A killed pre-training is resumed by the same command (dpldm.fit's checkpoint beside --out). Then DP fine-tune it:
    python -m dpldm.train --config mnist --pipeline runs/fontdigits-text --data DIGIT_FOLDERS \\
        --prompt "a handwritten {label}"
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dpldm import pipeline as pipeline_mod
from dpldm import tiny_pipeline
from dpldm.base_models import verified_base
from dpldm.common import add_config_args, config_from, load_public, seed_all
from dpldm.diffusion import encode_split
from dpldm.fit import Recipe, fit, resume_file
from dpldm.models import load_autoencoder
from dpldm.provenance import command_line, run_record
from dpldm.runlog import RunLog


def untrained(cfg: dict[str, Any], out: Path, seed: int, autoencoder: Path | None = None) -> None:
    """Write the pipeline before training: the base's autoencoder, a fresh text encoder and UNet.

    Args:
        cfg: the config (base, unet, scheduler sections).
        out: the folder.
        seed: for the text encoder's and the UNet's initialisation.
        autoencoder: an autoencoder folder in place of the config's base's.
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    vae = load_autoencoder(autoencoder or verified_base(cfg["base"]) / "autoencoder", cfg)
    width = cfg["unet"]["cross_attention_dim"]
    tokenizer, text_encoder = tiny_pipeline.text_parts(out, width)
    unet = UNet2DConditionModel(**cfg["unet"])
    scheduler = DDPMScheduler(**cfg["scheduler"], clip_sample=False)
    tiny_pipeline.save_pipeline(out, vae, text_encoder, tokenizer, unet, scheduler)


def run(cfg: dict[str, Any], out: Path, prompt: str, class_names: list[str], seed: int = 0, device: str = "cpu",
        steps: int | None = None, command: str | None = None, autoencoder: Path | None = None) -> Path:
    """Pre-train the pipeline's UNet on the public images and their class captions; save the pipeline.

    Args:
        cfg: the config (base, data, unet, scheduler, pretrain sections).
        out: the pipeline folder (a new one, or the one a killed run left with its checkpoint).
        prompt: the caption template, with {label}.
        class_names: the public classes' names, in label order.
        seed: for initialisation, batches, timesteps and noise.
        device: where to train.
        steps: optimizer steps (default the config's pretrain.steps).
        command: the command line, recorded in out/dpldm.json.
        autoencoder: an autoencoder folder in place of the config's base's.

    Returns:
        `out`.

    Raises:
        ValueError: a template without {label}, names that do not match the classes, or a folder in the way.
    """
    import json

    t_start = time.time()
    public = load_public(cfg)
    if "{label}" not in prompt:
        raise ValueError(f"--prompt {prompt!r}: needs {{label}} where the class name goes")
    if len(class_names) != public.num_classes:
        raise ValueError(f"{len(class_names)} class names for the {public.num_classes} classes of {public.source}")
    out, checkpoint = Path(out), resume_file(Path(out))
    if out.exists() and any(out.iterdir()) and not checkpoint.is_file():
        raise ValueError(f"{out} is not empty and holds no unfinished pre-training ({checkpoint.name}): pass a new "
                         "--out")
    if not checkpoint.is_file():
        untrained(cfg, out, seed, autoencoder)
    hp = cfg["pretrain"]
    steps = steps or hp["steps"]
    pipe = pipeline_mod.load_pipeline(out)
    captions = [prompt.format(label=name) for name in class_names]
    model = pipeline_mod.text_model(pipeline_mod.TextRun(pipe, None), captions)
    model.unet.requires_grad_(True)
    z = encode_split(pipe.vae, public.train.images, cfg, device)
    y = torch.from_numpy(public.train.labels)
    log = RunLog(out.parent / "logs" / out.name, "pretrain_pipeline")
    log.print(f"text-conditioned UNet: {sum(p.numel() for p in model.unet.parameters()):,} parameters, {len(z)} "
              f"public latents ({public.source}), captions {captions[0]!r}...{captions[-1]!r}, {steps} steps")
    gen = seed_all(seed)
    recipe = Recipe(steps, hp["batch_size"], hp["lr"], hp["label_dropout"])
    done = fit(model, z, y, cfg, recipe, gen, device, "pretrain text UNet", log, checkpoint=checkpoint)
    model.unet.cpu().eval().save_pretrained(out / "unet", safe_serialization=True)
    record = run_record(cfg, steps=steps, batch_size=hp["batch_size"], seed=seed, device=device,
                        t_start=t_start - done.earlier_s, public_images=len(z), command=command)
    record.update(stage="pretrain_pipeline", public=public.source, prompt=prompt, class_names=class_names,
                  autoencoder=str(autoencoder) if autoencoder else f"base {cfg['base']}",
                  resumed_at_steps=done.resumed_at)
    (out / "dpldm.json").write_text(json.dumps(record, indent=1))
    log.print(f"pipeline saved to {out}", out=str(out))
    return out


def main(argv: list[str] | None = None) -> None:
    """The command line.

    Args:
        argv: the arguments (default sys.argv[1:]).
    """
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m dpldm.pretrain_pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--out", type=Path, required=True, help="the pipeline folder to write")
    p.add_argument("--prompt", required=True, help="caption template, e.g. 'a handwritten {label}'")
    p.add_argument("--class-names", required=True, help="comma-separated names of the public classes, in order")
    p.add_argument("--steps", type=int, help="optimizer steps (default the config's pretrain.steps)")
    p.add_argument("--autoencoder", type=Path, help="an autoencoder folder (default: the config's base's)")
    args = p.parse_args(argv)
    cfg = config_from(args)
    try:
        run(cfg, args.out, args.prompt, args.class_names.split(","), args.seed, args.device, args.steps,
            command=command_line("dpldm.pretrain_pipeline", argv), autoencoder=args.autoencoder)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
