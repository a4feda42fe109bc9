"""Per-layer rules: how to get per-sample norms and clipped sums from (A, G). One module type per file.

Each rule is a `DPLayer` subclass registered for the module type it handles, beside its math (as Opacus'
`register_grad_sampler`):

    @register_layer(nn.Linear)
    class DPLinear(DPLayer): ...

Adding a layer type: a file here with a DPLayer subclass that sets `param_names` and defines `compute` (the forward,
and what the norms need), `input_grad`, `sq_norms` and `clipped_sums` (and `check_module` for configurations it
refuses, `on_grad` to reduce to small per-sample gradients early: see layernorm.py); decorate it with
`@register_layer(YourModule)`, import it below, and test it against Opacus (tests/test_engine_parity.py,
tests/test_layer_options.py). `LAYER_TYPES` lists what is registered; the engine refuses any other module with a
trainable parameter.
"""

# imported for their registration, in the order error messages list the supported types
from dpkernels.layers import linear, conv2d, layernorm, groupnorm, embedding  # noqa: F401, I001
from dpkernels.layers.base import LAYER_TYPES, DPLayer, register_layer, rule_for

__all__ = ["LAYER_TYPES", "DPLayer", "register_layer", "rule_for"]
