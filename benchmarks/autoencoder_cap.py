"""The round-trip cap of an autoencoder on a private data set, before and after adapting it for free (issue 19).

The cap: the evaluation CNN trained on the autoencoder's reconstructions of private training images, read on the
real test split; no latent model decoded by that autoencoder can do better. With --release (a run's
<run>/warmup/release.npz, a DP output), the autoencoder is first adapted by dpldm.adapt_autoencoder on images drawn
from the release plus public images (post-processing: no further privacy), and both caps are measured.

This is a diagnostic: it reads the private test split. Choose settings with it on a PROXY data set (e.g. MNIST
with the letters base, to decide for Fashion-MNIST with the digit base), never on the run's own data.

    python benchmarks/autoencoder_cap.py --config mnist-letters [--release RUN/warmup/release.npz] \
        [--steps 600] [--images 20000] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpldm import adapt_autoencoder, evaluate, warmup
from dpldm import data as data_mod
from dpldm.base_models import verified_base
from dpldm.common import images_tensor, load_private, load_public, private_classes
from dpldm.config import load_config
from dpldm.diffusion import decode, encode
from dpldm.models import load_autoencoder


def round_trip(vae: Any, split: data_mod.Split, cfg: dict[str, Any]) -> tuple[np.ndarray, float]:
    """The autoencoder's reconstructions (posterior mean decoded) and their mean squared error, pixels in [0, 1]."""
    x = images_tensor(split, cfg)
    with torch.no_grad():
        rec = decode(vae, encode(vae, x))
    images = data_mod.from_model_tensor(rec, cfg["data"]["image_size"])
    mse = float(np.mean((images.astype(np.float64) / 255 - split.images.astype(np.float64) / 255) ** 2))
    return images, mse


def cap(vae: Any, cfg: dict[str, Any], real: data_mod.DataSet, n: int, out: Path, seed: int) -> dict[str, float]:
    """Test MSE of the round trip, and the CNN trained on n reconstructed training images, read on real.test."""
    t0 = time.time()
    _, mse = round_trip(vae, real.test, cfg)
    idx = np.random.default_rng(seed).choice(len(real.train.labels), min(n, len(real.train.labels)), replace=False)
    train = data_mod.Split(real.train.images[idx], real.train.labels[idx])
    images, _ = round_trip(vae, train, cfg)
    res = evaluate.run(cfg, data_mod.Split(images, train.labels), real, None, out, use_sklearn=False, seed=seed,
                       baselines_on=False)
    return {"test_mse": mse, "cnn_test_acc": res["cnn_test_acc"], "s": time.time() - t0}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="mnist-letters")
    p.add_argument("--set", action="append", default=[], help="config overrides, as dpldm.train's")
    p.add_argument("--autoencoder", type=Path, help="default: the config's shipped base's")
    p.add_argument("--release", type=Path, help="a run's warmup/release.npz: adapt the autoencoder on its samples")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--images", type=int, default=20000, help="reconstructed training images the CNN learns from")
    p.add_argument("--out", type=Path, default=Path("runs/autoencoder-cap"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.set)
    vae = load_autoencoder(args.autoencoder or verified_base(cfg["base"]) / "autoencoder", cfg)
    real = load_private(cfg["data"]["private"], cfg)
    rows = {"as shipped": cap(vae, cfg, real, args.images, args.out / "shipped", args.seed)}
    if args.release is not None:
        rel = warmup.Release.load(args.release)
        settings = warmup.Settings.of(cfg)
        per_class = settings.per_class if settings else 2000
        if len(rel.counts) != private_classes(cfg):
            raise SystemExit(f"{args.release}: {len(rel.counts)} classes, config {args.config} has "
                             f"{private_classes(cfg)}")
        images, labels = rel.sample(per_class, np.random.default_rng(args.seed))
        released = images_tensor(data_mod.Split(images, labels), cfg)
        public = images_tensor(load_public(cfg).train, cfg)
        t0 = time.time()
        losses = adapt_autoencoder.adapt(vae, released, public, args.steps, args.batch_size, args.lr,
                                         cfg["pretrain_autoencoder"]["kl_weight"] if "pretrain_autoencoder" in cfg
                                         else 1e-6, args.seed)
        adapted = cap(vae, cfg, real, args.images, args.out / "adapted", args.seed)
        rows[f"adapted, {args.steps} steps"] = {**adapted, "adapt_s": time.time() - t0, "losses": losses[-3:]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cap.json").write_text(json.dumps(rows, indent=1))
    for name, row in rows.items():
        print(f"{name:24s} test MSE {row['test_mse']:.4f}  CNN on reconstructions {row['cnn_test_acc']:.4f}")
    return rows


if __name__ == "__main__":
    main()
