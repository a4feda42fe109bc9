"""Stage 1: train the AutoencoderKL on PUBLIC data (ordinary, non-private training).

    python -m dpldm.pretrain_autoencoder [--config mnist] [--out runs/mnist/public/autoencoder]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dpldm.common import (
    add_config_args,
    config_from,
    cycle_batches,
    images_tensor,
    load_public,
    public_dir,
    seed_all,
    warmup_cosine,
)
from dpldm.diffusion import encode
from dpldm.models import build_autoencoder, save_autoencoder
from dpldm.provenance import command_line, run_record
from dpldm.runlog import RunLog, progress


def parser() -> argparse.ArgumentParser:
    """The command line of `python -m dpldm.pretrain_autoencoder`.

    Returns:
        The parser.
    """
    p = argparse.ArgumentParser(prog="python -m dpldm.pretrain_autoencoder", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--out", type=Path, help="checkpoint folder (default <runs>/<config>/public/autoencoder)")
    p.add_argument("--steps", type=int, help="optimizer steps (default from config)")
    p.add_argument("--batch-size", type=int)
    return p


def autoencoder_loss(vae: Any, xb: torch.Tensor, kl_weight: float, generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, float]:
    """The autoencoder's training loss on one batch: L2 + L1 reconstruction of a latent sample, plus the KL term.

    Args:
        vae: the AutoencoderKL.
        xb: images [B, C, H, W] in [-1, 1].
        kl_weight: the KL term's weight.
        generator: for the latent sample (None: the global generator).

    Returns:
        (the loss to minimise, its reconstruction part as a float).
    """
    post = vae.encode(xb).latent_dist
    rec = vae.decode(post.sample(generator=generator)).sample
    rec_loss = F.mse_loss(rec, xb) + F.l1_loss(rec, xb)
    return rec_loss + kl_weight * post.kl().mean(), rec_loss.item()


def autoencoder_step(vae: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, xb: torch.Tensor,
                     kl_weight: float, generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """One optimizer step of the autoencoder on the batch `xb` (pre-training and adaptation alike).

    Args:
        vae: the AutoencoderKL, in train mode.
        opt: its optimizer.
        sched: the learning-rate schedule, stepped once.
        xb: images in [-1, 1], (B, C, H, W).
        kl_weight: the KL term's weight.
        generator: for the posterior sample (default torch's global generator).

    Returns:
        The loss and the reconstruction loss as a float.
    """
    loss, rec = autoencoder_loss(vae, xb, kl_weight, generator)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss, rec


def run(cfg: dict[str, Any], out: Path, seed: int = 0, device: str = "cpu", steps: int | None = None,
        batch_size: int | None = None, command: str | None = None) -> Path:
    """Pre-train the autoencoder on the public images, measure its latents' scaling factor, and save it.

    Args:
        cfg: the config (data, autoencoder, pretrain_autoencoder sections).
        out: the folder to write.
        seed: for initialisation and batches.
        device: where to train.
        steps: optimizer steps (default the config's).
        batch_size: the batch size (default the config's).
        command: the command line, recorded in dpldm.json with steps, wall time and machine (for a model card).

    Returns:
        `out`.
    """
    t_start = time.time()
    hp = cfg["pretrain_autoencoder"]
    steps, batch_size = steps or hp["steps"], batch_size or hp["batch_size"]
    gen = seed_all(seed)
    log = RunLog(out.parent / "logs" / "autoencoder", "pretrain_autoencoder")
    public = load_public(cfg)
    x = images_tensor(public.train, cfg)
    vae = build_autoencoder(cfg).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=hp["lr"])
    sched = warmup_cosine(opt, steps)
    log.print(f"autoencoder: {sum(p.numel() for p in vae.parameters()):,} parameters, {len(x)} public images "
              f"({public.source}), {steps} steps", params=sum(p.numel() for p in vae.parameters()))
    batches = cycle_batches(len(x), batch_size, gen)
    vae.train()
    bar = progress(steps, "autoencoder")
    for step in range(steps):
        loss, rec_loss = autoencoder_step(vae, opt, sched, x[next(batches)].to(device), hp["kl_weight"])
        bar.update()
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(rec=f"{rec_loss:.4f}")
            log.log(step=step, loss=loss.item(), rec=rec_loss)
    bar.close()
    # scale latents to unit variance, as LDM does; stored in the diffusers config (scaling_factor)
    z = encode(vae, x.to(device))
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    record = run_record(cfg, steps=steps, batch_size=batch_size, seed=seed, device=device, t_start=t_start,
                        public_images=len(x), command=command)
    save_autoencoder(vae.cpu(), out, {"stage": "pretrain_autoencoder", "public": public.source, **record})
    log.print(f"autoencoder saved to {out} (scaling_factor {vae.config.scaling_factor:.4f})", out=str(out))
    return out


def main(argv: list[str] | None = None) -> None:
    """The command line.

    Args:
        argv: the arguments (default sys.argv[1:]).
    """
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    cfg = config_from(args)
    run(cfg, args.out or public_dir(args, cfg) / "autoencoder", args.seed, args.device, args.steps, args.batch_size,
        command=command_line("dpldm.pretrain_autoencoder", argv))


if __name__ == "__main__":
    main()
