"""Where a DP step's GPU time goes: torch.profiler over a few steps of one workload, ours beside non-private.

    python -m benchmarks.gpu_profile --model transformer --variants nonprivate ours   # full size, on the GPU
    python -m benchmarks.gpu_profile --model ldm --device cpu --size tiny             # a smoke run

For each variant: --warmup untimed steps (autotuning, allocator), then --steps profiled steps; prints the
--top operators by device time (self), the step's wall time, and the number of kernel launches per step;
--trace writes a Chrome trace per variant beside it.
"""

from __future__ import annotations

import argparse
import time

from torch.profiler import ProfilerActivity, profile

from benchmarks.models import MODELS, build
from benchmarks.step_variants import GPU_VARIANTS, make_step


def profile_variant(model: str, variant: str, size: str, device: str, warmup: int, steps: int, top: int,
                    trace: str | None) -> str:
    w = build(model, size, device)
    step = make_step(variant, w)
    for _ in range(warmup):
        step()
    cuda = device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    wall = (time.perf_counter() - t0) / steps
    if trace:
        prof.export_chrome_trace(f"{trace}_{model}_{variant}.json")
    events = prof.key_averages()
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"))
    head = (f"== {model} ({w.shape}) / {variant}: {wall * 1e3:.2f} ms per step (profiled, {steps} steps), "
            f"{launches / steps:.0f} kernel launches per step")
    return head + "\n" + events.table(sort_by=sort, row_limit=top, max_name_column_width=60)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=MODELS, default="transformer")
    ap.add_argument("--variants", nargs="+", choices=GPU_VARIANTS, default=["nonprivate", "ours"])
    ap.add_argument("--size", default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--trace", help="path prefix for Chrome traces")
    args = ap.parse_args(argv)
    for variant in args.variants:
        print(profile_variant(args.model, variant, args.size, args.device, args.warmup, args.steps, args.top,
                              args.trace), flush=True)


if __name__ == "__main__":
    main()
