"""The round-trip cap of an autoencoder on a private data set, before and after adapting it for free (issue 19).

The cap: the evaluation CNN trained on the autoencoder's reconstructions of private training images, read on the
real test split; no latent model decoded by that autoencoder can do better. With --release (a run's
<run>/warmup/release.npz, a DP output), the autoencoder is first adapted by dpldm.adapt_autoencoder on images drawn
from the release plus public images (post-processing: no further privacy), and both caps are measured.

With --release it also prints the autoencoder's round-trip error on the release's samples beside its error on public
images and on samples of the same Gaussian model fitted to the public images (no private image read: a candidate
rule for adapting without the test split; its readings are in benchmarks/RESULTS.md). --gap-only stops there.

The cap is a diagnostic: it reads the private test split. Choose settings with it on a PROXY data set (e.g. MNIST
with the letters base, to decide for Fashion-MNIST with the digit base), never on the run's own data.

    python benchmarks/autoencoder_cap.py --config mnist-letters [--release RUN/warmup/release.npz] \
        [--steps 600] [--images 20000] [--out DIR] [--gap-only]
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


def mse(vae: Any, x: torch.Tensor, batch: int = 500) -> float:
    """Mean squared error of the round trip (posterior mean decoded) of model tensors x, pixels in [0, 1]."""
    with torch.no_grad():
        rec = torch.cat([decode(vae, encode(vae, x[i:i + batch])) for i in range(0, len(x), batch)])
    return float(((rec.clamp(-1, 1) - x) ** 2).mean() / 4)


def public_gaussians(public: data_mod.Split, frequencies: int, per_class: int, rng: np.random.Generator
                     ) -> np.ndarray:
    """Images drawn from per-class Gaussians of the public images' DCT coefficients (the warm-up's model, fitted
    without noise): blobs of the autoencoder's own domain, the reference for the release's samples."""
    z = warmup.coefficients(public.images, frequencies)
    out = []
    for label in np.unique(public.labels):
        zc = z[public.labels == label]
        if len(zc) < 2:  # no covariance to fit
            continue
        ev, vec = np.linalg.eigh(np.cov(zc.T))
        draw = zc.mean(0) + rng.standard_normal((per_class, z.shape[1])) @ (vec * np.sqrt(np.clip(ev, 0, None))).T
        out.append(warmup.to_images(draw, public.images.shape[1:], frequencies))
    return np.concatenate(out)


def domain_gap(vae: Any, cfg: dict[str, Any], rel: warmup.Release, public: data_mod.Split, seed: int
               ) -> dict[str, float]:
    """The round-trip error on 200 release samples per class, on 2,000 public images, and on 100 samples per
    public class of public_gaussians; no private image is read (the release is a DP output)."""
    rng = np.random.default_rng(seed)
    images, labels = rel.sample(200, rng)
    idx = rng.choice(len(public.labels), min(2000, len(public.labels)), replace=False)
    blobs = public_gaussians(public, rel.frequencies, 100, rng)
    row = {"release_samples": mse(vae, images_tensor(data_mod.Split(images, labels), cfg)),
           "public": mse(vae, images_tensor(data_mod.Split(public.images[idx], public.labels[idx]), cfg)),
           "public_gaussians": mse(vae, images_tensor(data_mod.Split(blobs, np.zeros(len(blobs), np.int64)), cfg))}
    return {**row, "ratio": row["release_samples"] / row["public_gaussians"]}


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
    p.add_argument("--gap-only", action="store_true", help="with --release: only domain_gap (no private image read)")
    args = p.parse_args(argv)
    if args.gap_only and args.release is None:
        raise SystemExit("--gap-only needs --release")
    cfg = load_config(args.config, args.set)
    vae = load_autoencoder(args.autoencoder or verified_base(cfg["base"]) / "autoencoder", cfg)
    rel = warmup.Release.load(args.release) if args.release is not None else None
    if rel is not None:
        gap = domain_gap(vae, cfg, rel, load_public(cfg).train, args.seed)
        print("round-trip MSE: " + ", ".join(f"{k} {v:.5f}" for k, v in gap.items()))
        if args.gap_only:
            return {"gap": gap}
    real = load_private(cfg["data"]["private"], cfg)
    rows = {"as shipped": cap(vae, cfg, real, args.images, args.out / "shipped", args.seed)}
    if rel is not None:
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
    (args.out / "cap.json").write_text(json.dumps({**rows, **({"domain_gap": gap} if rel else {})}, indent=1))
    for name, row in rows.items():
        print(f"{name:24s} test MSE {row['test_mse']:.4f}  CNN on reconstructions {row['cnn_test_acc']:.4f}")
    return rows


if __name__ == "__main__":
    main()
