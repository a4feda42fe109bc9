"""Per-layer rules: how to get per-sample norms and clipped sums from (A, G). One module type per file."""

from torch import nn

from dpkernels.layers.base import DPLayer
from dpkernels.layers.conv2d import DPConv2d
from dpkernels.layers.embedding import DPEmbedding
from dpkernels.layers.groupnorm import DPGroupNorm
from dpkernels.layers.layernorm import DPLayerNorm
from dpkernels.layers.linear import DPLinear

RULES: dict[type[nn.Module], type[DPLayer]] = {
    nn.Linear: DPLinear,
    nn.Conv2d: DPConv2d,
    nn.LayerNorm: DPLayerNorm,
    nn.GroupNorm: DPGroupNorm,
    nn.Embedding: DPEmbedding,
}


def rule_for(module: nn.Module) -> type[DPLayer] | None:
    """The rule for this module, if its class is one of ours or a subclass that keeps our forward."""
    for cls in type(module).__mro__:
        if cls in RULES:
            return RULES[cls] if type(module).forward is cls.forward else None
    return None


__all__ = ["RULES", "DPLayer", "rule_for"]
