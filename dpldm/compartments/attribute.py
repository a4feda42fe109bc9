"""`attribute`: which compartments each composed sample came from.

Reads samples/<name>/samples.npz (the weights w_i of every sampling step, per sample), prints per class the
mean weight of each shard and the share of samples whose final weight picks it, writes attribution.json and
redraws attribution.png (mean w_i against the sampling step, one panel per class).

    python -m dpldm.compartments attribute --run runs/mnist/cdm-class2 --samples density-0_1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from dpldm.compartments import registry
from dpldm.compartments.sample import attribution_plot


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dpldm.compartments attribute", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="compartments run folder")
    p.add_argument("--samples", required=True, help="name of a samples/ folder of the run")
    return p


def summary(weights: np.ndarray, labels: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Per class: mean w_i over steps and samples, and the share of samples whose final w picks shard i."""
    out = {}
    for c in np.unique(labels):
        w = weights[:, labels == c]
        picked = w[-1].argmax(1)
        out[str(c)] = {"mean_weight": dict(zip(names, w.mean((0, 1)).round(4).tolist(), strict=True)),
                       "final_pick": {n: float((picked == i).mean()) for i, n in enumerate(names)}}
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    _, lineage = registry.load(args.run)
    folder = registry.samples_dir(args.run, args.samples, lineage)
    try:
        with np.load(folder / "samples.npz", allow_pickle=False) as z:
            weights, labels, names = z["weights"].astype(np.float32), z["labels"], [str(n) for n in z["shards"]]
    except Exception as e:  # zip errors, truncated files, missing arrays
        raise registry.RunError(f"{folder / 'samples.npz'}: unreadable or not written by `sample` "
                                f"({type(e).__name__}: {e}): sample again with --overwrite") from e
    result = summary(weights, labels, names)
    (folder / "attribution.json").write_text(json.dumps(result, indent=1))
    attribution_plot(weights, labels, names, folder / "attribution.png")
    for c, r in result.items():
        print(f"class {c}: " + ", ".join(f"shard {n} mean w {r['mean_weight'][n]:.3f} picked {r['final_pick'][n]:.0%}"
                                         for n in names))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return registry.cli(parser(), run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
