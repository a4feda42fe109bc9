"""Per-kernel GPU benchmarks: each op of each GPU backend vs the torch baseline and vs the roofline.

For every (op, shape) and backend ("triton"; "cuda" when the extension has CUDA kernels):
  - the kernel's time (pytest-benchmark, synchronised; and CUDA-event median in extra_info),
  - the torch baseline's time (the reference's einsum / bmm; noise by torch.randn on the GPU, since
    the reference draws its Philox stream on the CPU) and the speedup over it,
  - FLOPs and bytes the op must do at least, the achieved TFLOP/s and GB/s, and their fractions of
    the measured bf16 matmul rate (torch, 8192^3) and copy bandwidth (torch, 1 GiB), plus
    roofline_fraction = max(flops / matmul rate, bytes / copy bandwidth) / kernel time.
Inputs are bf16 (the training dtype on the GPU); outputs fp32.
    pytest -m gpu benchmarks/test_bench_kernels_gpu.py --bench-size full --benchmark-json kernels_gpu.json
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from dpkernels import backends, ops, reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPE = torch.bfloat16
ELT = 2  # bytes per bf16 element
BACKENDS = ["triton", "cuda"]


def cuda_time(fn: Callable[[], object], reps: int = 10) -> float:
    """Median seconds of fn over reps, by CUDA events, after one warm-up call (compile, autotune)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def matmul_rate(n: int = 8192) -> float:
    """bf16 matmul FLOP/s of torch (cuBLAS) on this GPU."""
    a = torch.randn(n, n, device="cuda", dtype=DTYPE)
    b = torch.randn(n, n, device="cuda", dtype=DTYPE)
    return 2 * n**3 / cuda_time(lambda: a @ b)


def copy_rate(n: int = 2**28) -> float:
    """Device-to-device copy bytes/s (read + write) of a 1 GiB fp32 tensor."""
    x = torch.empty(n, device="cuda", dtype=torch.float32)
    y = torch.empty_like(x)
    return 2 * n * 4 / cuda_time(lambda: y.copy_(x))


@pytest.fixture(scope="session")
def rates() -> dict[str, float]:
    """Measured peaks on this GPU, the denominators of the roofline fractions."""
    out = {"matmul_flops": matmul_rate(), "copy_bytes_per_s": copy_rate()}
    torch.cuda.empty_cache()
    return out


@dataclass
class Case:
    """One op at one shape: args builder, FLOPs and bytes it must do at least, and the torch baseline."""

    op: str
    shape: dict
    args: Callable[[], tuple]
    flops: float
    bytes: float
    baseline: Callable[..., object]


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=DTYPE)


def _baseline_clipped_sum(A, G, c, c_bias, std, seed, offset):
    w = torch.einsum("b,btp,btd->pd", c, G.float(), A.float())
    b = torch.einsum("b,btp->p", c_bias, G.float())
    return w + std * torch.randn_like(w), b + std * torch.randn_like(b)


def _baseline_rows_sum(X, c, std, seed, offset):
    out = torch.einsum("b,bn->n", c, X.float().reshape(X.shape[0], -1))
    return out + std * torch.randn_like(out)


def _baseline_add_noise(x, std, seed, offset):
    return x.add_(std * torch.randn_like(x))


def _baseline_embedding_sum(ids, G, c, V, std, seed, offset):
    out = std * torch.randn(V, G.shape[-1], device=G.device)
    return out.index_add_(0, ids.reshape(-1), (c[:, None, None] * G.float()).reshape(-1, G.shape[-1]))


def linear_case(op: str, B: int, T: int, d: int, p: int) -> Case:
    io = B * T * (d + p) * ELT

    def args():
        A, G = randn(B, T, d), randn(B, T, p)
        if op == "clipped_sum":
            c = torch.rand(B, device="cuda")
            return A, G, c, c, 1.0, 1234, 0
        return A, G, True

    if op == "ghost_norm":  # symmetric Grams: ~T^2 / 2 tile pairs of (d + p) MACs
        flops, baseline = B * T * T * (d + p), reference.ghost_norm
    elif op == "direct_norm":
        flops, baseline = 2 * B * T * d * p, reference.direct_norm
    else:
        flops, baseline = 2 * B * T * d * p, _baseline_clipped_sum
        io += p * d * 4
    return Case(op, {"B": B, "T": T, "d": d, "p": p}, args, flops, io, baseline)


