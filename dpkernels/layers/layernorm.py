"""nn.LayerNorm: per-sample gradients of the affine parameters are tiny ([B, D]): computed directly."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from dpkernels import ops
from dpkernels.layers.base import DPLayer, Record, register_layer
from dpkernels.layers.rows import add_rows, rows_clipped_sums, rows_sq_norms


@register_layer(nn.LayerNorm)
class DPLayerNorm(DPLayer):
    """nn.LayerNorm: per-sample gradients of the affine parameters are small ([B, C]): computed directly at backward."""
    param_names = ("weight", "bias")

    def compute(self, x, params):
        """The normalisation; saves the input and its statistics.

        Args and Returns: as `DPLayer.compute`.
        """
        m = self.module
        weight = params[0] if m.weight is not None else None
        bias = params[-1] if m.bias is not None else None
        out, mean, rstd = torch.native_layer_norm(x, m.normalized_shape, weight, bias, m.eps)
        return out, {"x": x, "mean": mean, "rstd": rstd}

    def input_grad(self, saved: dict[str, Any], grad_out: torch.Tensor) -> torch.Tensor:
        """aten's native backward, input gradient only.

        Args and Returns: as `DPLayer.input_grad`.
        """
        m, s = self.module, saved
        return torch.ops.aten.native_layer_norm_backward(
            grad_out, s["x"], m.normalized_shape, s["mean"], s["rstd"], m.weight, m.bias, [True, False, False]
        )[0]

    def on_grad(self, rec: Record, saved: dict[str, Any], grad_out: torch.Tensor) -> None:
        # [rows, C] is all the norms and sums need: G is not kept and the saved input is dropped now.
        # A second backward (retain_graph) adds its rows: the per-sample gradient is of the summed loss.
        """Reduce to per-row gradients [rows, C] now (added over backward passes), drop the input.

        Args: as `DPLayer.on_grad`.
        """
        rec.extra["rows"] = add_rows(rec.extra.get("rows"), self.row_grads(saved, grad_out, self.backend))
        rec.saved.clear()

    def grad_samples(self, rec: Record, grouping, backend: str) -> dict[str, torch.Tensor]:
        """Per-example gradients of the trainable affine parameters (the rows of one example summed).

        Args:
            rec: the call's record (its per-row gradients).
            grouping: which rows form one example.
            backend: the ops' backend (unused: the rows are already reduced).

        Returns:
            {parameter name: [n, ...parameter shape]}.
        """
        return {k: grouping.sum_rows(v).reshape(-1, *self.module.normalized_shape) for k, v in rec.extra["rows"].items()}

    def row_grads(self, s: dict[str, Any], G: torch.Tensor, backend: str) -> dict[str, torch.Tensor]:
        """Per-row gradients of the trainable affine parameters.

        Args:
            s: what `compute` saved.
            G: the gradient of the layer's output.
            backend: the ops' backend.

        Returns:
            {parameter name: [rows, C]}.
        """
        shape = self.module.normalized_shape
        B, N = G.shape[0], math.prod(shape)
        M = math.prod(G.shape[1:G.dim() - len(shape)])
        G3 = G.reshape(B, M, N)
        out = {}
        if "weight" in self.trainable:
            xhat = ((s["x"] - s["mean"]) * s["rstd"]).reshape(B, M, N)
            out["weight"] = ops.affine_grad_sample(xhat.transpose(1, 2), G3.transpose(1, 2), backend=backend)
        if "bias" in self.trainable:
            out["bias"] = G3.sum(1, dtype=torch.float64 if G.dtype == torch.float64 else torch.float32)
        return out

    def sq_norms(self, rec, grouping, backend):
        """`rows_sq_norms` of the per-example gradients.

        Args and Returns: as `DPLayer.sq_norms`.
        """
        return rows_sq_norms(self.grad_samples(rec, grouping, backend), rec, backend)

    def clipped_sums(self, rec, grouping, c, noise_std, noise, backend):
        """`rows_clipped_sums` of the per-example gradients `sq_norms` kept.

        Args and Returns: as `DPLayer.clipped_sums`.
        """
        return rows_clipped_sums(rec.extra["grad_samples"], c, noise_std, noise, backend)
