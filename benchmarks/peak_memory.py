"""Peak memory of one DP-step variant, measured honestly on CPU and on CUDA.

CPU (no allocator statistics in torch): each variant runs in a FRESH subprocess
(`python -m benchmarks.peak_memory --model M --variant V --size S`), so no variant inherits another's
cached memory. glibc's mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_) so every tensor above 64 KiB is
its own mapping and is returned to the OS when freed: the resident set then follows live allocations.
    1. build the workload and wrap it for the variant (model, optimizer, batch: the baseline);
    2. one warm-up step: persistent = growth of anonymous RSS (RssAnon) it leaves behind (state an engine
       keeps between steps); RssAnon, not VmRSS, so library code paged in on first use is not counted;
    3. reset the kernel's high-water mark (write 5 to /proc/self/clear_refs) and run `steps` more steps:
       transient = VmHWM - VmRSS before them (everything live at once inside a step, from any allocator:
       torch, the extension's C++, BLAS workspaces);
    peak = persistent + transient: memory a step needs above the model and batch themselves.
CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, over a warm-up step and `steps`
steps, minus memory_allocated at the baseline (peak) and as is (peak_total, includes weights and batch).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

MMAP_THRESHOLD = 64 * 1024
REPO_ROOT = Path(__file__).resolve().parent.parent


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1))


def _reset_high_water_mark() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def measure_cpu(model: str, variant: str, size: str, steps: int) -> dict:
    from benchmarks.models import build
    from benchmarks.step_variants import make_step

    w = build(model, size, "cpu")
    step = make_step(variant, w)
    gc.collect()
    anon0 = _status_kib("RssAnon")
    step()  # warm-up: lazy init, thread pools, code paged in
    gc.collect()
    persistent = max(0, _status_kib("RssAnon") - anon0)
    rss1 = _status_kib("VmRSS")
    _reset_high_water_mark()
    for _ in range(steps):
        step()
    transient = max(0, _status_kib("VmHWM") - rss1)
    kib = 1024
    return {
        "method": "cpu-rss-subprocess",
        "peak_mem_bytes": (persistent + transient) * kib,
        "persistent_bytes": persistent * kib,
        "transient_bytes": transient * kib,
        "baseline_anon_bytes": anon0 * kib,
        "threads": torch.get_num_threads(),
    }


def measure_cuda(step, steps: int) -> dict:
    """In-process CUDA peak of `step` (already built); the caching allocator makes this exact."""
    torch.cuda.synchronize()
    gc.collect()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(1 + steps):
        step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"method": "cuda-max-memory-allocated", "peak_mem_bytes": peak - base, "peak_total_bytes": peak}


def probe_cpu_subprocess(model: str, variant: str, size: str, steps: int = 2, timeout: float = 900) -> dict:
    """Run `measure_cpu` in a fresh interpreter; raise with its stderr if it fails."""
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    env["MALLOC_TRIM_THRESHOLD_"] = str(MMAP_THRESHOLD)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "benchmarks.peak_memory", "--model", model, "--variant", variant,
           "--size", size, "--steps", str(steps)]
    proc = subprocess.run(cmd, check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {' '.join(cmd[2:])} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    print(json.dumps(measure_cpu(args.model, args.variant, args.size, args.steps)))


if __name__ == "__main__":
    main()
