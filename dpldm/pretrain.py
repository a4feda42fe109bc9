"""Stage 2: train the latent diffusion UNet + class embedder on PUBLIC data (ordinary, non-private training).

Encodes the public images with the stage-1 autoencoder, then trains the epsilon-prediction objective with
label dropout (null class) so classifier-free guidance works at sampling time.

    python -m dpldm.pretrain [--config mnist] [--autoencoder runs/mnist/public/autoencoder] [--out runs/mnist/public/ldm]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dpldm.common import add_config_args, config_from, images_tensor, load_public, public_dir, seed_all
from dpldm.diffusion import encode_latents
from dpldm.files import existing_dir
from dpldm.fit import Recipe, fit, resume_file
from dpldm.models import build_unet, load_autoencoder, save_ldm
from dpldm.provenance import autoencoder_hashes, command_line, run_record
from dpldm.runlog import RunLog


def parser() -> argparse.ArgumentParser:
    """The command line of `python -m dpldm.pretrain`.

    Returns:
        The parser.
    """
    p = argparse.ArgumentParser(prog="python -m dpldm.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--autoencoder", type=Path, help="autoencoder folder (default <runs>/<config>/public/autoencoder)")
    p.add_argument("--out", type=Path, help="LDM folder (default <runs>/<config>/public/ldm)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    return p


def run(cfg: dict[str, Any], ae_dir: Path, out: Path, seed: int = 0, device: str = "cpu", steps: int | None = None,
        batch_size: int | None = None, command: str | None = None) -> Path:
    """Pre-train the LDM on the public latents of an autoencoder and save it.

    Args:
        cfg: the config (data, unet, scheduler, pretrain sections).
        ae_dir: the autoencoder folder.
        out: the LDM folder to write.
        seed: for initialisation, batches, timesteps and noise.
        device: where to train.
        steps: optimizer steps (default the config's).
        batch_size: the batch size (default the config's).
        command: the command line, recorded in ldm.json with steps, wall time, machine and the sha256 of the
            autoencoder's files (python -m dpldm.ship checks it is shipped with that autoencoder).

    Returns:
        `out`.
    """
    t_start = time.time()
    hp = cfg["pretrain"]
    steps, batch_size = steps or hp["steps"], batch_size or hp["batch_size"]
    gen = seed_all(seed)
    log = RunLog(out.parent / "logs" / "ldm", "pretrain")
    vae = load_autoencoder(ae_dir, cfg).to(device)
    ae_hashes = autoencoder_hashes(existing_dir(ae_dir))  # the latents below are this autoencoder's
    public = load_public(cfg)
    z = encode_latents(vae, images_tensor(public.train, cfg).to(device)).cpu()
    y = torch.from_numpy(public.train.labels)
    model = build_unet(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log.print(f"LDM: {n_params:,} parameters, {len(z)} public latents {tuple(z.shape[1:])} ({public.source}), "
              f"{steps} steps", params=n_params)
    recipe = Recipe(steps, batch_size, hp["lr"], hp["label_dropout"])
    # hours on a CPU: a killed pre-training is resumed by the same command (its checkpoint beside `out`)
    done = fit(model, z, y, cfg, recipe, gen, device, "pretrain LDM", log, checkpoint=resume_file(out))
    record = run_record(cfg, steps=steps, batch_size=batch_size, seed=seed, device=device,
                        t_start=t_start - done.earlier_s, public_images=len(z), command=command)
    record["resumed_at_steps"] = done.resumed_at  # wall_s: every segment's time, up to its last checkpoint
    save_ldm(model.cpu(), out, {"stage": "pretrain", "public": public.source, "autoencoder": str(ae_dir),
                                "autoencoder_sha256": ae_hashes, **record})
    log.print(f"LDM saved to {out}", out=str(out))
    return out


def main(argv: list[str] | None = None) -> None:
    """The command line.

    Args:
        argv: the arguments (default sys.argv[1:]).
    """
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    cfg = config_from(args)
    pub = public_dir(args, cfg)
    run(cfg, args.autoencoder or pub / "autoencoder", args.out or pub / "ldm", args.seed, args.device, args.steps,
        args.batch_size, command=command_line("dpldm.pretrain", argv))


if __name__ == "__main__":
    main()
