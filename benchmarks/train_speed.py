"""Speed of a `python -m dpldm.train` run, read off its log.jsonl (issue 21, item 3).

    python -m benchmarks.train_speed runs/fmnist/dp-attention-eps10.0/log.jsonl [--skip 3] [--gpu-mem-mib 1234]

The DP steps' rate is taken between the --skip-th logged step and the last one (the first steps carry
autotuning and allocator warm-up); examples/s is that rate times the expected (logical) batch size, and a
full run's DP training time is its total_steps at that rate.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def speed(log: Path, skip: int = 3) -> dict:
    """Steps/s, examples/s and the projected DP-training time of a full run, from one train log."""
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    info: dict = {}
    for r in records:
        info.update({k: v for k, v in r.items() if k in ("total_steps", "expected_batch_size", "sigma",
                                                         "sample_rate", "trainable_params")})
    steps = [r for r in records if "step" in r and "loss" in r]
    if len(steps) <= skip + 1:
        raise ValueError(f"{log}: {len(steps)} logged steps, need more than {skip + 1} to time them")
    first, last = steps[skip], steps[-1]
    rate = (last["step"] - first["step"]) / (last["time"] - first["time"])
    out = {"logged_steps": len(steps), "timed_steps": last["step"] - first["step"], "steps_per_s": rate, **info}
    if "expected_batch_size" in info:
        out["examples_per_s"] = rate * info["expected_batch_size"]
    if "total_steps" in info:
        out["full_run_dp_training_min"] = info["total_steps"] / rate / 60
    out["first_step_at_s"] = steps[0]["time"]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log", type=Path)
    ap.add_argument("--skip", type=int, default=3, help="logged steps left out of the timing (warm-up)")
    ap.add_argument("--gpu-mem-mib", type=float, help="peak GPU memory seen by nvidia-smi, to print beside")
    args = ap.parse_args(argv)
    s = speed(args.log, args.skip)
    if args.gpu_mem_mib is not None:
        s["gpu_mem_used_peak_mib"] = args.gpu_mem_mib
    print(json.dumps(s, indent=1))


if __name__ == "__main__":
    main()
