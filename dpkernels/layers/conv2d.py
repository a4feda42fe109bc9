"""nn.Conv2d: a linear layer over output positions.

A 1x1 convolution is a linear over the H*W tokens as they are; a k x k one is
unfolded (im2col) first, so each output position is a token with Cin*k*k
features. With groups > 1 each group is its own linear; their squared norms add.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpkernels.layers.base import DPLayer, Record, register_layer
from dpkernels.layers.linear import linear_clipped_sums, linear_sq_norms


@register_layer(nn.Conv2d)
class DPConv2d(DPLayer):
    """nn.Conv2d: a linear layer over output positions (groups: one linear per group)."""
    param_names = ("weight", "bias")
    strategy: str | None = None

    def check_module(self) -> None:
        """Refuse padding='same' (or another string) with a padding mode other than zeros."""
        m = self.module
        if isinstance(m.padding, str) and m.padding != "valid" and m.padding_mode != "zeros":
            raise ValueError(f"{self.name}: padding={m.padding!r} with padding_mode={m.padding_mode!r} is not supported")

    def _padded(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Apply non-zero padding modes up front, so the convolution itself pads with zeros."""
        m = self.module
        if m.padding_mode == "zeros":
            return x, self._zero_padding(x)
        return F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode), (0, 0)

    def _zero_padding(self, x: torch.Tensor) -> tuple[int, int]:
        m = self.module
        if m.padding == "valid":
            return (0, 0)
        if m.padding == "same":
            pads = [m.dilation[i] * (m.kernel_size[i] - 1) for i in range(2)]
            if any(p % 2 for p in pads):
                raise ValueError(f"{self.name}: padding='same' with an even effective kernel is not supported")
            return (pads[0] // 2, pads[1] // 2)
        return tuple(m.padding)

    def compute(self, x, params):
        """The convolution; saves the (mode-)padded input as A and the zero padding.

        Args and Returns: as `DPLayer.compute`.
        """
        m = self.module
        xp, pad = self._padded(x)
        weight = params[0]
        bias = params[1] if len(params) > 1 else None
        out = F.conv2d(xp, weight, bias, m.stride, pad, m.dilation, m.groups)
        return out, {"A": xp, "pad": pad}

    def input_grad(self, saved: dict, grad_out: torch.Tensor) -> torch.Tensor:
        """The convolution's input gradient (through the padding mode's adjoint).

        Args and Returns: as `DPLayer.input_grad`.
        """
        m = self.module
        xp = saved["A"]
        w = m.weight.to(grad_out.dtype)
        gx = torch.ops.aten.convolution_backward(
            grad_out, xp, w, None, list(m.stride), list(saved["pad"]), list(m.dilation), False, [0, 0],
            m.groups, [True, False, False],
        )[0]
        return gx if m.padding_mode == "zeros" else _pad_adjoint(gx, m)

    def _group_tokens(self, rec: Record, grouping) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per group: A [n, L, Cin/g*k*k], G [n, L, Cout/g] over the L output positions."""
        m = self.module
        xp, G = rec.saved["A"], rec.grad_out
        G = G.flatten(2).transpose(1, 2)  # [B, L, Cout]
        if m.kernel_size == (1, 1) and m.stride == (1, 1) and rec.saved["pad"] == (0, 0):
            A = xp.flatten(2).transpose(1, 2)  # [B, L, Cin]
        else:
            cols = F.unfold(xp, m.kernel_size, m.dilation, rec.saved["pad"], m.stride)  # [B, Cin*k*k, L]
            A = cols.transpose(1, 2)
        A, G = grouping.tokens(A), grouping.tokens(G)
        g = m.groups
        if g == 1:
            return [(A, G)]
        fa, fg = A.shape[-1] // g, G.shape[-1] // g
        return [(A[..., i * fa:(i + 1) * fa], G[..., i * fg:(i + 1) * fg]) for i in range(g)]

    def sq_norms(self, rec, grouping, backend):
        """Per group, `linear_sq_norms` of the unfolded input; the groups' norms add.

        Args and Returns: as `DPLayer.sq_norms`.
        """
        total: dict[str, torch.Tensor] = {}
        for A, G in self._group_tokens(rec, grouping):
            for k, v in linear_sq_norms(self, A, G, backend).items():
                total[k] = total[k] + v if k in total else v
        return total

    def clipped_sums(self, rec, grouping, c, noise_std, noise, backend):
        """Per group, `linear_clipped_sums`; concatenated in the weight's shape.

        Args and Returns: as `DPLayer.clipped_sums`.
        """
        parts = [linear_clipped_sums(self, A, G, c, noise_std, noise, backend) for A, G in self._group_tokens(rec, grouping)]
        out = {}
        if "weight" in self.trainable:
            out["weight"] = torch.cat([p["weight"] for p in parts]).reshape(self.module.weight.shape)
        if "bias" in self.trainable:
            out["bias"] = torch.cat([p["bias"] for p in parts])
        return out


def _pad_adjoint(gx: torch.Tensor, m: nn.Conv2d) -> torch.Tensor:
    """Gradient of F.pad(x, mode) w.r.t. x, given the gradient of its output."""
    H = gx.shape[2] - m._reversed_padding_repeated_twice[2] - m._reversed_padding_repeated_twice[3]
    W = gx.shape[3] - m._reversed_padding_repeated_twice[0] - m._reversed_padding_repeated_twice[1]
    x = torch.zeros(gx.shape[0], gx.shape[1], H, W, dtype=gx.dtype, device=gx.device, requires_grad=True)
    with torch.enable_grad():
        y = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
        (g,) = torch.autograd.grad(y, x, gx)
    return g
