"""Every Triton op and every CUDA-extension op vs the reference on a CUDA GPU, realistic ragged shapes.

Skipped cleanly without CUDA. The CUDA-extension cases fail when a GPU is visible but the extension
was built without CUDA kernels (DPK_ALLOW_NO_CUDA_KERNELS=1 skips them instead); the GPU check
script builds it with them. Ground truth is the float64 reference on the same GPU.
    pytest -m gpu tests/test_gpu_kernels.py
"""

from __future__ import annotations

import pytest
import torch

from dpkernels import ops, reference
from dpkernels.conventions import round_up4
from tests.conftest import require_cuda_kernels

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BACKENDS = ["triton", "cuda"]
HALF_AND_FP32 = [torch.float32, torch.float16, torch.bfloat16]
# (B, T, d, p): attention projections, a 1x1 conv over 32x32 tokens, a 2-D linear, a long thin one, and
# p, d multiples of 8 (16-byte rows in half precision: the CUDA kernels' vectorised tensor-core loads).
LINEAR_SHAPES = [(7, 77, 320, 963), (5, 1029, 129, 77), (33, 1, 1023, 1001), (3, 257, 769, 769), (4, 96, 256, 384)]
ALIGNED = 4  # the index of the multiples-of-8 shape, run in fp16 too
# Products of half inputs are exact in fp32; the rest is fp32 accumulation in some order.
NORM_RTOL = {torch.float32: 1e-4, torch.float16: 1e-4, torch.bfloat16: 1e-4, torch.float64: 1e-10}
# c_b G may be rounded to the input dtype before the GEMM (toward zero in Triton): relative error per
# term below the dtype's spacing, plus fp32 accumulation.
FOLD_REL = {torch.float32: 1e-5, torch.float16: 2.0**-10 + 1e-5, torch.bfloat16: 2.0**-7 + 1e-5,
            torch.float64: 1e-12}
SUM_REL = 1e-5  # fp32 sums: error relative to the sum of the terms' magnitudes
NOISE_ATOL = 1e-5  # fp32 Philox + Box-Muller vs the float64 reference, per unit std


def impl(backend: str, name: str):
    if backend == "triton":
        import dpkernels.triton as dtriton

        return getattr(dtriton, name)
    require_cuda_kernels()
    return getattr(torch.ops.dpkernels, name)


def dtypes_for(backend: str) -> list[torch.dtype]:
    return HALF_AND_FP32 + ([torch.float64] if backend == "cuda" else [])


def cases():
    return [(b, dt) for b in BACKENDS for dt in dtypes_for(b)]


def linear_cases():
    """bf16 (the GPU training dtype) at every shape, the other dtypes at two, fp16 also at the aligned one:
    every compile costs time."""
    return [(b, dt, shape) for b in BACKENDS for dt in dtypes_for(b) for i, shape in enumerate(LINEAR_SHAPES)
            if dt == torch.bfloat16 or i in (0, 2) or (dt == torch.float16 and i == ALIGNED)]


def randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=g, device="cuda").to(dtype)


def noise(shape: tuple[int, ...], seed: int, offset: int) -> torch.Tensor:
    return reference.philox_normal(shape, seed, offset, torch.float64, "cuda")


