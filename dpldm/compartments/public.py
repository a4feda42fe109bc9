"""A non-private compartment (`--no-dp`), for a shard of PUBLIC data: the same trainable set as the private
compartments, trained with plain AdamW on the shard's latents. It carries no privacy claim and adds nothing to the
accounting of the private shards (it never sees their data)."""

from __future__ import annotations

import math
from typing import Any

import torch

from dpldm import data as data_mod
from dpldm.common import images_tensor, seed_all
from dpldm.compartments.store import base_model, base_vae
from dpldm.diffusion import encode_latents
from dpldm.fit import Recipe, fit
from dpldm.models import ConditionalUNet
from dpldm.trainable import select_trainable


def train_public(cfg: dict[str, Any], data: data_mod.DataSet, base: dict[str, Any], hp: dict[str, Any], seed: int,
                 device: str) -> tuple[ConditionalUNet, int]:
    """Ordinary (non-private) fine-tuning of the base on a public shard, with the private compartments' trainable set.

    Args:
        cfg: the run's config.
        data: the shard's (public) data.
        base: the run's base record ({"autoencoder", "ldm", ...}, or a pipeline's).
        hp: trainable, ablation, lora_rank, epochs, batch_size, lr (dpldm.train's meaning).
        seed: for initialisation, batches, timesteps and noise.
        device: where to train.

    Returns:
        (the model as trained, adapters separate, its number of steps).
    """
    gen = seed_all(seed)
    vae = base_vae(base, cfg)
    z = encode_latents(vae, images_tensor(data.train, cfg))
    y = torch.from_numpy(data.train.labels)
    model = base_model(base, cfg)
    select_trainable(model, hp["trainable"], hp["ablation"], hp["lora_rank"])
    model.to(device).train()
    batch = min(hp["batch_size"], len(y))
    steps = hp["epochs"] * math.ceil(len(y) / batch)
    recipe = Recipe(steps, batch, hp["lr"], cfg["train"].get("label_dropout", 0.0), weight_decay=0.0, cosine=False)
    fit(model, z, y, cfg, recipe, gen, device, "public compartment")
    return model, steps
