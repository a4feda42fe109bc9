"""Steps or noise: which one limits a finished warm-up run's DP-SGD stage (issue 19 ablation). NOT PRIVATE.

Runs the same `dpldm.train` recipe again from the run's own warm-up release (<run>/warmup/release.npz, reused: no
new release is drawn) with the DP-SGD noise multiplier set to 0: the same steps, batches, clipping and learning rate,
without the Gaussian noise. The model it writes has no privacy guarantee whatsoever (epsilon is infinite): it is
for this comparison only, and its folder says so. Set beside the run's own figure (same sampling, same evaluation
CNN): the gap to it is what the noise costs; the gap from it to (b) is what the steps and the model leave.

    python benchmarks/noise_ablation.py RUN_DIR --config mnist-letters [--per-class 300] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dpldm import train, warmup
from dpldm.config import load_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a finished dpldm.train run with a warm-up release")
    p.add_argument("--config", required=True, help="the config the run was made with")
    p.add_argument("--set", action="append", default=[], help="the run's --set overrides")
    p.add_argument("--data", help="the run's --data, if it had one")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="the run's --runs")
    p.add_argument("--per-class", type=int, help="samples per class (default: the config's)")
    p.add_argument("--out", type=Path, help="default <run>/no-noise")
    args = p.parse_args()
    path = args.run / "warmup" / warmup.RELEASE_FILE
    if not path.is_file():
        raise SystemExit(f"{path}: no warm-up release in the run")
    release = warmup.Release.load(path)
    out = args.out or args.run / "no-noise"

    # the run's release instead of a new draw; sigma 0 instead of the calibrated one; epsilon is not defined
    train.warmup_stage.release = lambda *a, **k: release
    calibrate = train.calibrate

    def no_noise(opts: train.TrainOptions, n: int, prior: list) -> float:
        calibrate(opts, n, prior)  # its checks, and opts.delta
        return 0.0

    train.calibrate = no_noise
    from dpkernels import PrivacyEngine

    PrivacyEngine.get_epsilon = lambda self, delta: float("inf")
    cfg = load_config(args.config, args.set)
    opts = train.TrainOptions(config=args.config, set=args.set, out=out, fresh=True, no_baselines=True,
                              per_class=args.per_class, data=args.data, runs=args.runs)
    result, _ = train.run(cfg, opts)
    (out / "NOT-PRIVATE.txt").write_text("DP-SGD noise multiplier 0: this model has no privacy guarantee. An "
                                         "ablation (benchmarks/noise_ablation.py), never to be released.\n")
    print(json.dumps({k: v for k, v in result.items() if k.endswith("_acc")}, indent=1))


if __name__ == "__main__":
    main()
