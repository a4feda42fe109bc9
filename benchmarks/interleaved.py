"""Step-time ratios measured round-robin: a cross-check of the pytest-benchmark run on a shared machine.

pytest-benchmark times the variants one after another, so a burst of load from another process during
one variant skews the ratios. Here every round runs one step of each variant back to back (order rotated
each round) and the ratio is taken within the round; the median over rounds of those ratios is robust
to load that drifts on a scale longer than one round. Process CPU time (all threads) is recorded too:
under contention it tracks the work done better than wall time, provided idle OpenMP threads sleep
instead of spinning (run with OMP_WAIT_POLICY=PASSIVE).
    OMP_WAIT_POLICY=PASSIVE nice python -m benchmarks.interleaved --model transformer --size full --rounds 15
Prints one JSON line per variant: median wall and CPU seconds, and median per-round ratios of each to
the non-private step and to ours.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from benchmarks.models import build
from benchmarks.step_variants import VARIANTS, make_step, missing_requirement


def run(model: str, size: str, rounds: int, device: str = "cpu") -> list[dict]:
    steps = {}
    for variant in VARIANTS:
        if missing_requirement(variant) is None:
            steps[variant] = make_step(variant, build(model, size, device))
    names = list(steps)
    for name in names:  # warm-up
        steps[name]()
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            w0, c0 = time.perf_counter(), time.process_time()
            steps[name]()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    out = []
    for name in names:
        row = {"model": model, "size": size, "variant": name, "rounds": rounds,
               "wall_s": statistics.median(wall[name]), "cpu_s": statistics.median(cpu[name])}
        for kind, t in (("wall", wall), ("cpu", cpu)):
            for ref in ("nonprivate", "ours"):
                if ref in t:
                    row[f"{kind}_ratio_to_{ref}"] = statistics.median(a / b for a, b in zip(t[name], t[ref]))
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="round-robin step timing of the four variants")
    parser.add_argument("--model", default="transformer")
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    for row in run(args.model, args.size, args.rounds, args.device):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
