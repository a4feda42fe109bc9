"""Which part of a warm-up run limits its synthetic data (issue 19): the same release, read three ways.

Given a finished `dpldm.train` run that had a `warmup` section (its <run>/warmup/release.npz, a DP output), this
spends no further privacy and prints, each as the evaluation CNN's accuracy on the real test split:

    gaussian   a CNN trained on images drawn from the release's per-class Gaussians (the warm-up's data)
    warmed     the base LDM after the warm-up only (no DP-SGD step), sampled as the run samples
    (the run's own result.json has the third: warm-up + DP-SGD)

    python benchmarks/warmup_ablation.py RUN_DIR [--config fmnist-cpu] [--set KEY=VALUE] [--per-class 1000] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dpldm import data as data_mod
from dpldm import evaluate, warmup
from dpldm import sample as sample_stage
from dpldm.base_models import verified_base
from dpldm.common import images_tensor, load_private
from dpldm.config import load_config
from dpldm.diffusion import encode_latents
from dpldm.models import load_autoencoder, load_ldm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--config", default="fmnist-cpu")
    p.add_argument("--per-class", type=int, help="samples per class (default: the config's sample.per_class)")
    p.add_argument("--out", type=Path, help="default <run>/ablation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["gaussian", "warmed"], help="one of the two (the other's row is read from "
                   "its eval.json when an earlier call wrote it)")
    p.add_argument("--set", action="append", default=[], help="the run's --set overrides")
    args = p.parse_args()
    cfg = load_config(args.config, args.set)
    target = evaluate.run_target(args.run)  # picks the release's sigma where the config has a table by epsilon
    settings = warmup.Settings.of(cfg, target.epsilon if target else None)
    rel = warmup.Release.load(args.run / "warmup" / warmup.RELEASE_FILE)
    if settings is None or not rel.matches(settings, rel.shape, len(rel.counts)):
        raise SystemExit(f"{args.run}: its release was not made with config {args.config}'s warmup section")
    out = args.out or args.run / "ablation"
    per_class = args.per_class or cfg["sample"]["per_class"]
    real = load_private(cfg["data"]["private"], cfg)
    rows = {}

    if args.only != "warmed":
        t0 = time.time()
        images, labels = rel.sample(per_class, np.random.default_rng(args.seed + 1))
        res = evaluate.run(cfg, data_mod.Split(images, labels), real, None, out / "gaussian", use_sklearn=False,
                           seed=args.seed, baselines_on=False)
        rows["gaussian"] = {"cnn_test_acc": res["cnn_test_acc"], "s": time.time() - t0}
    if args.only != "gaussian":
        rows["warmed"] = warmed(args, cfg, settings, rel, real, out, per_class)
    for name in ("gaussian", "warmed"):
        if name not in rows and (out / name / "eval.json").is_file():
            rows[name] = {"cnn_test_acc": json.loads((out / name / "eval.json").read_text())["cnn_test_acc"]}

    run_result = json.loads((args.run / "result.json").read_text())
    rows["warmed + DP-SGD (the run)"] = {"cnn_test_acc": run_result.get("cnn_test_acc")}
    (out / "ablation.json").write_text(json.dumps(rows, indent=1))
    for name, row in rows.items():
        print(f"{name:28s} CNN test accuracy {row['cnn_test_acc']}")


def warmed(args: argparse.Namespace, cfg: dict, settings: warmup.Settings, rel: warmup.Release,
           real: data_mod.DataSet, out: Path, per_class: int) -> dict:
    """The base after the warm-up alone (the run's recipe, this seed), sampled and evaluated as the run does."""
    t0 = time.time()
    base = verified_base(cfg["base"])
    # a run that adapted its autoencoder (warmup.autoencoder_steps) samples through its own
    vae = load_autoencoder(args.run / "autoencoder" if (args.run / "autoencoder").is_dir() else base / "autoencoder",
                           cfg)
    model, _ = load_ldm(base / "ldm", cfg)
    torch.manual_seed(args.seed)
    warm_images, warm_labels = rel.sample(settings.per_class, np.random.default_rng(args.seed))  # as train.warm_up
    z = encode_latents(vae, images_tensor(data_mod.Split(warm_images, warm_labels), cfg))
    warmup.train_on_samples(model, z, torch.from_numpy(warm_labels), cfg, settings, args.seed, "cpu")
    model.eval()
    npz, grid = sample_stage.run(cfg, model, vae, out / "warmed", per_class, seed=args.seed)
    res = evaluate.run(cfg, data_mod.from_npz(npz, real.num_classes), real, None, out / "warmed",
                       use_sklearn=False, seed=args.seed, baselines_on=False)
    return {"cnn_test_acc": res["cnn_test_acc"], "grid": str(grid), "s": time.time() - t0}


if __name__ == "__main__":
    main()
