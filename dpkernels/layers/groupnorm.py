"""nn.GroupNorm: per-sample gradients of the per-channel affine parameters ([B, C]) computed directly."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dpkernels import ops
from dpkernels.layers.base import DPLayer, Record, register_layer
from dpkernels.layers.rows import add_rows, rows_clipped_sums, rows_sq_norms


@register_layer(nn.GroupNorm)
class DPGroupNorm(DPLayer):
    """nn.GroupNorm: per-sample gradients of the affine parameters are small ([B, C]): computed directly at backward."""
    param_names = ("weight", "bias")

    def compute(self, x, params):
        """The normalisation; saves the input and its statistics.

        Args and Returns: as `DPLayer.compute`.
        """
        m = self.module
        weight = params[0] if m.weight is not None else None
        bias = params[-1] if m.bias is not None else None
        B, C = x.shape[0], x.shape[1]
        hw = x.shape[2:].numel()
        out, mean, rstd = torch.native_group_norm(x, weight, bias, B, C, hw, m.num_groups, m.eps)
        return out, {"x": x, "mean": mean, "rstd": rstd, "hw": hw}

    def input_grad(self, saved: dict[str, Any], grad_out: torch.Tensor) -> torch.Tensor:
        """aten's native backward, input gradient only.

        Args and Returns: as `DPLayer.input_grad`.
        """
        m, s = self.module, saved
        x = s["x"]
        # the CPU kernel reads dY in X's memory format: a channels_last X (inductor's layout optimisation, or a
        # channels_last model) with a contiguous dY gives a wrong input gradient. Give both the same format.
        fmt = (torch.channels_last if x.dim() == 4 and not x.is_contiguous()
               and x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
        return torch.ops.aten.native_group_norm_backward(
            grad_out.contiguous(memory_format=fmt), x.contiguous(memory_format=fmt), s["mean"], s["rstd"], m.weight,
            x.shape[0], x.shape[1], s["hw"], m.num_groups, [True, False, False],
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
        return {k: grouping.sum_rows(v) for k, v in rec.extra["rows"].items()}

    def row_grads(self, s: dict[str, Any], G: torch.Tensor, backend: str) -> dict[str, torch.Tensor]:
        """Per-row gradients of the trainable affine parameters.

        Args:
            s: what `compute` saved.
            G: the gradient of the layer's output.
            backend: the ops' backend.

        Returns:
            {parameter name: [rows, C]}.
        """
        x = s["x"]
        B, C, g = x.shape[0], x.shape[1], self.module.num_groups
        G3 = G.flatten(2)
        out = {}
        if "weight" in self.trainable:
            xg = x.reshape(B, g, (C // g) * s["hw"])
            xhat = ((xg - s["mean"].reshape(B, g, 1)) * s["rstd"].reshape(B, g, 1)).reshape(B, C, s["hw"])
            out["weight"] = ops.affine_grad_sample(xhat, G3, backend=backend)
        if "bias" in self.trainable:
            out["bias"] = G3.sum(-1, dtype=torch.float64 if G.dtype == torch.float64 else torch.float32)
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