def assert_rel(x: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    assert x.is_cuda and x.shape == ref.shape
    scale = float(ref.abs().max().clamp(min=1))
    torch.testing.assert_close(x.double(), ref.double(), rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("backend,dtype,shape", linear_cases())
@pytest.mark.parametrize("name", ["ghost_norm", "direct_norm"])
def test_linear_norms(name: str, backend: str, dtype: torch.dtype, shape) -> None:
    B, T, d, p = shape
    A, G = randn(B, T, d, dtype=dtype, seed=1), randn(B, T, p, dtype=dtype, seed=2)
    ref_w, ref_b = reference.direct_norm(A.double(), G.double(), True)
    w, b = impl(backend, name)(A, G, True)
    out_dt = torch.float64 if dtype == torch.float64 else torch.float32
    assert w.dtype == out_dt and b.dtype == out_dt
    assert_rel(w, ref_w, NORM_RTOL[dtype])
    assert_rel(b, ref_b, NORM_RTOL[dtype])
    if T == 1:  # the same as 2-D inputs; and no bias
        w2, b2 = impl(backend, name)(A[:, 0], G[:, 0], False)
        assert_rel(w2, ref_w, NORM_RTOL[dtype])
        assert b2.numel() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_direct_norm_of_a_layer_with_more_tiles_than_grid_axis_y(backend: str) -> None:
    # 16448 x 16448: 257^2 = 66049 tiles of 64 x 64, past the 65535 limit of grid axes y and z
    A, G = randn(3, 2, 16448, dtype=torch.float32, seed=14), randn(3, 2, 16448, dtype=torch.float32, seed=15)
    w, b = impl(backend, "direct_norm")(A, G, True)
    ref_w, ref_b = reference.ghost_norm(A.double(), G.double(), True)  # Gram form: no 16448^2 tensor
    assert_rel(w, ref_w, 1e-4)
    assert_rel(b, ref_b, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["ghost_norm", "direct_norm"])
def test_linear_norms_of_more_samples_than_grid_axis_y(name: str, backend: str) -> None:
    A, G = randn(70_000, 3, 5, dtype=torch.float32, seed=16), randn(70_000, 3, 4, dtype=torch.float32, seed=17)
    w, b = impl(backend, name)(A, G, True)
    ref_w, ref_b = reference.ghost_norm(A.double(), G.double(), True)
    assert_rel(w, ref_w, 1e-4)
    assert_rel(b, ref_b, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["ghost_norm", "direct_norm"])
def test_linear_norms_empty_batch(name: str, backend: str) -> None:
    w, b = impl(backend, name)(torch.zeros(0, 5, 7, device="cuda"), torch.zeros(0, 5, 9, device="cuda"), True)
    assert w.shape == (0,) and b.shape == (0,)


@pytest.mark.parametrize("backend,dtype,shape", linear_cases())
def test_clipped_sum(backend: str, dtype: torch.dtype, shape) -> None:
    B, T, d, p = shape
    A, G = randn(B, T, d, dtype=dtype, seed=3), randn(B, T, p, dtype=dtype, seed=4)
    c = torch.rand(B, device="cuda") + 0.05
    cb = torch.rand(B, device="cuda") + 0.05
    std, seed, offset = 0.8, 2**40 + 17, 2**32 + 3
    w, b = impl(backend, "clipped_sum")(A, G, c, cb, std, seed, offset)
    ref_w, ref_b = reference.clipped_sum(A.double(), G.double(), c.double(), cb.double(), std, seed, offset)
    A64, cG64 = A.double(), c.double()[:, None, None] * G.double()
    bound = FOLD_REL[dtype] * torch.einsum("btp,btd->pd", cG64.abs(), A64.abs()) + std * NOISE_ATOL
    assert w.shape == (p, d) and ((w.double() - ref_w).abs() <= bound).all()
    # the bias is a column sum of c_b G in fp32 (never rounded to the input dtype): its summation error is relative
    # to the sum of |terms|, not to the result (B*T = 5145 terms can cancel to a small value)
    bias_bound = SUM_REL * (cb.double()[:, None, None] * G.double()).abs().sum((0, 1)) + std * NOISE_ATOL
    assert b.shape == (p,) and ((b.double() - ref_b).abs() <= bias_bound).all()


@pytest.mark.parametrize("shape", [LINEAR_SHAPES[0], LINEAR_SHAPES[3]])
def test_triton_fp32_tf32x3_dots(shape, monkeypatch: pytest.MonkeyPatch) -> None:
    """DPK_TRITON_FP32_DOT=tf32x3 (tensor cores, operands split in two TF32 parts): per-product relative error
    ~2^-21, so the fp32 tolerances still hold, against the float64 reference."""
    import dpkernels.triton as dtriton

    monkeypatch.setenv("DPK_TRITON_FP32_DOT", "tf32x3")
    B, T, d, p = shape
    A, G = randn(B, T, d, dtype=torch.float32, seed=21), randn(B, T, p, dtype=torch.float32, seed=22)
    ref_w, ref_b = reference.direct_norm(A.double(), G.double(), True)
    for name in ("ghost_norm", "direct_norm"):
        w, b = getattr(dtriton, name)(A, G, True)
        assert_rel(w, ref_w, NORM_RTOL[torch.float32])
        assert_rel(b, ref_b, NORM_RTOL[torch.float32])
    c = torch.rand(B, device="cuda") + 0.05
    w, _ = dtriton.clipped_sum(A, G, c, None, 0.0, 0, 0)
    ref = torch.einsum("b,btp,btd->pd", c.double(), G.double(), A.double())
    bound = FOLD_REL[torch.float32] * torch.einsum("btp,btd->pd", (c.double()[:, None, None] * G.double()).abs(),
                                                   A.double().abs())
    assert ((w.double() - ref).abs() <= bound).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_clipped_sum_empty_batch_is_pure_noise(backend: str) -> None:
    z = torch.zeros(0, 3, 130, device="cuda")
    w, b = impl(backend, "clipped_sum")(z, torch.zeros(0, 3, 70, device="cuda"), torch.zeros(0, device="cuda"),
                                        torch.zeros(0, device="cuda"), 1.3, 9, 5)
    torch.testing.assert_close(w.double(), 1.3 * noise((70, 130), 9, 5), rtol=0, atol=1.3 * NOISE_ATOL)
    torch.testing.assert_close(b.double(), 1.3 * noise((70,), 9, 5 + round_up4(70 * 130)), rtol=0,
                               atol=1.3 * NOISE_ATOL)


@pytest.mark.parametrize("backend,dtype", cases())
def test_rows_ops(backend: str, dtype: torch.dtype) -> None:
    X = randn(45, 3, 77, 129, dtype=dtype, seed=5)
    assert_rel(impl(backend, "sq_norms")(X), reference.sq_norms(X.double()), NORM_RTOL[dtype])
    c = torch.rand(45, device="cuda")
    got = impl(backend, "clipped_rows_sum")(X, c, 0.6, 12, 7)
    want = reference.clipped_rows_sum(X.double(), c.double(), 0.6, 12, 7)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    xhat, G = randn(45, 320, 1031, dtype=dtype, seed=6), randn(45, 320, 1031, dtype=dtype, seed=7)
    assert_rel(impl(backend, "affine_grad_sample")(xhat, G), reference.affine_grad_sample(xhat.double(), G.double()),
               NORM_RTOL[dtype])


@pytest.mark.parametrize("backend,dtype", cases())
def test_add_noise(backend: str, dtype: torch.dtype) -> None:
    x = randn(1001, 997, dtype=dtype, seed=8)
    want = x.double() + 2.0 * noise(tuple(x.shape), 2**62 + 5, 2**35 + 1)
    got = impl(backend, "add_noise_")(x, 2.0, 2**62 + 5, 2**35 + 1)
    atol = 2.0 * NOISE_ATOL + (0 if dtype in (torch.float32, torch.float64) else float(want.abs().max()) * 2.0**-7)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=atol)


@pytest.mark.parametrize("backend,dtype", cases())
@pytest.mark.parametrize("B,T,D,V", [(64, 77, 768, 1000), (256, 1, 512, 11), (9, 300, 129, 50)])
def test_embedding_ops(backend: str, dtype: torch.dtype, B: int, T: int, D: int, V: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(9)
    ids = torch.randint(0, V, (B, T), generator=g, device="cuda")
    G = randn(B, T, D, dtype=dtype, seed=10)
    assert_rel(impl(backend, "embedding_norm")(ids, G), reference.embedding_norm(ids, G.double()), NORM_RTOL[dtype])
    c = torch.rand(B, device="cuda")
    got = impl(backend, "embedding_clipped_sum")(ids, G, c, V, 0.5, 3, 11)
    want = reference.embedding_clipped_sum(ids, G.double(), c.double(), V, 0.5, 3, 11)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_triton_refuses_float64() -> None:
    import dpkernels.triton as dtriton

    with pytest.raises(TypeError, match="float64"):
        dtriton.ghost_norm(torch.zeros(2, 3, 4, device="cuda", dtype=torch.float64),
                           torch.zeros(2, 3, 5, device="cuda", dtype=torch.float64), True)


def test_auto_backend_is_cached_per_shape_not_per_batch() -> None:
    from dpkernels import autobackend

    A, G = randn(9, 64, 256, dtype=torch.bfloat16, seed=11), randn(9, 64, 384, dtype=torch.bfloat16, seed=12)
    first = autobackend.fastest("ghost_norm", A, (A, G, True))
    assert first in ("cuda", "triton")
    n = len(autobackend._cache)
    A2, G2 = A[:5], G[:5]  # another Poisson batch size: same key, no re-timing
    assert autobackend.fastest("ghost_norm", A2, (A2, G2, True)) == first
    assert len(autobackend._cache) == n
    w, _ = ops.ghost_norm(A, G, True, backend="auto")
    assert_rel(w, reference.ghost_norm(A.double(), G.double(), True)[0], 1e-4)
    # float64 has no Triton kernels: auto must not pick Triton
    x = randn(4, 10, dtype=torch.float64, seed=13)
    assert autobackend.fastest("sq_norms", x) in ("cuda", "torch")