def cases(size: str) -> list[Case]:
    full = size == "full"
    tb = (64, 256, 768) if full else (8, 64, 128)  # transformer stack [B, T, d]
    un = (256, 1024, 320) if full else (16, 256, 64)  # UNet 32x32 level: [B, H*W, C]
    B, T, d = tb
    out = [
        linear_case("ghost_norm", B, T, d, d),
        linear_case("ghost_norm", B, T, d, 4 * d),
        linear_case("direct_norm", un[0], un[1], un[2], un[2]),
        linear_case("direct_norm", B, T, d, d),
        linear_case("clipped_sum", B, T, d, d),
        linear_case("clipped_sum", B, T, d, 4 * d),
        linear_case("clipped_sum", un[0], un[1], un[2], un[2]),
    ]
    Bu, Tu, Cu = un
    n = Tu * Cu
    out += [
        Case("sq_norms", {"B": Bu, "N": n}, lambda: (randn(Bu, n),), 2 * Bu * n, Bu * n * ELT, reference.sq_norms),
        Case("clipped_rows_sum", {"B": Bu, "N": n}, lambda: (randn(Bu, n), torch.rand(Bu, device="cuda"), 1.0, 7, 0), 2 * Bu * n,
             Bu * n * ELT + n * 4, _baseline_rows_sum),
        Case("affine_grad_sample", {"B": Bu, "C": Cu, "S": Tu}, lambda: (randn(Bu, Cu, Tu), randn(Bu, Cu, Tu)),
             2 * Bu * n, 2 * Bu * n * ELT + Bu * Cu * 4, reference.affine_grad_sample),
        Case("add_noise_", {"N": 4 * d * d}, lambda: (torch.zeros(4 * d * d, device="cuda"), 1.0, 3, 0), 0,
             2 * 4 * d * d * 4, _baseline_add_noise),
    ]
    Be, Te, De, V = (256, 77, 768, 1000) if full else (16, 77, 128, 100)

    def ids():
        return torch.randint(0, V, (Be, Te), device="cuda")

    out += [
        Case("embedding_norm", {"B": Be, "T": Te, "D": De}, lambda: (ids(), randn(Be, Te, De)), Be * Te * Te * De,
             Be * Te * (De * ELT + 8), reference.embedding_norm),
        Case("embedding_clipped_sum", {"B": Be, "T": Te, "D": De, "V": V},
             lambda: (ids(), randn(Be, Te, De), torch.rand(Be, device="cuda"), V, 1.0, 5, 0), 2 * Be * Te * De,
             Be * Te * (De * ELT + 8) + 2 * V * De * 4, _baseline_embedding_sum),
    ]
    return out


CASE_NAMES = [f"{i}-{c.op}" for i, c in enumerate(cases("tiny"))]  # the same ops at every size; no CUDA here


@pytest.fixture(scope="module")
def all_cases(bench_size: str) -> list[Case]:
    return cases(bench_size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index", range(len(CASE_NAMES)), ids=CASE_NAMES)
def test_kernel(benchmark, all_cases, index: int, backend: str, rates: dict[str, float], bench_size: str,
                bench_rounds) -> None:
    case = all_cases[index]
    if backend == "cuda" and not ops.extension_has("cuda"):
        pytest.skip("the dpkernels extension was built without CUDA kernels")
    fn = backends.implementation(case.op, backend)
    args = case.args()

    def run():
        fn(*args)
        torch.cuda.synchronize()

    kernel_s = cuda_time(lambda: fn(*args))  # also compiles and autotunes before the timed rounds
    baseline_s = cuda_time(lambda: case.baseline(*args), reps=5)
    benchmark.group = f"kernels {case.op} ({bench_size})"
    roofline_s = max(case.flops / rates["matmul_flops"], case.bytes / rates["copy_bytes_per_s"])
    benchmark.extra_info.update(
        op=case.op, backend=backend, dtype=str(DTYPE).replace("torch.", ""), size=bench_size, **case.shape,
        kernel_ms=kernel_s * 1e3, baseline_ms=baseline_s * 1e3, speedup_vs_torch=baseline_s / kernel_s,
        flops=case.flops, bytes=case.bytes, achieved_tflops=case.flops / kernel_s / 1e12,
        achieved_gbps=case.bytes / kernel_s / 1e9,
        matmul_fraction=case.flops / kernel_s / rates["matmul_flops"],
        bandwidth_fraction=case.bytes / kernel_s / rates["copy_bytes_per_s"],
        roofline_fraction=roofline_s / kernel_s,
        measured_matmul_tflops=rates["matmul_flops"] / 1e12, measured_copy_gbps=rates["copy_bytes_per_s"] / 1e9,
    )
    benchmark.pedantic(run, rounds=bench_rounds(20), warmup_rounds=1, iterations=1)
