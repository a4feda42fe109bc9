"""Whole DP-SGD step on CPU, four variants side by side per model (see step_variants.py).

    pytest benchmarks/test_bench_step_cpu.py --benchmark-disable            # CI smoke run, tiny sizes
    nice pytest benchmarks/test_bench_step_cpu.py --bench-size full \\
        --benchmark-json step_cpu.json && python -m benchmarks.report step_cpu.json

Issue 2's goal (reported by report.py, never asserted): on the full transformer stack, ours <= 1.3x the
non-private step time, >= 1.5x faster than Opacus ghost, peak memory <= 1.2x non-private.
"""

from __future__ import annotations

import pytest

from benchmarks.models import MODELS
from benchmarks.step_harness import run_step_benchmark
from benchmarks.step_variants import VARIANTS

# Full-size rounds: the transformer step is ~0.15-0.5 s here, the UNet step ~1-4 s.
FULL_ROUNDS = {"transformer": 15, "unet": 5, "ldm": 5}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model", MODELS)
def test_step_cpu(benchmark, model: str, variant: str, bench_size: str, bench_rounds, bench_memory: bool) -> None:
    run_step_benchmark(benchmark, model=model, variant=variant, device="cpu", size=bench_size,
                       rounds=bench_rounds(FULL_ROUNDS[model]), memory=bench_memory)
