"""nn.Linear: weight norms by ghost (Gram) or direct strategy, clipped sum as one GEMM."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from dpkernels import ops
from dpkernels.conventions import as_3d, round_up4
from dpkernels.layers import cancellation
from dpkernels.layers.base import DPLayer, Record, register_layer

log = logging.getLogger("dpkernels")


def linear_sq_norms(layer: DPLayer, A: torch.Tensor, G: torch.Tensor, backend: str) -> dict[str, torch.Tensor]:
    """Squared per-example norms of a linear layer's weight (by its ghost or direct strategy) and bias.
    Shared by Linear and the unfolded Conv2d.

    Args:
        layer: the layer (its trainable parameters; its strategy is chosen and logged on first use).
        A: the input tokens, [n, T, d].
        G: the output gradient tokens, [n, T, p].
        backend: the ops' backend.

    Returns:
        {"weight": [n], "bias": [n]} for the trainable ones.
    """
    with_bias = "bias" in layer.trainable
    if "weight" not in layer.trainable:
        return {"bias": ops.sq_norms(G.sum(1), backend=backend)}
    if layer.strategy is None:
        layer.strategy = ops.choose_strategy(A.shape[1], A.shape[2], G.shape[2])
        log.info("dpkernels: %s uses the %s norm (T=%d, d=%d, p=%d)", layer.name, layer.strategy, *A.shape[1:], G.shape[2])
    w, b = ops.linear_norm(A, G, with_bias, layer.strategy, backend)
    if A.shape[1] > 1:  # tokens whose terms can cancel: norms that rounding made unreliable are replaced
        g_tok = cancellation.token_norms(G)
        w = cancellation.guard(w, (cancellation.token_norms(A) * g_tok).sum(1), A.dtype)
        if with_bias:
            b = cancellation.guard(b, g_tok.sum(1), A.dtype)
    return {"weight": w, "bias": b} if with_bias else {"weight": w}


def linear_clipped_sums(layer: DPLayer, A, G, c, noise_std, noise, backend) -> dict[str, torch.Tensor]:
    """Clipped noisy sums of a linear layer's weight [p, d] and bias [p], in one fused pass.

    Args:
        layer: the layer (its trainable parameters).
        A: the input tokens, [n, T, d].
        G: the output gradient tokens, [n, T, p].
        c: clip factors per example, by parameter name.
        noise_std: std of the noise.
        noise: the noise counters.
        backend: the ops' backend.

    Returns:
        {"weight": [p, d], "bias": [p]} for the trainable ones.
    """
    p, d = G.shape[-1], A.shape[-1]
    if "weight" not in layer.trainable:
        seed, offset = noise.take(p)
        return {"bias": ops.clipped_rows_sum(G.sum(1), c["bias"], noise_std, seed, offset, backend=backend)}
    seed, offset = noise.take(round_up4(p * d) + p)
    w, b = ops.clipped_sum(A, G, c["weight"], c.get("bias"), noise_std, seed, offset, backend=backend)
    return {"weight": w, "bias": b} if "bias" in layer.trainable else {"weight": w}


@register_layer(nn.Linear)
class DPLinear(DPLayer):
    """nn.Linear: saves its input A; norms by ghost or direct strategy, clipped sum as one GEMM."""
    param_names = ("weight", "bias")
    strategy: str | None = None

    def compute(self, x, params):
        """x W^T + b; saves the input as A.

        Args and Returns: as `DPLayer.compute`.
        """
        return F.linear(x, *params), {"A": x}

    def input_grad(self, saved: dict, grad_out: torch.Tensor) -> torch.Tensor:
        """G W.

        Args and Returns: as `DPLayer.input_grad`.
        """
        return grad_out.matmul(self.module.weight.to(grad_out.dtype))

    def tokens(self, rec: Record, grouping) -> tuple[torch.Tensor, torch.Tensor]:
        """The example tokens: A [n, k*T, d] and G [n, k*T, p] (the rows of one example concatenated).

        Args:
            rec: the call's record.
            grouping: which rows form one example.

        Returns:
            (A, G).
        """
        return grouping.tokens(as_3d(rec.saved["A"])), grouping.tokens(as_3d(rec.grad_out))

    def sq_norms(self, rec, grouping, backend):
        """`linear_sq_norms` over the example tokens.

        Args and Returns: as `DPLayer.sq_norms`.
        """
        A, G = self.tokens(rec, grouping)
        return linear_sq_norms(self, A, G, backend)

    def clipped_sums(self, rec, grouping, c, noise_std, noise, backend):
        """`linear_clipped_sums` over the example tokens.

        Args and Returns: as `DPLayer.clipped_sums`.
        """
        A, G = self.tokens(rec, grouping)
        return linear_clipped_sums(self, A, G, c, noise_std, noise, backend)
