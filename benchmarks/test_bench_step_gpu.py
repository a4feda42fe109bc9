"""Whole DP-SGD step on a CUDA GPU, the variants side by side per model (step_variants.GPU_VARIANTS: ours
with backend auto, triton and cuda).

Full sizes (issues 3 and 21): transformer stack [B,T,d] = [64,256,768], 4 blocks, every parameter trainable;
diffusers UNet2DConditionModel, 32x32x4 latents, batch 256, transformer blocks + class embedding trainable;
the fmnist preset's LDM (8x8x3 latents) with DP-LDM's trainable set at its physical batch of 4096 rows.
    pytest -m gpu benchmarks/test_bench_step_gpu.py --bench-size full --benchmark-json step_gpu.json
Peak memory: torch.cuda.max_memory_allocated after reset_peak_memory_stats (peak_memory.measure_cuda).
The goals (benchmarks/report.py GOALS: reported, never asserted).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.models import MODELS
from benchmarks.step_harness import run_step_benchmark
from benchmarks.step_variants import GPU_VARIANTS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# Full-size rounds, bounded so benchmarks/gpu_check.sh fits its time budget.
FULL_ROUNDS = {"transformer": 20, "unet": 10, "ldm": 20}


@pytest.mark.parametrize("variant", GPU_VARIANTS)
@pytest.mark.parametrize("model", MODELS)
def test_step_gpu(benchmark, model: str, variant: str, bench_size: str, bench_rounds, bench_memory: bool,
                  bench_autocast) -> None:
    run_step_benchmark(benchmark, model=model, variant=variant, device="cuda", size=bench_size,
                       rounds=bench_rounds(FULL_ROUNDS[model]), memory=bench_memory, autocast=bench_autocast)


@pytest.fixture(autouse=True)
def _release_gpu_memory():
    """Each variant starts from an empty device: the previous one's model and hooks are garbage by now."""
    yield
    import gc

    gc.collect()
    torch.cuda.empty_cache()
