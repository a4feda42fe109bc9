"""`evaluate`: utility of composed samples, as dpldm.evaluate measures it (classifiers on the samples, tested on
the real private test split), with the same baselines.

Only the data of the shards the samples derive from (their lineage) is read: the baselines (public-only, DP-SGD,
and the non-private CNN) train on those shards' training examples alone, the DP-SGD ones at the largest epsilon
those shards spent. The test split is the run's held-out split, less the test rows that another shard listed
(manifest and folders keys: those rows are that shard's data; class and random keys split only the training data,
so their test split belongs to no shard). So eval.json derives from the samples' shards and nothing else: it lives
in the samples folder, under the same lineage, and is forgotten with any of them; a forgotten shard is never read
again. With --rights/--user, samples that derive from a shard the user may not access are refused.

    python -m dpldm.compartments evaluate --run runs/mnist/cdm-class2 --samples density-0_1
    python -m dpldm.compartments evaluate --run RUN --samples density-0 --rights rights.json --user alice
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from dpldm import data as data_mod
from dpldm import evaluate as evaluate_stage
from dpldm.baselines import DPTarget
from dpldm.common import load_public
from dpldm.compartments import registry
from dpldm.compartments.sample import RIGHTS_HELP
from dpldm.compartments.shards import run_data
from dpldm.compartments.train import new_shard_data, report_of


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dpldm.compartments evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="compartments run folder")
    p.add_argument("--samples", required=True, help="name of a samples/ folder of the run")
    p.add_argument("--rights", type=Path, help=RIGHTS_HELP)
    p.add_argument("--user", help="with --rights: evaluate on behalf of this user (refused unless every shard the "
                                  "samples derive from is theirs)")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--backend", default="auto", help="dpkernels backend of the DP-SGD baselines")
    p.add_argument("--seed", type=int, default=0)
    return p


def evaluation_data(reg: dict[str, Any], cfg: dict[str, Any], names: list[str]) -> data_mod.DataSet:
    """The real data an evaluation of samples derived from `names` may use: their shards' training examples, and
    the held-out test split less the rows other shards (forgotten ones included) listed.

    Args:
        reg: the run's registry.
        cfg: its config.
        names: the shards the samples derive from (trained, not forgotten).
    """
    private, keyed, _ = run_data(reg, cfg)  # forgotten shards too: only to know which test rows are theirs
    parts = [s.data(private).train for s in keyed if s.name in names]
    parts += [new_shard_data(reg["shards"][n]["data"], cfg).train for n in names if reg["shards"][n].get("data")]
    parts = [evaluate_stage.conform(p, cfg) for p in parts]  # added shards' images may come in another size
    train = data_mod.Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))
    test = private.test
    n_train = len(private.train.labels)
    rows = test.rows if test.rows is not None else np.arange(n_train, n_train + len(test.labels))
    theirs = [s.held_out_rows for s in keyed if s.name not in names and s.held_out_rows is not None]
    keep = ~np.isin(rows, np.concatenate(theirs)) if theirs else np.ones(len(rows), bool)
    if not keep.any():
        raise registry.RunError(f"every test example belongs to a shard other than {', '.join(names)}: there is "
                                "no real test data these samples may be evaluated on")
    test = data_mod.Split(test.images[keep], test.labels[keep], rows[keep])
    return data_mod.DataSet(train, test, private.num_classes, f"{private.source} [shards {', '.join(names)}]")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate samples/<args.samples> of args.run; returns eval.json's content.

    Args:
        args: parser() arguments.
    """
    reg, lineage = registry.load(args.run)
    folder = registry.samples_dir(args.run, args.samples, lineage)
    artifact = f"samples/{args.samples}"
    used = list(lineage["artifacts"][artifact]["trained_on"])
    unknown = [n for n in used if n not in registry.trained(reg)]
    if unknown:
        raise registry.RunError(f"{folder} derives from shards {', '.join(unknown)}, which this run no longer has "
                                "(or has not trained): delete it and sample again")
    if args.rights or args.user:
        if not (args.rights and args.user):
            raise registry.RunError("pass --rights FILE with --user NAME")
        allowed = registry.rights_shards(args.rights, args.user)
        outside = [n for n in used if n not in allowed]
        if outside:
            raise registry.RunError(f"samples {args.samples!r} derive from shards {', '.join(outside)}, which user "
                                    f"{args.user!r} may not access: evaluating them would use those shards' data")
    cfg = registry.config_of(reg)
    real = evaluation_data(reg, cfg, used)
    public = load_public(cfg) if cfg["data"].get("public") else None
    synthetic = data_mod.from_npz(folder / "samples.npz", cfg["data"]["num_classes"])
    spent = report_of(args.run)["epsilon_per_shard"]
    private_eps = [spent[n] for n in used if n in spent]  # public (--no-dp) shards spend nothing
    target = DPTarget(max(private_eps), reg["delta"], reg["accountant"]) if private_eps else None
    registry.record(lineage, artifact, used, "evaluate")  # the same shards: eval.json derives from nothing else
    registry.save(args.run, reg, lineage)
    return evaluate_stage.run(cfg, synthetic, real, public, folder, seed=args.seed,
                              baselines_on=not args.no_baselines, target=target, backend=args.backend)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return registry.cli(parser(), run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
