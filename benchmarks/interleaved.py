"""Step-time ratios measured round-robin: a cross-check of the pytest-benchmark run on a shared machine.

pytest-benchmark times the variants one after another, so a burst of load from another process during
one variant skews the ratios. Here every round runs one step of each variant back to back (order rotated
each round) and the ratio is taken within the round; the median over rounds of those ratios is robust
to load that drifts on a scale longer than one round.
    nice python -m benchmarks.interleaved --model transformer --size full --rounds 15
Prints one JSON line per variant (median seconds, median ratio to non-private and to ours).
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
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    out = []
    for name in names:
        row = {"model": model, "size": size, "variant": name, "rounds": rounds,
               "median_s": statistics.median(times[name])}
        for ref in ("nonprivate", "ours"):
            if ref in times:
                row[f"median_ratio_to_{ref}"] = statistics.median(a / b for a, b in zip(times[name], times[ref]))
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
