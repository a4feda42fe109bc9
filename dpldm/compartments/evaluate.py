"""`evaluate`: utility of composed samples, as dpldm.evaluate measures it (classifiers on the samples, tested on
the real private test split), with the same baselines; the DP-SGD baselines spend the run's overall epsilon.

    python -m dpldm.compartments evaluate --run runs/mnist/cdm-class2 --samples density-0_1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dpldm import data as data_mod
from dpldm import evaluate as evaluate_stage
from dpldm.baselines import DPTarget
from dpldm.common import load_public
from dpldm.compartments import registry
from dpldm.compartments.shards import run_data
from dpldm.compartments.train import report_of


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dpldm.compartments evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="compartments run folder")
    p.add_argument("--samples", required=True, help="name of a samples/ folder of the run")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--backend", default="auto", help="dpkernels backend of the DP-SGD baselines")
    p.add_argument("--seed", type=int, default=0)
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    reg, _ = registry.load(args.run)
    folder = registry.samples_dir(args.run, args.samples)
    cfg = registry.config_of(reg)
    private = run_data(reg, cfg)[0]
    public = load_public(cfg) if cfg["data"].get("public") else None
    synthetic = data_mod.from_npz(folder / "samples.npz", cfg["data"]["num_classes"])
    report = report_of(args.run)
    target = DPTarget(report["epsilon"], reg["delta"], reg["accountant"])
    return evaluate_stage.run(cfg, synthetic, private, public, folder, seed=args.seed,
                              baselines_on=not args.no_baselines, target=target, backend=args.backend)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return registry.cli(parser(), run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
