"""Every autotune config of every autotuned Triton kernel vs the plain-torch reference, one at a time.

Autotuning picks the fastest config per shape on the user's GPU, so any config can be the one that
runs; the other GPU tests pin the first (DPK_TRITON_AUTOTUNE=0). Here each config is pinned in turn
(`pinned_config`) and the op checked: on a GPU (marked `gpu`) on ragged fp32 / bf16 shapes and on a
half-precision shape whose p and d are multiples of 8; on CPU under the interpreter (same GPU
configs, block sizes and masks, no warps or pipelining) on small ragged shapes, so the loop itself
runs in CI.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch

from dpkernels import reference

dtriton = pytest.importorskip("dpkernels.triton")
# the modules (the package's attributes clipped_sum etc. are the ops)
affine, clipped_sum, embedding, linear_norms, noise, rows = (
    importlib.import_module(f"dpkernels.triton.{m}")
    for m in ("affine", "clipped_sum", "embedding", "linear_norms", "noise", "rows"))


@contextmanager
def pinned_config(kernel, config) -> Iterator[None]:
    """Launch `kernel` (a triton Autotuner) with exactly `config` inside the block (any config, also under the
    interpreter or DPK_TRITON_AUTOTUNE=0): each config is checked against the reference, not just the fastest.
    An autotuner with a single config launches it without benchmarking (Triton 3.6 through 3.9)."""
    saved = kernel.configs
    kernel.configs = [config]
    try:
        yield
    finally:
        kernel.configs = saved


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# name -> (the autotuned kernel, every config it may be tuned to on a GPU)
KERNELS = {
    "clipped_sum": (clipped_sum._clipped_sum_kernel, clipped_sum.GEMM_CONFIGS),
    "ghost_norm": (linear_norms._ghost_norm_kernel, linear_norms.GHOST_CONFIGS),
    "direct_norm": (linear_norms._direct_norm_kernel, linear_norms.DIRECT_CONFIGS),
    "embedding_norm": (embedding._embedding_norm_kernel, embedding.NORM_CONFIGS),
    "affine_grad_sample": (affine._affine_kernel, affine.AFFINE_CONFIGS),
}
CASES = [pytest.param(name, i, id=f"{name}-cfg{i}") for name, (_, cfgs) in KERNELS.items() for i in range(len(cfgs))]
NORM_RTOL = 1e-4
# c_b G is rounded toward zero to the input dtype before the GEMM: relative error per term below its spacing
FOLD_REL = {torch.float32: 1e-5, torch.float16: 2.0**-10 + 1e-5, torch.bfloat16: 2.0**-7 + 1e-5}
NOISE_ATOL = 1e-5  # fp32 Philox + Box-Muller vs the float64 reference, per unit std


def randn(*shape: int, dtype: torch.dtype, seed: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def assert_rel(x: torch.Tensor, ref: torch.Tensor, rtol: float = NORM_RTOL) -> None:
    assert x.dtype == torch.float32 and x.shape == ref.shape
    scale = float(ref.abs().max().clamp(min=1))
    torch.testing.assert_close(x.double(), ref.double(), rtol=rtol, atol=rtol * scale)


def check_linear_norm(name: str, shape: tuple[int, int, int, int], dtype: torch.dtype, device: str) -> None:
    B, T, d, p = shape
    A, G = randn(B, T, d, dtype=dtype, seed=1, device=device), randn(B, T, p, dtype=dtype, seed=2, device=device)
    w, b = getattr(dtriton, name)(A, G, True)
    ref_w, ref_b = reference.direct_norm(A.double(), G.double(), True)
    assert_rel(w, ref_w)
    assert_rel(b, ref_b)


def check_clipped_sum(shape: tuple[int, int, int, int], dtype: torch.dtype, device: str) -> None:
    B, T, d, p = shape
    A, G = randn(B, T, d, dtype=dtype, seed=3, device=device), randn(B, T, p, dtype=dtype, seed=4, device=device)
    c = torch.rand(B, device=device) + 0.05
    cb = torch.rand(B, device=device) + 0.05
    std, seed, offset = 0.8, 2**40 + 17, 2**32 + 3
    ref_w, ref_b = reference.clipped_sum(A.double(), G.double(), c.double(), cb.double(), std, seed, offset)
    bound = FOLD_REL[dtype] * torch.einsum("btp,btd->pd", (c.double()[:, None, None] * G.double()).abs(),
                                           A.double().abs()) + std * NOISE_ATOL
    for splits in (None, 3):  # the default (one pass on CPU) and split-K: fp32 partials, then a reduce pass
        w, b = clipped_sum.clipped_sum_split(A, G, c, cb, std, seed, offset, splits=splits)
        assert w.shape == (p, d) and ((w.double() - ref_w).abs() <= bound).all()
        torch.testing.assert_close(b.double(), ref_b, rtol=1e-5, atol=std * NOISE_ATOL)


def check_embedding_norm(shape: tuple[int, int, int, int], dtype: torch.dtype, device: str) -> None:
    B, T, D, _ = shape
    ids = torch.randint(0, 7, (B, T), generator=torch.Generator().manual_seed(5)).to(device)  # repeated ids
    G = randn(B, T, D, dtype=dtype, seed=6, device=device)
    assert_rel(dtriton.embedding_norm(ids, G), reference.embedding_norm(ids, G.double()))


def check_affine(shape: tuple[int, int, int, int], dtype: torch.dtype, device: str) -> None:
    B, C, S = shape[0], shape[1] // 8 + 1, shape[2] * 11  # S past one 1024-wide chunk
    xhat, G = randn(B, C, S, dtype=dtype, seed=7, device=device), randn(B, C, S, dtype=dtype, seed=8, device=device)
    assert_rel(dtriton.affine_grad_sample(xhat, G), reference.affine_grad_sample(xhat.double(), G.double()))


CHECKS: dict[str, Callable[[tuple[int, int, int, int], torch.dtype, str], None]] = {
    "clipped_sum": check_clipped_sum,
    "ghost_norm": lambda shape, dtype, device: check_linear_norm("ghost_norm", shape, dtype, device),
    "direct_norm": lambda shape, dtype, device: check_linear_norm("direct_norm", shape, dtype, device),
    "embedding_norm": check_embedding_norm,
    "affine_grad_sample": check_affine,
}


def run_config(name: str, index: int, shape: tuple[int, int, int, int], dtype: torch.dtype, device: str) -> None:
    kernel, cfgs = KERNELS[name]
    with pinned_config(kernel, cfgs[index]):
        CHECKS[name](shape, dtype, device)
    assert kernel.best_config is cfgs[index]  # the pinned config is the one that ran


def test_every_autotuned_kernel_is_listed() -> None:
    import triton

    tuned = {obj for mod in (affine, clipped_sum, embedding, linear_norms, noise, rows) for obj in vars(mod).values()
             if isinstance(obj, triton.runtime.Autotuner)}
    assert tuned == {kernel for kernel, _ in KERNELS.values()}


# (B, T, d, p): T, d, p ragged against every block size (64 and 128 wide: two tiles or a partial one)
CPU_SHAPE = (2, 67, 133, 70)


@pytest.mark.skipif(not INTERPRETED, reason="interpreter tests run without CUDA; the GPU tests cover CUDA machines")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,index", CASES)
def test_config_matches_reference_interpreted(name: str, index: int, dtype: torch.dtype) -> None:
    run_config(name, index, CPU_SHAPE, dtype, "cpu")


# Ragged fp32 and bf16; fp16 with p and d multiples of 8 (vectorised half loads; bf16 loads the same
# 2-byte words, and tests/test_gpu_kernels.py runs this shape in bf16). Every case is a compile per config.
GPU_CASES = [((3, 77, 129, 200), torch.float32), ((3, 77, 129, 200), torch.bfloat16),
             ((4, 96, 256, 384), torch.float16)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape,dtype", GPU_CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("name,index", CASES)
def test_config_matches_reference_gpu(name: str, index: int, shape: tuple[int, int, int, int],
                                      dtype: torch.dtype) -> None:
    import triton

    try:
        run_config(name, index, shape, dtype, "cuda")
    except triton.runtime.errors.OutOfResources as e:  # the autotuner prunes such a config on this GPU
        pytest.skip(f"{name} config {index} does not fit this GPU ({e}); autotuning skips it here")
