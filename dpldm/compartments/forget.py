"""`forget`: drop a shard. Removes its compartment and every artifact trained on its data (samples composed with
it, their attribution and evaluation, logs describing it, and, in a run interrupted while the shard trained, its
private work folder: the checkpoint with the noise seeds, temporary folders of killed writes), each with the
temporary siblings an interrupted write left; records the event in lineage.json, and checks that no file left in
the run folder was trained on the shard. A shard not trained yet can be forgotten too. Nothing is retrained:
compartments are trained in isolation and the density rule trains nothing shared, so no other compartment
depends on any example of the shard. They do depend on its size: the run's batch sizes, sampling rate, delta and
sigma were set from the number of examples of all shards, the forgotten one's included (they are what a run over the
other shards with those settings trains, not necessarily what a new run on them would choose). A complete run with a
router trains it again on the remaining shards (the only thing rebuilt; it spends the router's budget again on their examples, which the
accounting adds); an unfinished run trains it when resumed.

    python -m dpldm.compartments forget --run runs/mnist/cdm-class2 --shard 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from dpldm.compartments import registry
from dpldm.compartments.store import CompartmentError, check_base
from dpldm.compartments.train import fit_router, shard_data
from dpldm.runlog import RunLog


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dpldm.compartments forget", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="compartments run folder")
    p.add_argument("--shard", required=True, help="the shard to forget")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Forget args.shard in args.run; returns what was removed and the timings.

    Args:
        args: parser() arguments.
    """
    t0 = time.time()
    run_dir = Path(args.run)
    reg, lineage = registry.load(run_dir)
    registry.check_shards(reg, [args.shard], trained_only=False)
    doomed = [f for f, a in lineage["artifacts"].items() if args.shard in a["trained_on"]]
    for folder in doomed:
        registry.remove_artifact(run_dir, lineage, folder)
    if (run_dir / "work").is_dir() and not any((run_dir / "work").iterdir()):
        (run_dir / "work").rmdir()
    reg["shards"].pop(args.shard)
    reg["forgotten"].append(args.shard)
    wall = time.time() - t0
    lineage["events"].append({"event": "forget", "shard": args.shard, "removed": doomed, "time": registry.now(),
                              "wall_s": wall})
    registry.save(run_dir, reg, lineage)
    rebuilt_s = 0.0
    if registry.router_pending(reg) and not registry.pending(reg):  # the router saw the shard: trained again
        t1 = time.time()
        try:
            check_base(reg["base"])  # it encodes the shards' images with the base's autoencoder
        except CompartmentError as e:
            raise registry.RunError(f"shard {args.shard} is forgotten ({', '.join(doomed)} removed), but the router "
                                    f"cannot be trained again: {e}") from e
        cfg = registry.config_of(reg)
        log = RunLog(run_dir / "logs" / f"forget-{args.shard}", "compartments-forget")
        registry.record(lineage, f"logs/forget-{args.shard}", registry.trained(reg), "forget")
        fit_router(cfg, run_dir, reg, lineage, shard_data(reg, cfg), log)
        registry.save(run_dir, reg, lineage)
        rebuilt_s = time.time() - t1
    left = [f for f, a in lineage["artifacts"].items() if args.shard in a["trained_on"]]
    stray = registry.unaccounted_files(run_dir, lineage)
    if left or stray:  # only a folder edited by hand gets here: say so rather than claim success
        raise registry.RunError(f"shard {args.shard} is forgotten ({', '.join(doomed) or 'nothing'} removed), but "
                                f"artifacts still name it {left} and {len(stray)} file(s) have no lineage, so they "
                                f"may derive from any shard: {stray[:5]}. Check and delete them by hand")
    print(f"forgot shard {args.shard}: removed {', '.join(doomed)} in {wall:.2f} s"
          + (f", router trained again in {rebuilt_s:.1f} s" if rebuilt_s else "")
          + f"; shards left: {', '.join(reg['shards']) or 'none'}")
    return {"shard": args.shard, "removed": doomed, "remove_s": wall, "rebuild_s": rebuilt_s,
            "wall_s": wall + rebuilt_s, "shards": list(reg["shards"])}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return registry.cli(parser(), run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
