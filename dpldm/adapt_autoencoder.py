"""The public autoencoder adapted to the private domain without reading a private image (issue 19).

A base pre-trained on public data far from the private domain (font digits for Fashion-MNIST) has an autoencoder
that cannot draw the private images: its round trip caps what any latent model can reach. After the DP warm-up's
release (dpldm.warmup), the images drawn from it show the private domain's coarse shapes; fine-tuning the
autoencoder on them, mixed half and half with the public images it was trained on (so it keeps drawing fine
strokes), is post-processing of the release and of public data: it costs no privacy.
"""

from __future__ import annotations

from typing import Any

import torch

from dpldm.common import cycle_batches, warmup_cosine
from dpldm.pretrain_autoencoder import autoencoder_step
from dpldm.runlog import progress


def adapt(vae: Any, released: torch.Tensor, public: torch.Tensor, steps: int, batch_size: int, lr: float,
          kl_weight: float, seed: int, device: str = "cpu") -> list[float]:
    """Fine-tune every autoencoder parameter in place, each batch half released samples and half public images.
    The latents' scaling factor is kept: the LDM that follows was trained at that scale.

    Args:
        vae: the autoencoder (AutoencoderKL), trained in place and left in eval mode.
        released: images drawn from a DP release, model tensors [N, C, H, W] in [-1, 1].
        public: public images, the same layout.
        steps: optimizer steps (0: nothing changes).
        batch_size: images per step, half from each set (at least 2).
        lr: AdamW's peak learning rate (cosine schedule with warm-up).
        kl_weight: the KL term's weight (the config's pretrain_autoencoder.kl_weight).
        seed: for the batches and the latent samples.
        device: where to train.

    Returns:
        The reconstruction loss of every 50th step and of the last.

    Raises:
        ValueError: an empty set, or a batch too small to hold both halves.
    """
    if batch_size < 2 or not len(released) or not len(public):
        raise ValueError(f"adapt: needs released and public images and batch_size >= 2 (got {len(released)}, "
                         f"{len(public)}, {batch_size})")
    if steps <= 0:
        return []
    gen = torch.Generator().manual_seed(seed)
    half = batch_size // 2
    ours, theirs = cycle_batches(len(released), half, gen), cycle_batches(len(public), batch_size - half, gen)
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    sched = warmup_cosine(opt, steps)
    losses: list[float] = []
    bar = progress(steps, "autoencoder adaptation")
    for step in range(steps):
        xb = torch.cat([released[next(ours)], public[next(theirs)]]).to(device)
        _, rec = autoencoder_step(vae, opt, sched, xb, kl_weight,
                                  torch.Generator(device).manual_seed(seed * 100003 + step))
        bar.update()
        if step % 50 == 0 or step == steps - 1:
            losses.append(rec)
            bar.set_postfix(rec=f"{rec:.4f}")
    bar.close()
    vae.eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    return losses
