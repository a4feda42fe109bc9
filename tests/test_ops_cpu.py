"""The C++ CPU kernels of every op vs the plain-torch reference (dpkernels.reference).

Each op is called both as torch.ops.dpkernels.<name> and as dpkernels.ops.<name>(backend="cpu").
Shapes are ragged (not multiples of the 256 tiles); one random case per test draws fresh shapes
from DPK_TEST_SEED (printed on failure; random when unset).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch

from dpkernels import ops, reference

assert ops.HAS_EXTENSION, "dpkernels._C is not built: run `pip install --no-build-isolation -e .`"
K = torch.ops.dpkernels

SEED = int(os.environ.get("DPK_TEST_SEED", random.SystemRandom().randrange(2**31)))
RNG = random.Random(SEED)
HALF = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def rand_shape() -> tuple[int, int, int, int]:
    """(B, T, d, p) drawn fresh, reproducible through DPK_TEST_SEED."""
    return RNG.randint(1, 5), RNG.randint(1, 300), RNG.randint(1, 70), RNG.randint(1, 70)


# (B, T, d, p): T = 1, T across several 256-token Gram tiles, d/p across several 256 direct tiles
LINEAR_SHAPES = [(3, 37, 19, 23), (2, 300, 40, 33), (5, 1, 7, 5), (2, 5, 300, 270), (1, 513, 3, 2), rand_shape()]


def tol(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-10, torch.float32: 2e-5}.get(dtype, 2e-4)


def close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """out vs a float64 reference, relative to the reference's scale."""
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), (what, out.dtype)
    scale = ref.abs().max().item() if ref.numel() else 1.0
    err = (out.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    assert err <= tol(dtype) * max(scale, 1e-30), f"{what}: max err {err:.3g} vs scale {scale:.3g} (seed {SEED})"


def linear_inputs(B, T, d, p, dtype, two_d=False):
    shape_a, shape_g = ((B, d), (B, p)) if two_d else ((B, T, d), (B, T, p))
    return torch.randn(shape_a).to(dtype), torch.randn(shape_g).to(dtype)


def both(name: str, *args):
    """The op through the dispatcher and through dpkernels.ops with backend="cpu": must agree exactly."""
    a = getattr(K, name)(*args)
    b = getattr(ops, name)(*args, backend="cpu")
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    return a


@pytest.mark.parametrize("name", ["ghost_norm", "direct_norm"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=str)
def test_linear_norms(name, dtype, shape):
    A, G = linear_inputs(*shape, dtype)
    w_ref, b_ref = getattr(reference, name)(A.double(), G.double(), True)
    w, b = both(name, A, G, True)
    close(w, w_ref, dtype, f"{name} weight {shape}")
    close(b, b_ref, dtype, f"{name} bias {shape}")
    w2, b2 = both(name, A, G, False)
    assert b2.numel() == 0
    torch.testing.assert_close(w2, w, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["ghost_norm", "direct_norm"])
def test_linear_norms_2d_and_4d_inputs(name):
    A, G = linear_inputs(4, 1, 13, 6, torch.float32, two_d=True)
    close(both(name, A, G, True)[0], reference.direct_norm(A.double(), G.double(), True)[0], torch.float32, "2-D")
    A4, G4 = torch.randn(3, 5, 7, 11), torch.randn(3, 5, 7, 9)  # conv-like [B, H, W, C] tokens
    w, b = both(name, A4, G4, True)
    w_ref, b_ref = reference.direct_norm(A4.double(), G4.double(), True)
    close(w, w_ref, torch.float32, "4-D weight")
    close(b, b_ref, torch.float32, "4-D bias")


def test_ghost_equals_direct_on_long_sequences():
    A, G = linear_inputs(2, 700, 9, 10, torch.float64)
    torch.testing.assert_close(K.ghost_norm(A, G, True), K.direct_norm(A, G, True), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["ghost_norm", "direct_norm"])
def test_linear_norms_empty_batch(name):
    w, b = both(name, torch.randn(0, 4, 3), torch.randn(0, 4, 5), True)
    assert w.shape == (0,) and b.shape == (0,) and w.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LINEAR_SHAPES[:3] + LINEAR_SHAPES[-1:], ids=str)
@pytest.mark.parametrize("with_bias", [True, False])
def test_clipped_sum(dtype, shape, with_bias):
    A, G = linear_inputs(*shape, dtype)
    B = shape[0]
    c = torch.rand(B)
    cb = torch.rand(B) if with_bias else None
    W, b = both("clipped_sum", A, G, c, cb, 0.0, 0, 0)
    W_ref, b_ref = reference.clipped_sum(A.double(), G.double(), c.double(), None if cb is None else cb.double(),
                                         0.0, 0, 0)
    close(W, W_ref, dtype, "clipped weight sum")
    assert W.shape == (shape[3], shape[2])
    if with_bias:
        close(b, b_ref, dtype, "clipped bias sum")
    else:
        assert b.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clipped_sum_noise_matches_reference(dtype):
    A, G = linear_inputs(3, 7, 5, 6, dtype)  # p*d = 30: the bias noise starts at offset + 32
    c, cb = torch.rand(3, dtype=dtype), torch.rand(3, dtype=dtype)
    W, b = K.clipped_sum(A, G, c, cb, 0.7, 2**40 + 12345, 5)
    W_ref, b_ref = reference.clipped_sum(A, G, c, cb, 0.7, 2**40 + 12345, 5)
    rt = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(W, W_ref, rtol=rt, atol=rt)
    torch.testing.assert_close(b, b_ref, rtol=rt, atol=rt)


def test_clipped_sum_empty_batch_is_pure_noise():
    A, G = torch.randn(0, 4, 6), torch.randn(0, 4, 5)
    c = torch.rand(0)
    W, b = both("clipped_sum", A, G, c, c, 1.5, 99, 0)
    W_ref, b_ref = reference.clipped_sum(A, G, c, c, 1.5, 99, 0)
    torch.testing.assert_close(W, W_ref, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(b, b_ref, rtol=2e-6, atol=2e-6)
    assert W.abs().sum() > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_sq_norms_and_clipped_rows_sum(dtype):
    for shape in [(4, 3, 5), (1, 70001), (3, 1), (0, 6)]:
        X = torch.randn(shape).to(dtype)
        close(both("sq_norms", X), reference.sq_norms(X.double()), dtype, f"sq_norms {shape}")
        c = torch.rand(shape[0])
        out = both("clipped_rows_sum", X, c, 0.0, 0, 0)
        close(out, reference.clipped_rows_sum(X.double(), c.double(), 0.0, 0, 0), dtype, f"rows {shape}")
    X = torch.randn(5, 7, 3).to(dtype)
    c = torch.rand(5)
    out = K.clipped_rows_sum(X, c, 0.3, 11, 2)
    ref = reference.clipped_rows_sum(X.to(out.dtype), c.to(out.dtype), 0.3, 11, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_affine_grad_sample(dtype):
    for shape in [(4, 3, 50), (2, 5, 1), (3, 7, 1000)]:
        xhat, G = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
        out = both("affine_grad_sample", xhat, G)
        close(out, reference.affine_grad_sample(xhat.double(), G.double()), dtype, f"affine {shape}")
        # LayerNorm's layout: [B, S, C] tensors seen as [B, C, S] (the channel-last path, no copies)
        B, C, S = shape
        xl, Gl = torch.randn(B, S, C).to(dtype).transpose(1, 2), torch.randn(B, S, C).to(dtype).transpose(1, 2)
        out = both("affine_grad_sample", xl, Gl)
        close(out, reference.affine_grad_sample(xl.double(), Gl.double()), dtype, f"affine channel-last {shape}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_ops(dtype):
    B, T, D, V = 4, 9, 5, 7
    ids = torch.randint(0, 4, (B, T))  # few ids: many repeats within a sample
    ids[0] = 3  # one sample looks up a single row T times
    G = torch.randn(B, T, D).to(dtype)
    close(both("embedding_norm", ids, G), reference.embedding_norm(ids, G.double()), dtype, "embedding_norm")
    c = torch.rand(B)
    out = both("embedding_clipped_sum", ids, G, c, V, 0.0, 0, 0)
    close(out, reference.embedding_clipped_sum(ids, G.double(), c.double(), V, 0.0, 0, 0), dtype, "emb sum")
    assert out[4:].abs().sum() == 0  # untouched rows get no signal (no noise asked)
    noisy = K.embedding_clipped_sum(ids, G, c, V, 0.5, 3, 1)
    ref = reference.embedding_clipped_sum(ids, G.to(noisy.dtype), c.to(noisy.dtype), V, 0.5, 3, 1)
    torch.testing.assert_close(noisy, ref, rtol=1e-5, atol=1e-5)


def test_embedding_2d_ids_and_empty():
    ids, G = torch.tensor([[2], [2], [0]]), torch.randn(3, 1, 4)
    close(K.embedding_norm(ids, G), reference.embedding_norm(ids, G.double()), torch.float32, "T=1")
    assert K.embedding_norm(torch.zeros(0, 3, dtype=torch.long), torch.randn(0, 3, 4)).shape == (0,)
    out = K.embedding_clipped_sum(torch.zeros(0, 3, dtype=torch.long), torch.randn(0, 3, 4), torch.rand(0), 6, 1.0, 8, 0)
    torch.testing.assert_close(out, reference.philox_normal((6, 4), 8, 0, torch.float32, "cpu"), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("offset", [0, 1, 2, 3, 5, 2**33 + 2])
@pytest.mark.parametrize("n", [1, 3, 4, 13])
def test_noise_is_the_reference_stream(offset, n):
    for seed in (0, 7, 2**32 + 5, 2**63 - 1):
        x = torch.zeros(n, dtype=torch.float64)
        both("add_noise_", x, 1.0, seed, offset) if n == 1 else K.add_noise_(x, 1.0, seed, offset)
        if n == 1:  # both() ran it twice on the same tensor
            x /= 2
        ref = reference.philox_normal((n,), seed, offset, torch.float64, "cpu")
        torch.testing.assert_close(x, ref, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_noise_roundings_match_reference(dtype):
    x = torch.randn(3, 17).to(dtype)
    y = x.clone()
    out = K.add_noise_(x, 0.37, 1234, 6)
    assert out.data_ptr() == x.data_ptr()
    reference.add_noise_(y, 0.37, 1234, 6)
    atol = {torch.float64: 1e-14, torch.float32: 1e-6}.get(dtype, 1e-2)
    torch.testing.assert_close(x, y, rtol=0, atol=atol)
    # non-contiguous: counters follow the logical row-major order
    z = torch.zeros(17, 3).t()
    K.add_noise_(z, 1.0, 5, 0)
    torch.testing.assert_close(z, reference.philox_normal((3, 17), 5, 0, torch.float32, "cpu"), rtol=2e-6, atol=2e-6)


def test_noise_statistics():
    n = 200_000
    x = torch.zeros(n, dtype=torch.float64)
    K.add_noise_(x, 2.0, 2024, 0)
    assert abs(x.mean().item()) < 5 * 2.0 / n**0.5
    assert abs(x.std().item() - 2.0) < 0.02
    assert (x.abs() > 2.0 * 4).float().mean().item() < 1e-3  # ~6e-5 for a Gaussian
    y = torch.zeros(n, dtype=torch.float64)
    K.add_noise_(y, 2.0, 2024, n)  # the next stretch of the stream: independent of the first
    assert abs(torch.corrcoef(torch.stack([x, y]))[0, 1].item()) < 0.02
    z = torch.zeros(n, dtype=torch.float64)
    K.add_noise_(z, 2.0, 2025, 0)  # another seed
    assert abs(torch.corrcoef(torch.stack([x, z]))[0, 1].item()) < 0.02


def test_meta_and_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    m = {"device": "meta"}
    w, b = K.ghost_norm(torch.empty(5, 7, 3, **m), torch.empty(5, 7, 4, **m), True)
    assert w.shape == (5,) and b.shape == (5,) and w.device.type == "meta"
    w, b = K.direct_norm(torch.empty(5, 3, dtype=torch.float64, **m), torch.empty(5, 4, dtype=torch.float64, **m), False)
    assert w.shape == (5,) and b.shape == (0,) and w.dtype == torch.float64
    W, b = K.clipped_sum(torch.empty(5, 7, 3, dtype=torch.bfloat16, **m), torch.empty(5, 7, 4, dtype=torch.bfloat16, **m),
                         torch.empty(5, **m), torch.empty(5, **m), 1.0, 0, 0)
    assert W.shape == (4, 3) and b.shape == (4,) and W.dtype == torch.float32
    assert K.sq_norms(torch.empty(6, 2, 3, **m)).shape == (6,)
    assert K.clipped_rows_sum(torch.empty(6, 2, 3, **m), torch.empty(6, **m), 1.0, 0, 0).shape == (2, 3)
    assert K.affine_grad_sample(torch.empty(6, 2, 3, **m), torch.empty(6, 2, 3, **m)).shape == (6, 2)
    assert K.embedding_norm(torch.empty(6, 4, dtype=torch.long, **m), torch.empty(6, 4, 3, **m)).shape == (6,)
    e = K.embedding_clipped_sum(torch.empty(6, 4, dtype=torch.long, **m), torch.empty(6, 4, 3, **m),
                                torch.empty(6, **m), 11, 1.0, 0, 0)
    assert e.shape == (11, 3)
    with FakeTensorMode():
        W, b = K.clipped_sum(torch.empty(8, 2, 3), torch.empty(8, 2, 5), torch.empty(8), None, 1.0, 0, 0)
        assert W.shape == (5, 3) and b.shape == (0,)
        assert K.add_noise_(torch.empty(3, 4), 1.0, 0, 0).shape == (3, 4)


def test_torch_compile_traces_the_ops():
    def step(A, G, c):
        w, _ = torch.ops.dpkernels.ghost_norm(A, G, False)
        W, b = torch.ops.dpkernels.clipped_sum(A, G, c * torch.rsqrt(w + 1.0), c, 0.5, 3, 0)
        return W.sum() + b.sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=True)
    for B in (3, 5):  # Poisson batches change size: one graph, no specialisation on B
        A, G, c = torch.randn(B, 4, 6), torch.randn(B, 4, 5), torch.rand(B)
        torch.testing.assert_close(compiled(A, G, c), step(A, G, c))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: K.ghost_norm(torch.randn(3), torch.randn(3), True), "A must be"),
        (lambda: K.ghost_norm(torch.randn(3, 4, 5), torch.randn(3, 6), True), "same rank"),
        (lambda: K.direct_norm(torch.randn(3, 4, 5), torch.randn(2, 4, 6), True), "batch size"),
        (lambda: K.ghost_norm(torch.randn(3, 4, 5), torch.randn(3, 5, 6), True), "token dims"),
        (lambda: K.ghost_norm(torch.ones(3, 4, dtype=torch.long), torch.randn(3, 6), True), "float32"),
        (lambda: K.clipped_sum(torch.randn(3, 4), torch.randn(3, 6), torch.rand(2), None, 0.0, 0, 0), "c must have"),
        (lambda: K.clipped_sum(torch.randn(3, 4), torch.randn(3, 6), torch.rand(3), torch.rand(4), 0.0, 0, 0),
         "c_bias must have"),
        (lambda: K.clipped_sum(torch.randn(3, 4), torch.randn(3, 6), torch.rand(3), None, 1.0, -1, 0), "seed"),
        (lambda: K.clipped_sum(torch.randn(3, 4), torch.randn(3, 6), torch.rand(3), None, -1.0, 0, 0), "noise_std"),
        (lambda: K.embedding_clipped_sum(torch.tensor([[0, 9]]), torch.randn(1, 2, 3), torch.rand(1), 5, 0.0, 0, 0),
         "out of range"),
        (lambda: K.embedding_norm(torch.tensor([[0, -1]]), torch.randn(1, 2, 3)), ">= 0"),
        (lambda: K.embedding_norm(torch.tensor([[0.0, 1.0]]), torch.randn(1, 2, 3)), "int64"),
        (lambda: K.embedding_norm(torch.tensor([[0, 1]]), torch.randn(1, 3, 3)), "ids.shape"),
        (lambda: K.affine_grad_sample(torch.randn(2, 3, 4), torch.randn(2, 3, 5)), "same shape"),
        (lambda: K.add_noise_(torch.zeros(3, dtype=torch.long), 1.0, 0, 0), "float32"),
        (lambda: K.clipped_rows_sum(torch.randn(3, 4), torch.rand(4), 0.0, 0, 0), "c must have"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


def test_has_backend():
    assert K.has_backend("cpu")
    assert K.has_backend("cuda") == ops.extension_has("cuda")
    assert not K.has_backend("xla")


def test_ghost_norm_memory_is_bounded():
    """B=2, T=20000: a B x T x T fp32 Gram would be 3.2 GB; the tiled kernel needs a few MB."""
    code = textwrap.dedent(
        """
        import resource, torch, dpkernels.ops
        torch.manual_seed(0)
        A, G = torch.randn(2, 20000, 8), torch.randn(2, 20000, 6)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        w, b = torch.ops.dpkernels.ghost_norm(A, G, True)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        wd, bd = torch.ops.dpkernels.direct_norm(A.double(), G.double(), True)
        assert torch.allclose(w.double(), wd, rtol=1e-4), (w, wd)
        print(grown)
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         check=False)
    assert res.returncode == 0, res.stderr
    grown_kb = int(res.stdout.strip().splitlines()[-1])
    assert grown_kb < 100 * 1024, f"peak RSS grew by {grown_kb / 1024:.0f} MB"
