"""The warm-up release's settings, chosen on a PROXY data set (issue 19, item 4): never on the private one.

For each (sigma, frequencies, clip) given, a Gaussian release (dpldm.warmup.release) of the proxy's training split,
images drawn from its per-class Gaussians, and the config's evaluation CNN trained on them and read on the proxy's
test split; beside it, what the release costs: its epsilon alone and the DP-SGD noise multiplier it leaves the
config's DP-SGD stage at each target epsilon (the accountant's composition; null where the release alone spends more).
The proxy is read without privacy: it stands for data that is public to the experimenter, not for the private set.

    python benchmarks/warmup_release_choice.py --config fmnist-cpu --proxy mnist --sigma 5 3 2
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from dpldm import calibration, evaluate, warmup
from dpldm import data as data_mod
from dpldm.common import private_classes
from dpldm.config import load_config
from dpldm.train import default_delta


def costs(settings: warmup.Settings, cfg: dict, n: int, targets: list[float]) -> dict[str, float | None]:
    """The release's epsilon alone and, per target epsilon, the DP-SGD sigma left after it.

    Args:
        settings: the warm-up settings (their sigma).
        cfg: the config (its train section: batch size, epochs).
        n: the private set's size the DP-SGD stage would see (delta: dpldm.train's default for it, PRV).
        targets: the target epsilons.

    Returns:
        {"release_epsilon": ..., "dpsgd_sigma_at_<eps>": sigma or None where unreachable}.
    """
    t = cfg["train"]
    delta, accountant = default_delta(n), "prv"
    out: dict[str, float | None] = {
        "release_epsilon": calibration.composed_epsilon(settings.history(), delta, accountant)}
    for eps in targets:
        try:
            out[f"dpsgd_sigma_at_{eps:g}"] = calibration.noise_multiplier(
                eps, delta, n, t["batch_size"], t["epochs"], accountant, quiet=True, prior=settings.history())
        except ValueError:
            out[f"dpsgd_sigma_at_{eps:g}"] = None
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    """The command line (module docstring); returns the rows it printed."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the preset whose warm-up is chosen (its CNN, shapes, DP-SGD)")
    p.add_argument("--proxy", required=True, help="the proxy data set (a dpldm.data name), NOT the private one")
    p.add_argument("--sigma", type=float, nargs="+", help="release noise multipliers (default: the config's)")
    p.add_argument("--frequencies", type=int, nargs="+", help="default: the config's")
    p.add_argument("--clip", type=float, nargs="+", help="default: the config's")
    p.add_argument("--per-class", type=int, help="Gaussian samples per class (default: the warm-up's)")
    p.add_argument("--targets", type=float, nargs="+", default=[10.0, 1.0], help="target epsilons for the costs")
    p.add_argument("--n", type=int, help="the private training set's size, for the costs (default: the proxy's)")
    p.add_argument("--set", action="append", default=[], help="config overrides, KEY=VALUE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/warmup-release-choice"))
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.set)
    base = warmup.Settings.of(cfg)
    if base is None:
        raise SystemExit(f"config {args.config} has no warmup section")
    if args.proxy == cfg["data"]["private"]:
        raise SystemExit(f"--proxy {args.proxy} is the config's private data set: choose on another one")
    d = cfg["data"]
    k = private_classes(cfg)  # the proxy stands in for the private set: its label count
    proxy = data_mod.load(args.proxy, d["channels"], k, d["image_size"])
    per_class = args.per_class or base.per_class
    rows = []
    for sigma in args.sigma or [base.sigma]:
        for freq in args.frequencies or [base.frequencies]:
            for clip in args.clip or [base.clip]:
                s = replace(base, sigma=sigma, frequencies=freq, clip=clip)
                t0 = time.time()
                rng = np.random.default_rng(args.seed)  # a proxy experiment: reproducible noise is what is wanted
                rel = warmup.release(proxy.train.images, proxy.train.labels, k, s, rng)
                images, labels = rel.sample(per_class, rng)
                name = f"sigma{sigma:g}-f{freq}-R{clip:g}"
                res = evaluate.run(cfg, data_mod.Split(images, labels), proxy, None, args.out / name,
                                   use_sklearn=False, seed=args.seed, baselines_on=False)
                row = {"sigma": sigma, "frequencies": freq, "clip": clip, "cnn_test_acc": res["cnn_test_acc"],
                       **costs(s, cfg, args.n or len(proxy.train.labels), args.targets), "s": round(time.time() - t0)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rows.json").write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
