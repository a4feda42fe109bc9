"""Signal against DP noise in one DP-SGD step of a finished run (issue 19 ablation). NOT PRIVATE: a diagnostic.

It reads private training images and prints statistics of their gradients that no DP mechanism protects: for the
comparison only, never to choose a run's settings on its own data (choose them on a proxy data set).

For n private training images and the run's fine-tuned model (its trainable parameters, the config's mode), each
image's gradient of the diffusion loss (k noise draws averaged, as the engine's noise multiplicity) is computed
one at a time, then clipped at the run's C:

- the per-sample norms (10th, 50th, 90th percentile) and the share above C: how much clipping does;
- ||E clip(g)||, the expected step direction, estimated without bias from the n clipped gradients, and the bound
  two jackknife standard errors above it (at small n the estimate is noisy: read the bound, not the digits);
- sigma C sqrt(d) / B, the norm of the Gaussian noise the engine adds to the mean clipped gradient per step.

    python benchmarks/gradient_signal.py RUN --config fmnist-cpu [--images 256] [--multiplicity 1 4] [--clip C ...]
        [--data FILE] [--runs DIR]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpldm.common import load_private
from dpldm.config import load_config
from dpldm.diffusion import diffusion_loss, encode_split, train_scheduler
from dpldm.models import load_autoencoder, load_ldm
from dpldm.sample import default_autoencoder
from dpldm.trainable import select_trainable


def run_settings(run: Path) -> dict[str, float]:
    """sigma, C and the expected batch size the run's DP-SGD stage logged (its log.jsonl)."""
    for line in (run / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if {"sigma", "max_grad_norm", "expected_batch_size"} <= rec.keys():
            return {k: float(rec[k]) for k in ("sigma", "max_grad_norm", "expected_batch_size")}
    raise SystemExit(f"{run}/log.jsonl: no DP-SGD settings logged (not a finished dpldm.train run?)")


def pair_estimate(gram: np.ndarray) -> tuple[float, float]:
    """The mean of gram's off-diagonal entries (for a Gram matrix of n i.i.d. vectors: unbiased for ||E c||^2)
    and its jackknife standard error (each vector left out once).

    Args:
        gram: [n, n] symmetric, n >= 3.

    Returns:
        (estimate, standard error).
    """
    n = len(gram)
    off = gram.sum() - np.trace(gram)
    row = gram.sum(1) - np.diag(gram)  # vector i's off-diagonal row: it appears twice in the sum
    loo = (off - 2 * row) / ((n - 1) * (n - 2))  # the estimate without vector i
    return off / (n * (n - 1)), math.sqrt((n - 1) / n * float(((loo - loo.mean()) ** 2).sum()))


def signal(model: Any, cfg: dict[str, Any], z: torch.Tensor, y: torch.Tensor, clips: list[float], k: int,
           seed: int) -> list[dict[str, float]]:
    """Per-sample gradient statistics of the model's trainable parameters at each C (module docstring): one
    gradient per image, clipping applied to their Gram matrix (c_i . c_j = f_i f_j g_i . g_j)."""
    params = [p for p in model.parameters() if p.requires_grad]
    sched, gen = train_scheduler(cfg), torch.Generator().manual_seed(seed)
    dropout = cfg["train"].get("label_dropout", 0.0)
    n = len(y)
    grads = None
    for i in range(n):
        loss = sum(diffusion_loss(model, sched, z[i:i + 1], y[i:i + 1], dropout, gen) for _ in range(k)) / k
        g = torch.cat([t.flatten() for t in torch.autograd.grad(loss, params)])
        if grads is None:
            grads = torch.empty(n, g.numel())
        grads[i] = g
    gram = np.zeros((n, n))
    for j in range(0, grads.shape[1], 1 << 20):  # in float64, a slice at a time: all of it would not fit in memory
        part = grads[:, j:j + (1 << 20)].double()
        gram += (part @ part.T).numpy()
    norms = np.sqrt(np.diag(gram))
    q = np.percentile(norms, [10, 50, 90])
    rows = []
    for clip in clips:
        f = np.minimum(1.0, clip / np.maximum(norms, 1e-12))
        est, se = pair_estimate(gram * np.outer(f, f))
        rows.append({"k": k, "clip": clip, "norm_p10": q[0], "norm_p50": q[1], "norm_p90": q[2],
                     "share_clipped": float(np.mean(norms > clip)), "signal": math.sqrt(max(est, 0.0)),
                     "signal_upper": math.sqrt(max(est + 2 * se, 0.0))})
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a finished dpldm.train run (its ldm/ and log.jsonl)")
    p.add_argument("--config", required=True, help="the run's config")
    p.add_argument("--set", action="append", default=[], help="the run's --set overrides")
    p.add_argument("--data", help="the run's --data, if it had one")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="the run's --runs")
    p.add_argument("--images", type=int, default=256, help="private training images, at least 3")
    p.add_argument("--multiplicity", type=int, nargs="+", default=[1], help="noise draws averaged per image")
    p.add_argument("--clip", type=float, nargs="+", help="C to clip at (default: the run's); several: each from the "
                   "same gradients")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.images < 3:
        raise SystemExit("--images must be at least 3")
    cfg = load_config(args.config, args.set)
    dp = run_settings(args.run)
    clips = args.clip or [dp["max_grad_norm"]]
    model, meta = load_ldm(args.run / "ldm", cfg)
    ae = default_autoencoder(argparse.Namespace(ldm=args.run / "ldm", runs=args.runs), cfg, meta)
    vae = load_autoencoder(ae, cfg)
    real = load_private(args.data or cfg["data"]["private"], cfg)
    idx = np.random.default_rng(args.seed).choice(len(real.train.labels), args.images, replace=False)
    z = encode_split(vae, real.train.images[idx], cfg)
    y = torch.as_tensor(real.train.labels[idx])
    t = cfg["train"]
    d = select_trainable(model, t["trainable"], t.get("ablation", 1), t.get("lora_rank", 8))
    rows = []
    for k in args.multiplicity:
        for row in signal(model, cfg, z, y, clips, k, args.seed):
            noise = dp["sigma"] * row["clip"] * math.sqrt(d) / dp["expected_batch_size"]
            rows.append({**row, "noise": noise, "d": d, "snr": row["signal"] / noise})
            print(f"k {k}, C {row['clip']:g}: per-sample norm p10/p50/p90 {row['norm_p10']:.3f}/"
                  f"{row['norm_p50']:.3f}/{row['norm_p90']:.3f}, {row['share_clipped']:.0%} above C; ||E clip g|| "
                  f"{row['signal']:.4g} (< {row['signal_upper']:.4g}); DP noise per step sigma C sqrt(d)/B "
                  f"{noise:.4g} (d {d:,}); ratio {row['signal'] / noise:.3f} (< {row['signal_upper'] / noise:.3f})",
                  flush=True)
    return rows


if __name__ == "__main__":
    main()
