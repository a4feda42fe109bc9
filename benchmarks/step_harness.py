"""The body of every step benchmark: build, time with pytest-benchmark, measure peak memory, record.

What lands in each benchmark's extra_info (benchmarks/report.py reads it):
  model, variant, device, shape, batch_size, loss (finite, checked), the peak-memory fields of
  benchmarks/peak_memory.py (peak_mem_bytes and friends), or oom=True where a variant ran out of memory,
  and aten_gflop: the FLOPs of one step in aten ops (torch.utils.flop_counter; our dpkernels ops are not
  counted), which shows where the work goes: a non-private step is ~3x its forward GEMMs, ours should be
  ~2x (forward + input gradients: autograd computes no weight gradients, our kernels do the weight side).
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.models import build
from benchmarks.peak_memory import measure_cuda, probe_cpu_subprocess
from benchmarks.step_variants import make_step, missing_requirement


def skip_if_unavailable(model: str, variant: str) -> None:
    if model == "unet" and importlib.util.find_spec("diffusers") is None:
        pytest.skip("diffusers is not installed")
    reason = missing_requirement(variant)
    if reason is not None:
        pytest.skip(f"{variant}: {reason}")


def run_step_benchmark(benchmark, *, model: str, variant: str, device: str, size: str, rounds: int,
                       memory: bool, memory_steps: int = 2, autocast: torch.dtype | None = None) -> None:
    skip_if_unavailable(model, variant)
    w = build(model, size, device)
    step = make_step(variant, w, autocast)
    precision = f", autocast {str(autocast).removeprefix('torch.')}" if autocast is not None else ""
    benchmark.group = f"step {device} {model} ({size}{precision})"
    benchmark.extra_info.update(model=model, variant=variant, device=device, size=size, shape=w.shape,
                                batch_size=w.batch_size, autocast=str(autocast) if autocast else None)

    if device == "cuda" and memory:
        try:
            benchmark.extra_info.update(measure_cuda(step, memory_steps))
        except torch.cuda.OutOfMemoryError as e:  # a result (Opacus hooks at full size), not a bug
            benchmark.extra_info["oom"] = True
            pytest.skip(f"{model}/{variant}: CUDA out of memory at {w.shape}: {str(e).splitlines()[0]}")

    loss = benchmark.pedantic(step, rounds=rounds, warmup_rounds=1, iterations=1)
    assert math.isfinite(loss), f"{model}/{variant}: non-finite loss {loss}"
    benchmark.extra_info["loss"] = loss
    with FlopCounterMode(display=False) as flops:
        step()
    benchmark.extra_info["aten_gflop"] = flops.get_total_flops() / 1e9

    if device == "cpu" and memory:
        del step, w  # the probe runs in its own process; free ours first
        benchmark.extra_info.update(probe_cpu_subprocess(model, variant, size, steps=memory_steps))
