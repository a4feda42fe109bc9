"""CUDA C++ kernels (csrc/cuda) on a GPU: the corners tests/test_gpu_kernels.py does not reach.

Float64 exactness of the tiling (many Gram tiles, ragged edges), the noise stream at unaligned
offsets, the grid-stride loop over samples beyond gridDim.y, non-contiguous and mixed-dtype inputs.
Skipped cleanly without CUDA; fails when a GPU is visible but the extension has no CUDA kernels
(DPK_ALLOW_NO_CUDA_KERNELS=1 skips instead).
    pytest -m gpu tests/test_gpu_cuda_ops.py
"""

from __future__ import annotations

import pytest
import torch

from dpkernels import reference
from tests.conftest import require_cuda_kernels

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def needs_cuda_kernels() -> None:
    require_cuda_kernels()


def randn(*shape: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=g, device="cuda", dtype=torch.float64).to(dtype)


def assert_close(x: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    assert x.shape == ref.shape and x.dtype == ref.dtype, (x.shape, ref.shape, x.dtype, ref.dtype)
    scale = float(ref.abs().max().clamp(min=1e-30))
    err = float((x - ref).abs().max())
    assert err <= rtol * scale, f"max abs err {err:.3e} vs scale {scale:.3e}"


@pytest.mark.parametrize("B,T,d,p", [(3, 200, 70, 129), (2, 64, 64, 64), (4, 65, 1, 3), (2, 2, 300, 2)])
def test_float64_norms_match_reference_tightly(B: int, T: int, d: int, p: int) -> None:
    # T = 200 -> 4 x 4 Gram tiles (off-diagonal ones counted twice), ragged in every dimension.
    A, G = randn(B, T, d, seed=1), randn(B, T, p, seed=2)
    ref_w, ref_b = reference.direct_norm(A, G, True)
    for name in ("ghost_norm", "direct_norm"):
        w, b = getattr(torch.ops.dpkernels, name)(A, G, True)
        assert_close(w, ref_w, 1e-11)
        assert_close(b, ref_b, 1e-11)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,T,d,p", [(5, 130, 97, 45), (4, 96, 256, 384)])
def test_tensor_core_norms_on_half_inputs(dtype: torch.dtype, B: int, T: int, d: int, p: int) -> None:
    # Products of half inputs are exact in fp32; only the fp32 accumulation order differs. d, p multiples
    # of 8 take the 16-byte vectorised tile loads, ragged ones the scalar loads.
    A, G = randn(B, T, d, dtype=dtype, seed=3), randn(B, T, p, dtype=dtype, seed=4)
    ref, _ = reference.ghost_norm(A.double(), G.double(), False)
    for name in ("ghost_norm", "direct_norm"):
        w, _ = getattr(torch.ops.dpkernels, name)(A, G, False)
        assert w.dtype == torch.float32
        assert_close(w.double(), ref, 1e-4)


@pytest.mark.parametrize("offset", [0, 1, 3, 4096 + 2])
def test_clipped_sum_noise_is_the_contract_stream(offset: int) -> None:
    # A = 0: the weight is pure noise, float64 end to end, so it must match to rounding.
    B, T, d, p = 3, 5, 7, 6
    A, G = torch.zeros(B, T, d, device="cuda", dtype=torch.float64), randn(B, T, p, seed=5)
    c = torch.rand(B, device="cuda", dtype=torch.float64)
    seed, std = 2**62 + 12345, 0.75
    w, b = torch.ops.dpkernels.clipped_sum(A, G, c, c, std, seed, offset)
    assert_close(w, std * reference.philox_normal((p, d), seed, offset, torch.float64, "cuda"), 1e-13)
    ref_b = reference.clipped_sum(A, G, c, c, std, seed, offset)[1]
    assert_close(b, ref_b, 1e-12)


def test_add_noise_non_contiguous_follows_row_major_order() -> None:
    base = torch.zeros(6, 10, device="cuda", dtype=torch.float64)
    x = base.t()  # [10, 6], not contiguous
    out = torch.ops.dpkernels.add_noise_(x, 2.0, 7, 3)
    assert out.data_ptr() == base.data_ptr()
    assert_close(x, 2.0 * reference.philox_normal((10, 6), 7, 3, torch.float64, "cuda"), 1e-13)


def test_batches_beyond_grid_limit() -> None:
    # B > 65535 samples: the kernels loop over samples past gridDim.y.
    B = 70_000
    A, G = randn(B, 3, 5, dtype=torch.float32, seed=6), randn(B, 3, 4, dtype=torch.float32, seed=7)
    ref_w, ref_b = reference.ghost_norm(A.double(), G.double(), True)
    for name in ("ghost_norm", "direct_norm"):
        w, b = getattr(torch.ops.dpkernels, name)(A, G, True)
        assert torch.allclose(w.double(), ref_w, rtol=1e-5, atol=1e-6)
        assert torch.allclose(b.double(), ref_b, rtol=1e-5, atol=1e-6)


def test_non_contiguous_and_mixed_dtype_inputs() -> None:
    A = randn(4, 33, 9, seed=8).transpose(1, 2)  # [4, 9, 33] view
    G = randn(4, 9, 5, dtype=torch.float32, seed=9)
    for name in ("ghost_norm", "direct_norm"):
        w, _ = getattr(torch.ops.dpkernels, name)(A, G, False)
        ref, _ = getattr(reference, name)(A, G, False)
        assert_close(w, ref, 1e-10)


def test_embedding_int32_ids_and_repeats() -> None:
    ids = torch.tensor([[1, 1, 3, 1], [0, 2, 2, 2]], device="cuda", dtype=torch.int32)
    G = randn(2, 4, 37, seed=10)
    assert_close(torch.ops.dpkernels.embedding_norm(ids, G), reference.embedding_norm(ids.long(), G), 1e-12)
    c = torch.tensor([0.5, 1.0], device="cuda", dtype=torch.float64)
    got = torch.ops.dpkernels.embedding_clipped_sum(ids, G, c, 5, 0.3, 11, 1)
    assert_close(got, reference.embedding_clipped_sum(ids.long(), G, c, 5, 0.3, 11, 1), 1e-12)


def test_empty_batch_everywhere() -> None:
    A, G = randn(0, 4, 3), randn(0, 4, 2)
    c = torch.empty(0, device="cuda", dtype=torch.float64)
    assert torch.ops.dpkernels.ghost_norm(A, G, True)[0].shape == (0,)
    assert torch.ops.dpkernels.sq_norms(A).shape == (0,)
    out = torch.ops.dpkernels.clipped_rows_sum(A, c, 1.0, 3, 0)
    assert_close(out, reference.philox_normal((4, 3), 3, 0, torch.float64, "cuda"), 1e-13)
    ids = torch.empty(0, 4, device="cuda", dtype=torch.int64)
    table = torch.ops.dpkernels.embedding_clipped_sum(ids, randn(0, 4, 2), c, 3, 1.0, 3, 0)
    assert_close(table, reference.philox_normal((3, 2), 3, 0, torch.float64, "cuda"), 1e-13)
