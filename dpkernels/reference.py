"""Plain-torch ground truth for every op in `dpkernels.ops`.

These materialise what the kernels avoid (per-sample gradients, T x T Grams) and
are meant for tests and as the `backend="torch"` fallback, not for speed.
Shapes: A [B, T, d], G [B, T, p] (a 2-D input is T = 1), c [B].
Accumulation is in float32 for half inputs, float64 for float64 inputs.
"""

from __future__ import annotations

import math

import torch

from dpkernels.conventions import acc_dtype, as_3d, round_up4

_PHILOX_M0 = 0xD2511F53
_PHILOX_M1 = 0xCD9E8D57
_PHILOX_W0 = 0x9E3779B9
_PHILOX_W1 = 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def per_sample_linear_grads(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients of a linear layer, materialised.

    Args:
        A: the layer's input, [B, d], [B, T, d] or [B, ..., d].
        G: the gradient of its output, same leading dims, last dim p.

    Returns:
        g_b = G_b^T A_b, [B, p, d], in the accumulation dtype.
    """
    dt = acc_dtype(A)
    return torch.einsum("btp,btd->bpd", as_3d(G).to(dt), as_3d(A).to(dt))


def ghost_norm(A: torch.Tensor, G: torch.Tensor, with_bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared per-sample norms of the weight (and bias) gradient, by the Gram identity.

    Args:
        A: the layer's input, [B, (T,) d].
        G: the gradient of its output, [B, (T,) p].
        with_bias: also the bias norms ||sum_t G_b[t]||^2.

    Returns:
        (weight norms [B], bias norms [B] or an empty tensor), in the accumulation dtype.
    """
    dt = acc_dtype(A)
    A3, G3 = as_3d(A).to(dt), as_3d(G).to(dt)
    aa = torch.bmm(A3, A3.transpose(1, 2))
    gg = torch.bmm(G3, G3.transpose(1, 2))
    w = (aa * gg).sum(dim=(1, 2))
    b = G3.sum(1).pow(2).sum(1) if with_bias else w.new_empty(0)
    return w, b


def direct_norm(A: torch.Tensor, G: torch.Tensor, with_bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared per-sample norms of the weight (and bias) gradient, by materialising g_b.

    Args:
        A: the layer's input, [B, (T,) d].
        G: the gradient of its output, [B, (T,) p].
        with_bias: also the bias norms ||sum_t G_b[t]||^2.

    Returns:
        (weight norms [B], bias norms [B] or an empty tensor), in the accumulation dtype.
    """
    g = per_sample_linear_grads(A, G)
    w = g.pow(2).sum(dim=(1, 2))
    b = as_3d(G).to(g.dtype).sum(1).pow(2).sum(1) if with_bias else w.new_empty(0)
    return w, b


def clipped_sum(
    A: torch.Tensor,
    G: torch.Tensor,
    c: torch.Tensor,
    c_bias: torch.Tensor | None,
    noise_std: float,
    seed: int,
    offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_b c_b G_b^T A_b + noise [p, d]; bias sum_b c_bias_b sum_t G_b[t] + noise [p].

    Weight noise uses counters offset .. offset + p*d - 1; bias noise starts at
    offset + round_up4(p*d). An absent c_bias gives an empty bias.

    Args:
        A: the layer's input, [B, (T,) d].
        G: the gradient of its output, [B, (T,) p].
        c: clip factor per sample, [B].
        c_bias: clip factor per sample for the bias, [B], or None (no bias).
        noise_std: std of the Gaussian noise.
        seed: Philox seed.
        offset: first noise counter.

    Returns:
        (weight sum [p, d], bias sum [p] or an empty tensor), in the accumulation dtype.
    """
    dt = acc_dtype(A)
    A3, G3 = as_3d(A).to(dt), as_3d(G).to(dt)
    p, d = G3.shape[-1], A3.shape[-1]
    w = torch.einsum("b,btp,btd->pd", c.to(dt), G3, A3)
    w = w + noise_std * philox_normal((p, d), seed, offset, dt, A.device)
    if c_bias is None:
        return w, w.new_empty(0)
    b = torch.einsum("b,btp->p", c_bias.to(dt), G3)
    b = b + noise_std * philox_normal((p,), seed, offset + round_up4(p * d), dt, A.device)
    return w, b


def sq_norms(X: torch.Tensor) -> torch.Tensor:
    """Squared norm of each sample over all its trailing dims.

    Args:
        X: [B, ...].

    Returns:
        ||X_b||^2, [B], in the accumulation dtype.
    """
    dt = acc_dtype(X)
    return X.to(dt).reshape(X.shape[0], math.prod(X.shape[1:])).pow(2).sum(1)


def clipped_rows_sum(X: torch.Tensor, c: torch.Tensor, noise_std: float, seed: int, offset: int) -> torch.Tensor:
    """Clipped sum of per-sample tensors, plus noise.

    Args:
        X: [B, ...].
        c: clip factor per sample, [B].
        noise_std: std of the Gaussian noise.
        seed: Philox seed.
        offset: first noise counter (row-major over X.shape[1:]).

    Returns:
        sum_b c_b X_b + noise, shape X.shape[1:], in the accumulation dtype.
    """
    dt = acc_dtype(X)
    out = torch.einsum("b,bn->n", c.to(dt), X.to(dt).reshape(X.shape[0], math.prod(X.shape[1:])))
    out = out + noise_std * philox_normal((out.numel(),), seed, offset, dt, X.device)
    return out.reshape(X.shape[1:])


def affine_grad_sample(xhat: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Per-sample gradient of a per-channel scale (a norm layer's weight).

    Args:
        xhat: the normalised input, [B, C, S].
        G: the gradient of the layer's output, [B, C, S].

    Returns:
        sum_s xhat * G, [B, C], in the accumulation dtype of G.
    """
    dt = acc_dtype(G)
    return (xhat.to(dt) * G.to(dt)).sum(-1)


def embedding_grad_sample(ids: torch.Tensor, G: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    """Per-sample gradient of an embedding table, materialised (repeated ids summed).

    Args:
        ids: int64 ids, [B, ...].
        G: the gradient of the looked-up rows, [B, ..., D].
        num_embeddings: V, the table's rows.

    Returns:
        [B, V, D], in the accumulation dtype of G.
    """
    dt = acc_dtype(G)
    B, D = ids.shape[0], G.shape[-1]
    ids2 = ids.reshape(B, ids.shape[1:].numel())
    G3 = G.reshape(B, ids2.shape[1], D).to(dt)
    out = torch.zeros(B, num_embeddings, D, dtype=dt, device=G.device)
    out.scatter_add_(1, ids2.unsqueeze(-1).expand(-1, -1, D), G3)
    return out


def embedding_norm(ids: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Squared norm of each sample's embedding-table gradient.

    Args:
        ids: int64 ids, [B, ...].
        G: the gradient of the looked-up rows, [B, ..., D].

    Returns:
        [B].
    """
    V = int(ids.max().item()) + 1 if ids.numel() else 1
    return sq_norms(embedding_grad_sample(ids, G, V))


def embedding_clipped_sum(
    ids: torch.Tensor, G: torch.Tensor, c: torch.Tensor, num_embeddings: int, noise_std: float, seed: int, offset: int
) -> torch.Tensor:
    """Clipped sum of the per-sample embedding-table gradients, noise on the whole table.

    Args:
        ids: int64 ids, [B, ...].
        G: the gradient of the looked-up rows, [B, ..., D].
        c: clip factor per sample, [B].
        num_embeddings: V, the table's rows.
        noise_std: std of the Gaussian noise.
        seed: Philox seed.
        offset: first noise counter (row-major over [V, D]).

    Returns:
        sum_b c_b g_b + noise, [V, D].
    """
    g = embedding_grad_sample(ids, G, num_embeddings)
    return clipped_rows_sum(g, c, noise_std, seed, offset)


def add_noise_(x: torch.Tensor, std: float, seed: int, offset: int) -> torch.Tensor:
    """x += std * philox_normal, in place.

    Args:
        x: the tensor to noise.
        std: the noise's std.
        seed: Philox seed.
        offset: counter of x's first element (row-major).

    Returns:
        x.
    """
    x.add_(std * philox_normal(tuple(x.shape), seed, offset, x.dtype, x.device))
    return x


# --- Counter-based Gaussian noise (Philox4x32-10 + Box-Muller) ----------------
# Element i of a noise tensor uses counter n = offset + i: block n // 4 is
# encrypted with key (seed lo, seed hi); lane n % 4 picks one of the four
# normals the block's two Box-Muller pairs give. The C++, CUDA and Triton
# kernels implement the same stream, so a seed reproduces across backends.


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    # a * m needs 64 unsigned bits; int64 has 63, so multiply by 16-bit halves of m
    mh, ml = m >> 16, m & 0xFFFF
    hi = (a * mh + ((a * ml) >> 16)) >> 16
    lo = (a * ml + ((a * mh) << 16)) & _MASK32
    return hi & _MASK32, lo


def philox4x32(counter: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """Philox4x32-10 of the blocks (counter, 0, 0), with 64-bit counters.

    Args:
        counter: int64 block counters, any shape.
        seed: the 64-bit key (lo and hi words).

    Returns:
        The 4 uint32 output lanes, each an int64 tensor like `counter`.
    """
    c0 = counter & _MASK32
    c1 = (counter >> 32) & _MASK32
    c2 = torch.zeros_like(counter)
    c3 = torch.zeros_like(counter)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, _PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, _PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W0) & _MASK32
        k1 = (k1 + _PHILOX_W1) & _MASK32
    return [c0, c1, c2, c3]


def uint32_to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint32 -> (0, 1), never 0 so log is finite.

    Args:
        x: uint32 values held in an int64 tensor.

    Returns:
        float64 tensor in (0, 1).
    """
    return (x.to(torch.float64) + 0.5) * (1.0 / 4294967296.0)


def philox_normal(shape: tuple[int, ...], seed: int, offset: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Standard normals for counters offset .. offset + numel - 1, computed in float64.

    Args:
        shape: the output's shape (counters run row-major over it).
        seed: Philox seed.
        offset: the first counter.
        dtype: the output's dtype.
        device: the output's device.

    Returns:
        A tensor of `shape`.
    """
    n = math.prod(shape)
    idx = torch.arange(n, dtype=torch.int64) + offset
    lanes = philox4x32(idx // 4, seed)
    u = [uint32_to_unit(x) for x in lanes]
    r01 = torch.sqrt(-2.0 * torch.log(u[0]))
    r23 = torch.sqrt(-2.0 * torch.log(u[2]))
    z = torch.stack(
        [r01 * torch.cos(2 * math.pi * u[1]), r01 * torch.sin(2 * math.pi * u[1]),
         r23 * torch.cos(2 * math.pi * u[3]), r23 * torch.sin(2 * math.pi * u[3])],
        dim=1,
    )
    out = z.gather(1, (idx % 4).unsqueeze(1)).squeeze(1)
    return out.reshape(shape).to(device=device, dtype=dtype)
