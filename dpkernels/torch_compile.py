"""`dpkernels.compile`: torch.compile for a private model, with the inductor options its DP step needs.

Inductor's peak-memory reordering pass (`reorder_for_peak_memory`, on by default) scheduled a kernel that
reads the result of a scatter (the nearest-neighbour Upsample's backward, an index_put into a new_zeros
buffer) before the scatter ran, on the tests' private diffusers UNet (torch 2.13, CPU): the mid block's
output gradient was all zeros and 45 of 105 private parameters got a wrong gradient. With the pass off the
step matches eager (2.9e-6 relative), and the layout optimisation (channels_last) stays on. The bug is
inductor's (the graph it is given is right: aot_eager is exact); this turns the pass off until it is fixed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dpkernels.layers import tap_ops

# what the private step needs from inductor; a user's own `options` entry wins (explicitly)
INDUCTOR_OPTIONS: dict[str, Any] = {"reorder_for_peak_memory": False}


def compile(model: nn.Module, *, backend: str = "inductor", options: dict[str, Any] | None = None,
            **kwargs: Any) -> nn.Module:
    """`torch.compile(model, ...)` for a model returned by `PrivacyEngine.make_private`.

    Compile the model (forward and backward); `optimizer.step()` stays eager. Each private layer becomes two
    opaque ops in one graph (no graph break per layer).

    Args:
        model: the private model (after `make_private`).
        backend: as torch.compile's; for "inductor", `INDUCTOR_OPTIONS` are added to `options`.
        options: inductor options, as torch.compile's; an entry given here overrides `INDUCTOR_OPTIONS`.
        **kwargs: passed to torch.compile (mode, dynamic, fullgraph, ...).

    Returns:
        The compiled module (torch.compile's result).
    """
    engines = {id(e): e for m in model.modules() if (e := getattr(m, "_dpkernels_engine", None)) is not None}
    if not engines:
        raise ValueError("dpkernels.compile: the model has no private layers: call PrivacyEngine.make_private "
                         "first, or use torch.compile for a non-private model")
    if backend == "inductor":
        import torch._inductor.config as inductor_config  # not at import: it loads inductor

        options = {**INDUCTOR_OPTIONS, **(options or {})}
        if not hasattr(inductor_config, "reorder_for_peak_memory"):  # older torch: the pass is absent
            options.pop("reorder_for_peak_memory")
    # no warning from the ops' fake kernels for these layers: what the backend needs is set
    tap_ops.mark_options_set(layer for e in engines.values() for layer in e.layers)
    return torch.compile(model, backend=backend, options=options or None, **kwargs)
