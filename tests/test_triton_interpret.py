"""Every Triton kernel vs the plain-torch reference under TRITON_INTERPRET=1 on CPU tensors.

tests/conftest.py sets TRITON_INTERPRET=1 when there is no CUDA, before the kernels are defined.
On a CUDA machine this file is skipped: tests/test_gpu_kernels.py runs the same checks on the GPU.
Shapes are small, ragged (not multiples of the 16-wide interpreter blocks) and drawn fresh from a
seeded generator per case; the interpreter is slow, so each case is a few kernel launches.
"""

from __future__ import annotations

import os

import pytest
import torch

from dpkernels import ops, reference
from dpkernels.conventions import round_up4

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="interpreter tests run without CUDA; the GPU tests cover CUDA machines")

dtriton = pytest.importorskip("dpkernels.triton")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Half inputs are exact in fp32 and products accumulate in fp32, so norms are as tight as fp32.
NORM_RTOL = 2e-5
# Noise is drawn in fp32 (reference: float64); |difference| <= 2.2e-6 seen over 600k draws.
NOISE_ATOL = 1e-5
# c_b G is rounded toward zero to the input dtype before the tensor-core GEMM: relative error per term
# below the dtype's spacing (2^-7 bf16, 2^-10 fp16); fp32 keeps fp32 rounding.
FOLD_ULP = {torch.float32: 2.0**-22, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def ragged_shape(case: int) -> tuple[int, int, int, int]:
    g = torch.Generator().manual_seed(1000 + case)
    B = int(torch.randint(1, 4, (1,), generator=g))
    T, d, p = (int(v) for v in torch.randint(1, 38, (3,), generator=g))
    return B, min(T, 19), d, p


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def rel_close(x: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    assert x.dtype == torch.float32 and x.shape == ref.shape
    torch.testing.assert_close(x.double(), ref.double(), rtol=rtol, atol=rtol * float(ref.abs().max().clamp(min=1)))


def noise(shape: tuple[int, ...], seed: int, offset: int) -> torch.Tensor:
    return reference.philox_normal(shape, seed, offset, torch.float64, "cpu")


@pytest.mark.parametrize("seed,offset", [(0, 0), (123, 3), (2**40 + 77, 2**33 + 5), (2**63 - 1, 2**32 - 2)])
def test_noise_stream_matches_reference(seed: int, offset: int) -> None:
    # one case with 66k draws (enough to meet u near 0 and near 1), the others small: the interpreter is slow
    x = torch.zeros(3, 37, 601) if seed == 2**40 + 77 else torch.zeros(3, 37, 11)
    dtriton.add_noise_(x, 1.0, seed, offset)
    torch.testing.assert_close(x.double(), noise(x.shape, seed, offset), rtol=0, atol=NOISE_ATOL)


def test_add_noise_non_contiguous_and_half() -> None:
    base = randn(9, 14)
    x = base.t()  # a transposed view: noise follows the view's row-major order
    want = x.double() + 0.5 * noise(tuple(x.shape), 5, 1)
    assert dtriton.add_noise_(x, 0.5, 5, 1) is x
    torch.testing.assert_close(x.double(), want, rtol=0, atol=NOISE_ATOL)
    h = randn(5, 7, dtype=torch.bfloat16)
    want_h = (h.double() + 0.5 * noise((5, 7), 2, 9)).to(torch.bfloat16)
    torch.testing.assert_close(dtriton.add_noise_(h, 0.5, 2, 9), want_h, rtol=2**-7, atol=NOISE_ATOL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(3))
def test_linear_norms(dtype: torch.dtype, case: int) -> None:
    B, T, d, p = ragged_shape(case)
    A, G = randn(B, T, d, dtype=dtype, seed=case), randn(B, T, p, dtype=dtype, seed=case + 50)
    ref_w, ref_b = reference.ghost_norm(A, G, True)
    for op in (dtriton.ghost_norm, dtriton.direct_norm):
        w, b = op(A, G, True)
        rel_close(w, ref_w, NORM_RTOL)
        rel_close(b, ref_b, NORM_RTOL)


def test_linear_norms_2d_no_bias_long_t_and_empty() -> None:
    A, G = randn(3, 21), randn(3, 40, seed=1)  # 2-D: T = 1
    for op in (dtriton.ghost_norm, dtriton.direct_norm):
        w, b = op(A, G, False)
        rel_close(w, reference.direct_norm(A, G, False)[0], NORM_RTOL)
        assert b.numel() == 0
    A, G = randn(1, 53, 5, seed=2), randn(1, 53, 3, seed=3)  # several row tiles: off-diagonal symmetry
    rel_close(dtriton.ghost_norm(A, G, True)[0], reference.ghost_norm(A, G, True)[0], NORM_RTOL)
    w, b = dtriton.ghost_norm(randn(0, 4, 5), randn(0, 4, 6), True)
    assert w.shape == (0,) and b.shape == (0,)


def rtz(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round fp32 x toward zero to dtype (what the kernel does to c_b G for half inputs)."""
    if dtype == torch.float32:
        return x
    r = x.to(dtype)
    grew = r.float().abs() > x.abs()
    return torch.where(grew, torch.nextafter(r, torch.zeros_like(r)), r).float()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,splits", [(0, None), (1, 3), (2, None)])
def test_clipped_sum(dtype: torch.dtype, case: int, splits: int | None) -> None:
    from dpkernels.triton.clipped_sum import clipped_sum_split

    B, T, d, p = ragged_shape(case)
    A, G = randn(B, T, d, dtype=dtype, seed=case), randn(B, T, p, dtype=dtype, seed=case + 50)
    c, cb = torch.rand(B) + 0.1, torch.rand(B) + 0.1
    std, seed, offset = 0.7, 99 + case, 5 + case
    w, b = clipped_sum_split(A, G, c, cb, std, seed, offset, splits=splits)
    # bias: fp32 sums of the exact inputs
    ref_b = reference.clipped_sum(A, G, c, cb, std, seed, offset)[1]
    torch.testing.assert_close(b.double(), ref_b.double(), rtol=1e-5, atol=NOISE_ATOL)
    # weight: exactly the reference GEMM on the rounded-toward-zero c_b G ...
    G32, A32 = G.float(), A.float()
    folded = rtz(c[:, None, None] * G32, dtype)
    want = torch.einsum("btp,btd->pd", folded.double(), A32.double()) + std * noise((p, d), seed, offset)
    torch.testing.assert_close(w.double(), want, rtol=1e-5, atol=1e-5)
    # ... which is within the rounding bound of the exact clipped sum
    exact = reference.clipped_sum(A.double(), G.double(), c.double(), cb.double(), std, seed, offset)[0]
    bound = FOLD_ULP[dtype] * torch.einsum("btp,btd->pd", (c[:, None, None] * G32).abs().double(), A32.abs().double())
    assert ((w.double() - exact).abs() <= bound + 1e-5).all()


def test_clipped_sum_no_bias_no_noise_and_empty_batch() -> None:
    A, G, c = randn(2, 7, 18), randn(2, 7, 17, seed=1), torch.rand(2)
    w, b = dtriton.clipped_sum(A, G, c, None, 0.0, 1, 0)
    torch.testing.assert_close(w, reference.clipped_sum(A, G, c, None, 0.0, 1, 0)[0], rtol=1e-5, atol=1e-5)
    assert b.numel() == 0
    w, b = dtriton.clipped_sum(randn(0, 7, 18), randn(0, 7, 17), torch.zeros(0), torch.zeros(0), 2.0, 4, 6)
    torch.testing.assert_close(w.double(), 2.0 * noise((17, 18), 4, 6), rtol=0, atol=2 * NOISE_ATOL)
    torch.testing.assert_close(b.double(), 2.0 * noise((17,), 4, 6 + round_up4(17 * 18)),
                               rtol=0, atol=2 * NOISE_ATOL)
    A0, c = torch.zeros(2, 3, 0), torch.rand(2)  # d = 0: no weight, but the bias is still summed
    b = dtriton.clipped_sum(A0, G[:, :3], c, c, 0.5, 3, 4)[1]
    torch.testing.assert_close(b.double(), reference.clipped_sum(A0, G[:, :3], c, c, 0.5, 3, 4)[1].double(),
                               rtol=1e-5, atol=NOISE_ATOL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_ops(dtype: torch.dtype) -> None:
    X = randn(3, 5, 9, 2, dtype=dtype)
    rel_close(dtriton.sq_norms(X), reference.sq_norms(X), NORM_RTOL)
    c = torch.rand(3)
    want = reference.clipped_rows_sum(X.double(), c.double(), 0.3, 8, 2)
    torch.testing.assert_close(dtriton.clipped_rows_sum(X, c, 0.3, 8, 2).double(), want, rtol=1e-5, atol=NOISE_ATOL)
    xhat, G = randn(3, 6, 29, dtype=dtype, seed=1), randn(3, 6, 29, dtype=dtype, seed=2)
    rel_close(dtriton.affine_grad_sample(xhat, G), reference.affine_grad_sample(xhat, G), NORM_RTOL)


def test_rows_ops_empty_batch() -> None:
    assert dtriton.sq_norms(torch.zeros(0, 4)).shape == (0,)
    out = dtriton.clipped_rows_sum(torch.zeros(0, 4, 3), torch.zeros(0), 1.5, 3, 1)
    torch.testing.assert_close(out.double(), 1.5 * noise((4, 3), 3, 1), rtol=0, atol=2 * NOISE_ATOL)
    assert dtriton.affine_grad_sample(torch.zeros(0, 3, 5), torch.zeros(0, 3, 5)).shape == (0, 3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_ops(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(7)
    B, T, D, V = 3, 19, 21, 6  # V < T: repeated ids in every sample
    ids = torch.randint(0, V, (B, T), generator=g)
    G = randn(B, T, D, dtype=dtype, seed=3)
    rel_close(dtriton.embedding_norm(ids, G), reference.embedding_norm(ids, G), NORM_RTOL)
    c = torch.rand(B, generator=g)
    want = reference.embedding_clipped_sum(ids, G.double(), c.double(), V + 2, 0.4, 11, 3)
    got = dtriton.embedding_clipped_sum(ids, G, c, V + 2, 0.4, 11, 3)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=NOISE_ATOL)


def test_embedding_one_id_per_sample_and_empty_batch() -> None:
    ids, G = torch.tensor([4, 1, 4]), randn(3, 10)  # a class embedding: ids [B], G [B, D]
    rel_close(dtriton.embedding_norm(ids, G), reference.embedding_norm(ids, G), NORM_RTOL)
    out = dtriton.embedding_clipped_sum(torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2, 5), torch.zeros(0),
                                        4, 1.0, 5, 0)
    torch.testing.assert_close(out.double(), noise((4, 5), 5, 0), rtol=0, atol=NOISE_ATOL)
    assert dtriton.embedding_norm(torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2, 5)).shape == (0,)


def test_float64_is_refused_clearly() -> None:
    A = torch.zeros(2, 3, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        dtriton.ghost_norm(A, A, True)
    with pytest.raises(TypeError, match="float64"):
        dtriton.clipped_sum(A, A, torch.ones(2), None, 0.0, 0, 0)
    with pytest.raises(TypeError, match="float64"):
        dtriton.add_noise_(A, 1.0, 0, 0)


def test_ops_dispatch_to_triton() -> None:
    A, G = randn(2, 5, 17), randn(2, 5, 19, seed=1)
    w, _ = ops.ghost_norm(A, G, True, backend="triton")
    rel_close(w, reference.ghost_norm(A, G, True)[0], NORM_RTOL)
    w, _ = ops.linear_norm(A, G, strategy="direct", backend="triton")
    rel_close(w, reference.direct_norm(A, G, True)[0], NORM_RTOL)
    c = torch.rand(2)
    w, b = ops.clipped_sum(A, G, c, c, noise_std=0.5, seed=3, offset=8, backend="triton")
    want_w, want_b = reference.clipped_sum(A, G, c, c, 0.5, 3, 8)
    torch.testing.assert_close(w, want_w, rtol=1e-5, atol=NOISE_ATOL)
    torch.testing.assert_close(b, want_b, rtol=1e-5, atol=NOISE_ATOL)


def test_autobackend_key_ignores_batch_and_per_step_scalars() -> None:
    from dpkernels.autobackend import _key

    A, G, c = randn(5, 3, 4), randn(5, 3, 6), torch.ones(5)
    k1 = _key("clipped_sum", (A, G, c, None, 1.0, 7, 0))
    k2 = _key("clipped_sum", (A[:2], G[:2], c[:2], None, 2.0, 8, 96))
    assert k1 == k2
    assert k1 != _key("clipped_sum", (A, G, c, c, 1.0, 7, 0))  # with a bias: another kernel variant
    assert k1 != _key("clipped_sum", (A.half(), G.half(), c, None, 1.0, 7, 0))


def test_fp32_dot_precision_is_checked_at_each_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """DPK_TRITON_FP32_DOT picks the fp32 dot (ieee or tf32x3, measured on a GPU); plain tf32 (~1e-3 relative,
    enough to move clipping factors) or a typo is refused at the launch, never silently replaced."""
    A, G = torch.randn(3, 9, 5), torch.randn(3, 9, 7)
    ref = reference.ghost_norm(A.double(), G.double(), True)[0]
    for value in ("ieee", "tf32x3"):  # the interpreter computes both in fp32: this checks the plumbing
        monkeypatch.setenv("DPK_TRITON_FP32_DOT", value)
        torch.testing.assert_close(dtriton.ghost_norm(A, G, True)[0].double(), ref, rtol=1e-5, atol=0)
    for bad in ("tf32", "IEEE", ""):
        monkeypatch.setenv("DPK_TRITON_FP32_DOT", bad)
        for op in (lambda: dtriton.ghost_norm(A, G, True), lambda: dtriton.direct_norm(A, G, True),
                   lambda: dtriton.clipped_sum(A, G, torch.ones(3), None, 0.0, 0, 0),
                   lambda: dtriton.embedding_norm(torch.zeros(3, 9, dtype=torch.long), G)):
            with pytest.raises(ValueError, match="DPK_TRITON_FP32_DOT"):
                op()
