"""`forget`: drop a shard. Removes its compartment and every artifact trained on its data (samples composed with
it, logs describing it), records the event in lineage.json, and checks that no file left in the run folder was
trained on the shard. Nothing is retrained: compartments are trained in isolation and the density rule trains
nothing shared, so the other compartments are exactly what they would be had the shard never existed. A run with
a router trains it again on the remaining shards (the only thing rebuilt; it spends the router's budget again on
their examples, which the accounting adds).

    python -m dpldm.compartments forget --run runs/mnist/cdm-class2 --shard 1
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from dpldm.compartments import registry
from dpldm.compartments.train import fit_router, shard_data
from dpldm.runlog import RunLog


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dpldm.compartments forget", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="compartments run folder")
    p.add_argument("--shard", required=True, help="the shard to forget")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.time()
    run_dir = Path(args.run)
    reg, lineage = registry.load(run_dir)
    registry.check_shards(reg, [args.shard])
    doomed = [f for f, a in lineage["artifacts"].items() if args.shard in a["trained_on"]]
    for folder in doomed:
        path = run_dir / folder
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        del lineage["artifacts"][folder]
    reg["shards"].pop(args.shard)
    reg["forgotten"].append(args.shard)
    wall = time.time() - t0
    lineage["events"].append({"event": "forget", "shard": args.shard, "removed": doomed, "time": registry.now(),
                              "wall_s": wall})
    registry.save(run_dir, reg, lineage)
    rebuilt_s = 0.0
    if reg.get("router") and reg["shards"]:  # the router saw the shard: trained again without it
        t1 = time.time()
        cfg = registry.config_of(reg)
        log = RunLog(run_dir / "logs" / f"forget-{args.shard}", "compartments-forget")
        registry.record(lineage, f"logs/forget-{args.shard}", list(reg["shards"]), "forget")
        fit_router(cfg, run_dir, reg, lineage, shard_data(reg, cfg), log)
        registry.save(run_dir, reg, lineage)
        rebuilt_s = time.time() - t1
    left = [f for f, a in lineage["artifacts"].items() if args.shard in a["trained_on"]]
    stray = registry.unaccounted_files(run_dir, lineage)
    if left or stray:  # cannot happen unless the folder was edited by hand: say so rather than claim success
        raise registry.RunError(f"after forgetting {args.shard}: artifacts still trained on it {left}, files with "
                                f"no lineage {stray[:5]}")
    print(f"forgot shard {args.shard}: removed {', '.join(doomed)} in {wall:.2f} s"
          + (f", router trained again in {rebuilt_s:.1f} s" if rebuilt_s else "")
          + f"; shards left: {', '.join(reg['shards']) or 'none'}")
    return {"shard": args.shard, "removed": doomed, "remove_s": wall, "rebuild_s": rebuilt_s,
            "wall_s": wall + rebuilt_s, "shards": list(reg["shards"])}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return registry.cli(parser(), run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
