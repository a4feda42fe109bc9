"""Per-op speed of the C++ CPU kernels (torch.ops.dpkernels) vs the plain-torch reference.

Groups are per op and shape; the clipped-sum groups also time the bare weight-gradient GEMM
(G^T A, what a non-private step computes) as the floor our fused kernel should reach.
Tiny shapes by default (CI: `pytest benchmarks/test_bench_ops.py --benchmark-disable`);
`--bench-size full` for [32, 64, 256] transformer shapes and a long-T one.
"""

from __future__ import annotations

import os

import pytest
import torch

from dpkernels import ops, reference

K = torch.ops.dpkernels
SHAPES = {  # name: (B, T, d, p)
    "tiny": {"tiny": (4, 16, 32, 48), "tiny-longT": (2, 130, 16, 8)},
    "full": {"attn[32,64,256]": (32, 64, 256, 256), "mlp[32,64,256->1024]": (32, 64, 256, 1024),
             "longT[4,4096,64]": (4, 4096, 64, 64)},
}
IMPLS = ("cpu", "torch")


@pytest.fixture(scope="module", autouse=True)
def _needs_extension():
    assert ops.HAS_EXTENSION, "build the extension first: pip install --no-build-isolation -e ."


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Linear-layer shapes for the chosen --bench-size (same rule as benchmarks/conftest.py)."""
    if "linear_shape" in metafunc.fixturenames:
        size = metafunc.config.getoption("--bench-size") or os.environ.get("DPK_BENCH_SIZE", "tiny")
        cases = SHAPES[size]
        metafunc.parametrize("linear_shape", list(cases.items()), ids=list(cases))


def impl(name: str, which: str):
    return getattr(K, name) if which == "cpu" else getattr(reference, name)


def run(benchmark, bench_rounds, fn, *args):
    fn(*args)  # warm-up (first-call allocation, thread pool start)
    return benchmark.pedantic(fn, args=args, rounds=bench_rounds(10), iterations=1)


@pytest.mark.parametrize("which", IMPLS)
@pytest.mark.parametrize("name", ["ghost_norm", "direct_norm"])
def test_linear_norm(benchmark, bench_rounds, linear_shape, name, which):
    label, (B, T, d, p) = linear_shape
    benchmark.group = f"{name} {label}"
    A, G = torch.randn(B, T, d), torch.randn(B, T, p)
    w, _ = run(benchmark, bench_rounds, impl(name, which), A, G, True)
    assert w.shape == (B,)


@pytest.mark.parametrize("which", IMPLS + ("gemm_floor",))
def test_clipped_sum(benchmark, bench_rounds, linear_shape, which):
    label, (B, T, d, p) = linear_shape
    benchmark.group = f"clipped_sum+noise {label}"
    A, G, c = torch.randn(B, T, d), torch.randn(B, T, p), torch.rand(B)
    if which == "gemm_floor":  # the non-private weight gradient: one GEMM, no clipping, no noise
        W = run(benchmark, bench_rounds, lambda a, g: torch.mm(g.reshape(-1, p).t(), a.reshape(-1, d)), A, G)
    else:
        W, _ = run(benchmark, bench_rounds, impl("clipped_sum", which), A, G, c, c, 1.0, 7, 0)
    assert W.shape == (p, d)


@pytest.mark.parametrize("which", IMPLS)
def test_clipped_sum_bf16(benchmark, bench_rounds, linear_shape, which):
    label, (B, T, d, p) = linear_shape
    benchmark.group = f"clipped_sum bf16 {label}"
    A, G, c = torch.randn(B, T, d).bfloat16(), torch.randn(B, T, p).bfloat16(), torch.rand(B)
    W, _ = run(benchmark, bench_rounds, impl("clipped_sum", which), A, G, c, None, 0.0, 7, 0)
    assert W.dtype == torch.float32


@pytest.mark.parametrize("which", IMPLS)
def test_norm_layer_ops(benchmark, bench_rounds, bench_size, which):
    B, C, S = (4, 8, 33) if bench_size == "tiny" else (32, 256, 64)
    benchmark.group = f"affine_grad_sample+sq_norms+clipped_rows_sum [{B},{C},{S}]"
    xhat, G, c = torch.randn(B, C, S), torch.randn(B, C, S), torch.rand(B)
    f = impl("affine_grad_sample", which)
    n, s = impl("sq_norms", which), impl("clipped_rows_sum", which)

    def step():
        g = f(xhat, G)
        return n(g), s(g, c, 1.0, 3, 0)

    run(benchmark, bench_rounds, step)


@pytest.mark.parametrize("which", IMPLS)
def test_embedding_ops(benchmark, bench_rounds, bench_size, which):
    B, T, D, V = (4, 3, 16, 10) if bench_size == "tiny" else (32, 16, 256, 1000)
    benchmark.group = f"embedding_norm+clipped_sum [{B},{T},{D}] V={V}"
    ids, G, c = torch.randint(0, V, (B, T)), torch.randn(B, T, D), torch.rand(B)
    norm, csum = impl("embedding_norm", which), impl("embedding_clipped_sum", which)
    run(benchmark, bench_rounds, lambda: (norm(ids, G), csum(ids, G, c, V, 1.0, 5, 0)))


@pytest.mark.parametrize("which", IMPLS)
def test_add_noise(benchmark, bench_rounds, bench_size, which):
    n = 10_000 if bench_size == "tiny" else 1_000_000
    benchmark.group = f"add_noise_ n={n}"
    x = torch.zeros(n)
    run(benchmark, bench_rounds, impl("add_noise_", which), x, 1.0, 9, 0)
