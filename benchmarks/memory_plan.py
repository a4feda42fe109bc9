"""Scale on paper: per trainable layer of a diffusers UNet, what DP-SGD costs in FLOPs and memory (issue 20, item 5).

    python -m benchmarks.memory_plan --unet-config benchmarks/configs/sd15_unet.json --resolution 512 \
        --trainable attention|lora|all [--lora-rank 8] [--batch B] [--dtype fp32|bf16] [--json out.json]

The UNet is built on the meta device (no weights are allocated: SD 1.5's 3.4 GB never exist) and its trainable
set is chosen by `dpldm.trainable.select_trainable`, on a stand-in for dpldm's model whose context is the text
encoder's (77 x 768 for SD 1.5; the encoder is frozen and outside the plan) or, with --num-classes, on dpldm's own
class-conditional model. The layers the engine takes over are `dpkernels.engine.private_modules`, and each linear
or convolution's norm method is `dpkernels.ops.choose_strategy` on its (T, d, p), as the engine picks it.

One forward pass on meta tensors gives every layer's shapes and, through `saved_tensors_hooks`, every tensor
autograd saves for the backward pass (deduplicated by storage; weights and the batch itself are counted apart).
Attention runs as FlashAttention does (q, k, v, output and log-sum-exp saved, no T x T matrix), which is what
torch's CPU kernel and the GPU's flash / memory-efficient kernels keep; on meta tensors torch would otherwise take
the math path, which saves the attention matrix.

A step is followed moment by moment, each moment holding bytes per example (times B) and bytes per run. The
backward pass runs in reverse forward order: a saved tensor is freed once the earliest node that saved it has
run, and each variant adds what it keeps:
  nonprivate    autograd's weight gradients, layer by layer (per run); the peak per example is every saved
                activation, at the start of the backward pass;
  ours          no weight gradient in the backward pass; each private linear/conv keeps its input A and its
                output gradient G (T x p) to the step; norm layers keep [C] per-example rows and, during their
                backward, hold their normalised input as a temporary. At the step: every layer's norms with all
                (A, G) held (a k x k convolution unfolds A, T x Cin k k, and the kernels copy non-contiguous
                token views), then each layer's clipped sum in forward order, its (A, G) freed after it, the fp32
                sums growing to the parameters' size. The ghost and direct kernels themselves use bounded tiles:
                no T x T matrix and no p x d per-sample gradient;
  opacus_hooks  autograd's weight gradients as nonprivate, plus per-sample gradients of every trainable parameter
                (numel per example) to the step, then summed_grad beside them; during the backward pass a
                convolution's unfolded input and a norm layer's recomputed normalisation are temporaries.
Fixed: the weights (all, in --dtype) and the optimizer state (Adam: two per trainable parameter, in its dtype).
The largest batch is the largest B whose peak (fixed + B x batch + the largest moment) fits in --memory-gib.
Not counted: gradients in flight in the backward pass (the gradient of the current activation), forward
temporaries that are not saved, the optimizer's temporaries, allocator fragmentation and caching, the CUDA context
and library workspaces, the VAE and the text encoder (their outputs are the batch). The CPU check (--measure-cpu)
measures a real step at a reduced size and prints it beside the prediction.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
CONTEXT_TOKENS = 77  # CLIP's text context: SD 1.5's encoder_hidden_states are [B, 77, 768]
VAE_FACTOR = 8  # SD's VAE downsamples 8x: 512 px -> 64 x 64 latents
GIB = 2**30
VARIANTS = ("nonprivate", "ours", "opacus_hooks")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# --- building the model -----------------------------------------------------------------------------------------
class TextConditionedUNet(nn.Module):
    """A bare UNet2DConditionModel in the shape `dpldm.trainable` expects (`.unet`, `.class_embedder`).

    SD 1.5 is conditioned on a frozen text encoder's output, so the class embedder is an empty module: selecting
    it trains nothing, and `select_trainable`'s logic is used as it is.

    Args:
        unet: the diffusers UNet2DConditionModel.
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.class_embedder = nn.Module()  # no parameters: the text encoder is outside the model

    def forward(self, z: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The predicted noise.

        Args:
            z: noisy latents [B, C, H, W].
            t: timesteps [B].
            context: the text encoder's output [B, tokens, cross_attention_dim].

        Returns:
            eps, the shape of z.
        """
        return self.unet(z, t, encoder_hidden_states=context, return_dict=False)[0]


def load_unet_config(path: str | Path, block_out_channels: list[int] | None = None,
                     cross_attention_dim: int | None = None) -> dict[str, Any]:
    """A UNet2DConditionModel config from a JSON file (diffusers' `config.json`), optionally narrowed.

    Args:
        path: the JSON file.
        block_out_channels: replaces the config's (a reduced size of the same architecture).
        cross_attention_dim: replaces the config's.

    Returns:
        The config, without diffusers' private `_` keys.
    """
    cfg = {k: v for k, v in json.loads(Path(path).read_text()).items() if not k.startswith("_")}
    if block_out_channels is not None:
        if len(block_out_channels) != len(cfg["block_out_channels"]):
            raise ValueError(f"--block-out-channels needs {len(cfg['block_out_channels'])} values")
        cfg["block_out_channels"] = list(block_out_channels)
    if cross_attention_dim is not None:
        cfg["cross_attention_dim"] = cross_attention_dim
    return cfg


def build_model(unet_config: dict[str, Any], trainable: str, *, lora_rank: int = 8, ablation: int = 1,
                num_classes: int | None = None, device: str = "meta", dtype: torch.dtype = torch.float32,
                seed: int = 0) -> nn.Module:
    """The UNet (text-conditioned, or dpldm's class-conditional model) with dpldm's trainable set selected.

    Args:
        unet_config: UNet2DConditionModel's arguments.
        trainable: "attention", "lora" or "all" (`dpldm.trainable.MODES`).
        lora_rank: LoRA rank for "lora".
        ablation: DP-LDM's ablation index for "attention" (1: every transformer block trains).
        num_classes: None: text context (TextConditionedUNet); else dpldm's ConditionalUNet with this many classes.
        device: "meta" (nothing allocated) or a real device.
        dtype: the parameters' dtype.
        seed: initialisation seed on a real device.

    Returns:
        The model, trainable parameters marked.
    """
    from diffusers import UNet2DConditionModel

    from dpldm.trainable import select_trainable

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(unet_config)
        if num_classes is None:
            model: nn.Module = TextConditionedUNet(unet)
        else:
            from dpldm.models import ClassEmbedder, ConditionalUNet

            model = ConditionalUNet(unet, ClassEmbedder(num_classes, unet_config["cross_attention_dim"]))
    model.to(dtype)  # before LoRA: peft puts the adapters on the base layer's device and dtype
    select_trainable(model, trainable, ablation=ablation, lora_rank=lora_rank)
    return model


def example_inputs(model: nn.Module, unet_config: dict[str, Any], resolution: int, batch: int, *,
                   device: str = "meta", dtype: torch.dtype = torch.float32, context_tokens: int = CONTEXT_TOKENS,
                   seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A diffusion batch for `model`: latents, timesteps, and the text context or class labels.

    Args:
        model: what `build_model` returned.
        unet_config: its UNet config.
        resolution: image side in pixels (latents are resolution / 8).
        batch: examples.
        device: where the tensors live.
        dtype: the latents' and context's dtype.
        context_tokens: text tokens of the context (ignored for a class-conditional model).
        seed: the values' seed (meta tensors have none).

    Returns:
        model(*inputs)'s arguments.
    """
    if resolution % VAE_FACTOR:
        raise ValueError(f"--resolution must be a multiple of {VAE_FACTOR}")
    side = resolution // VAE_FACTOR
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, unet_config["in_channels"], side, side, generator=gen).to(device, dtype)
    t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    if isinstance(model, TextConditionedUNet):
        ctx = torch.randn(batch, context_tokens, unet_config["cross_attention_dim"], generator=gen).to(device, dtype)
        return z, t, ctx
    return z, t, torch.randint(0, model.class_embedder.num_classes, (batch,), generator=gen).to(device)


# --- tracing one forward pass ------------------------------------------------------------------------------------
@dataclass
class LayerCall:
    """One private layer's forward call, as the trace saw it."""

    name: str
    module: nn.Module
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_contiguous: bool
    in_key: int  # storage of its input: what the engine keeps as A
    start: int  # saves before its forward
    end: int  # saves after its forward


@dataclass
class Trace:
    """What one forward pass (batch 1) saved for backward, and the private layers' calls."""

    calls: list[LayerCall]
    saved: dict[int, tuple[int, int]]  # storage -> (position of its first save, bytes)
    positions: int  # saves recorded
    input_bytes: int  # the batch itself (latents, context), per example
    weight_bytes: int
    backend: str  # the attention kernel autograd saved for


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


_SDPA = F.scaled_dot_product_attention  # torch's own, whatever the patch below does


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention as FlashAttention saves for backward (q, k, v, out, logsumexp)."""
    if attn_mask is not None or dropout_p or enable_gqa:
        return _SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                     enable_gqa=enable_gqa)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, is_causal,
                                                                      scale=scale)[0]


@contextmanager
def _flash_attention_on_meta(model: nn.Module) -> Iterator[str]:
    """On meta tensors torch takes SDPA's math path (it saves the T x T attention matrix); route it through the
    flash kernel's op, whose meta kernel saves what the CPU and GPU flash kernels save."""
    on_meta = next(model.parameters()).device.type == "meta"
    if not on_meta:
        yield "as torch dispatches"
        return
    with mock.patch.object(F, "scaled_dot_product_attention", _flash_sdpa):
        yield "flash (q, k, v, out, logsumexp)"


def trace(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Trace:
    """Run one forward pass and record what autograd saves and every private layer's call.

    Args:
        model: the model, trainable set selected (meta or real tensors).
        inputs: a batch of ONE example (everything recorded is per example).

    Returns:
        The trace.
    """
    from dpkernels.engine import private_modules

    if inputs[0].shape[0] != 1:
        raise ValueError("trace one example: everything it records is per example")
    weights = {_storage_key(t) for t in [*model.parameters(), *model.buffers()]}
    batch = {_storage_key(t): t.untyped_storage().nbytes() for t in inputs}
    saved: dict[int, tuple[int, int]] = {}
    keep: list[torch.Tensor] = []  # saved tensors stay alive (their keys unique) until the trace is read
    inputs_seen: list[torch.Tensor] = []  # so do the layers' inputs (an unsaved one's key must not be reused)
    calls: list[LayerCall] = []
    starts: dict[str, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in weights and key not in batch and key not in saved:
            saved[key] = (len(keep), t.untyped_storage().nbytes())
        keep.append(t)
        return t

    def pre_hook(name: str) -> Callable:
        def hook(m: nn.Module, args: tuple) -> None:
            starts[name] = len(keep)
        return hook

    def post_hook(name: str) -> Callable:
        def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            x = args[0]
            inputs_seen.append(x)
            calls.append(LayerCall(name, m, tuple(x.shape), tuple(out.shape), x.is_contiguous(), _storage_key(x),
                                   starts[name], len(keep)))
        return hook

    handles = []
    for name, m in private_modules(model):
        handles += [m.register_forward_pre_hook(pre_hook(name)), m.register_forward_hook(post_hook(name))]
    try:
        with _flash_attention_on_meta(model) as backend, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    del out
    return Trace(calls, saved, len(keep), sum(batch.values()),
                 sum(t.numel() * t.element_size() for t in model.parameters()), backend)


def step_flops(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    """FLOPs of one non-private step (forward, then backward to the trainable parameters), as torch's
    FlopCounterMode counts them: matrix products, convolutions and attention; elementwise work is not counted, nor
    FlashAttention's recomputation in its backward.

    Args:
        model: the model (meta tensors cost nothing).
        inputs: its batch.

    Returns:
        FLOPs.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(*inputs).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


# --- per layer ---------------------------------------------------------------------------------------------------
@dataclass
class LayerPlan:
    """One private layer: shapes, the engine's method, and per-example costs in FLOPs and bytes.

    kind: the module type; role: its name without block indices (rows of one role are summarised together).
    T: tokens (spatial positions, text tokens, or 1); d, p: in and out features of the linear the engine sees
    (a convolution per group: d = Cin/g k k, p = Cout/g; a norm layer: d = p = C). method: "ghost" or "direct"
    (choose_strategy), "rows" (norm layers' [C] per-example gradients), "embedding", "bias".
    FLOPs per example: wgrad = the weight-gradient GEMM that non-private training runs (ours runs it as the
    clipped sum); norm = ours' per-sample norm; opacus = what Opacus hooks adds (per-sample gradients, norms,
    clipping). Bytes per example: kept = ours (G, or [C] rows) kept to the step; opacus_kept = per-sample
    gradients; *_transient = temporaries alive while one layer is processed.
    """

    name: str
    role: str
    kind: str
    params: int
    T: int
    d: int
    p: int
    groups: int
    method: str
    wgrad_flops: int
    norm_flops: int
    opacus_flops: int
    kept_bytes: int
    opacus_kept_bytes: int
    bwd_transient_bytes: int
    step_transient_bytes: int
    opacus_transient_bytes: int
    keeps_input: bool = field(default=False, repr=False)


_CONTAINERS = {"unet", "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "attentions", "resnets"}
_INDEXED = {"down_blocks", "up_blocks", "attentions", "resnets", "transformer_blocks", "downsamplers", "upsamplers"}


def role_of(name: str) -> str:
    """A layer's role: its name without the blocks it sits in and their indices (e.g. "attn1.to_q", "ff.net.2",
    "attentions.proj_in", "resnets.conv1", "attn1.to_q.lora_A" for a LoRA adapter).

    Args:
        name: the module's name in the model.

    Returns:
        The role.
    """
    parts = name.split(".")
    keep = []
    for i, part in enumerate(parts):
        if part.isdigit() and i and parts[i - 1] in _INDEXED:
            continue
        if part in _CONTAINERS or part == "default":  # peft's adapter name
            continue
        keep.append(part)
    role = ".".join(keep)
    if "resnets" in parts:
        return f"resnets.{role}"
    # the Transformer2DModel's own GroupNorm and projections (its transformer blocks' layers have their own names)
    return f"attentions.{role}" if "attentions" in parts and "transformer_blocks" not in parts else role


def _linear_costs(T: int, d: int, p: int, g: int, bias: bool, weight: bool) -> dict[str, Any]:
    """Norm method and FLOPs per example of a linear (g groups of T x d -> T x p), as the engine computes it."""
    from dpkernels.ops import choose_strategy

    numel = g * ((d * p if weight else 0) + (p if bias else 0))
    bias_flops = g * T * p if bias else 0
    if not weight:
        method, norm = "bias", bias_flops
    else:
        method = choose_strategy(T, d, p)
        # ghost: Gram tiles i <= j of A A^T and G G^T (2 flops per multiply-add, half the T x T grid);
        # direct: the p x d product tile by tile
        norm = g * (T * T * (d + p) if method == "ghost" else 2 * T * d * p) + bias_flops
    wgrad = g * 2 * T * d * p * weight + bias_flops
    return {"method": method, "wgrad_flops": wgrad, "norm_flops": norm,
            "opacus_flops": wgrad + 4 * numel, "params": numel}


def layer_plan(call: LayerCall, elt: int) -> LayerPlan:
    """The plan of one private layer from its traced call.

    Args:
        call: the layer's forward call (batch 1).
        elt: bytes per activation element.

    Returns:
        Its LayerPlan.
    """
    m = call.module
    trains = {n: getattr(m, n) is not None and getattr(m, n).requires_grad for n in ("weight", "bias")
              if hasattr(m, n)}
    kind = type(m).__name__
    out_numel = math.prod(call.out_shape[1:])
    in_numel = math.prod(call.in_shape[1:])
    if isinstance(m, nn.Linear):
        T, d, p, g = in_numel // m.in_features, m.in_features, m.out_features, 1
        c = _linear_costs(T, d, p, 1, trains.get("bias", False), trains["weight"])
        # ours keeps G; at the step a non-contiguous input is copied by the kernels
        kept, step_tmp = out_numel * elt, (0 if call.in_contiguous else in_numel * elt)
        op_kept, op_tmp, bwd_tmp = c["params"] * elt, 0, 0
    elif isinstance(m, nn.Conv2d):
        g, (kh, kw) = m.groups, m.kernel_size
        T, d, p = math.prod(call.out_shape[2:]), m.in_channels // g * kh * kw, m.out_channels // g
        c = _linear_costs(T, d, p, g, trains.get("bias", False), trains["weight"])
        unfolded = g * T * d * elt
        one_by_one = (kh, kw) == (1, 1) and m.stride == (1, 1) and m.padding in ((0, 0), "valid")
        # 1x1: the token view of A and G is transposed, the kernels copy both; k x k: F.unfold, then that copy
        kept = out_numel * elt
        step_tmp = (in_numel * elt if one_by_one else 2 * unfolded) + out_numel * elt
        op_kept, op_tmp, bwd_tmp = c["params"] * elt, in_numel * elt + unfolded, 0  # Opacus pads and unfolds
    elif isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
        C = m.num_channels if isinstance(m, nn.GroupNorm) else math.prod(m.normalized_shape)
        T, d, p, g = in_numel // C, C, C, 1
        n_par = sum(C for v in trains.values() if v)
        c = {"method": "rows", "params": n_par, "wgrad_flops": 3 * T * C,
             "norm_flops": 5 * T * C + 2 * n_par, "opacus_flops": 8 * T * C + 4 * n_par}
        kept, step_tmp = n_par * 4, 0  # [C] fp32 rows per parameter
        # ours: (x - mean) * rstd in fp32 at backward (LayerNorm: plus the kernels' copies of the transposed views)
        bwd_tmp = 8 * in_numel if isinstance(m, nn.GroupNorm) else (8 + elt) * in_numel
        op_kept, op_tmp = n_par * elt, 2 * in_numel * elt  # Opacus recomputes the normalisation
    elif isinstance(m, nn.Embedding):
        T, d, p, g = in_numel, m.num_embeddings, m.embedding_dim, 1
        n_par = m.weight.numel()
        c = {"method": "embedding", "params": n_par, "wgrad_flops": T * p, "norm_flops": 2 * T * T * p,
             "opacus_flops": T * p + 4 * n_par}
        kept, step_tmp, bwd_tmp = out_numel * elt, 0, 0
        op_kept, op_tmp = n_par * elt, 0  # Opacus' embedding gradient per sample is the whole table
    else:
        raise TypeError(f"{call.name}: no plan for {kind}")
    return LayerPlan(call.name, role_of(call.name), kind, c["params"], T, d, p, g, c["method"], c["wgrad_flops"],
                     c["norm_flops"], c["opacus_flops"], kept, op_kept, bwd_tmp, step_tmp, op_tmp,
                     keeps_input=c["method"] in ("ghost", "direct"))


# --- per variant -------------------------------------------------------------------------------------------------
Moment = tuple[int, int]  # (bytes per example, bytes per run) live at one moment of a step, above the fixed part


def _backward(tr: Trace, kept_keys: set[int], extra: list[int], transient: list[int], grads: list[int]
              ) -> list[Moment]:
    """The moments of the backward pass, taken in reverse forward order.

    Args:
        tr: the trace.
        kept_keys: storages the variant keeps to the step (never freed in the backward pass).
        extra: per example, what each layer adds when its backward runs and keeps to the step.
        transient: per example, what each layer needs while its backward runs.
        grads: per run, the weight gradients autograd writes at each layer's backward (0 for ours).

    Returns:
        (per example, per run) at every state of the pass and inside every layer's backward.
    """
    n = tr.positions
    freed_at = [0] * (n + 1)  # bytes whose last user (in backward order) sits at this position
    kept = 0
    for key, (first, nbytes) in tr.saved.items():
        if key in kept_keys:
            kept += nbytes
        else:
            freed_at[first] += nbytes
    # state k: the nodes at positions >= k have run backward. Live: saves first made before k (their last user
    # has not run), the kept storages, and what the layers that already ran added (G_i, grads at state end_i)
    below = [0] * (n + 1)
    for k in range(n):
        below[k + 1] = below[k] + freed_at[k]
    added, added_run = [0] * (n + 1), [0] * (n + 1)
    for call, e, g in zip(tr.calls, extra, grads):
        added[call.end] += e
        added_run[call.end] += g
    moments: list[Moment] = [(0, 0)] * (n + 1)
    per_ex, per_run = 0, 0
    for k in range(n, -1, -1):
        per_ex, per_run = per_ex + added[k], per_run + added_run[k]
        moments[k] = (below[k] + kept + per_ex, per_run)
    # inside a layer's backward: its own saves still live, its G added, its temporaries too
    return moments + [(moments[c.end][0] + t, moments[c.end][1]) for c, t in zip(tr.calls, transient) if t]


def _ours_step(tr: Trace, layers: list[LayerPlan], elt: int) -> list[Moment]:
    """The moments of ours' step: every layer's norms with all (A, G) kept, then its clipped sum layer by layer
    in forward order (the engine frees a layer's A, G once its sum is taken; sums accumulate in fp32).

    Args:
        tr: the trace.
        layers: the plans of tr.calls.
        elt: bytes per element of the model's dtype.

    Returns:
        (per example, per run) moments.
    """
    a_bytes = {k: tr.saved[k][1] for k in _kept_inputs(tr, layers) if k in tr.saved}
    last_user = {c.in_key: i for i, (c, lp) in enumerate(zip(tr.calls, layers)) if lp.keeps_input}
    kept = sum(a_bytes.values()) + sum(lp.kept_bytes for lp in layers)
    moments = [(kept + lp.step_transient_bytes, 0) for lp in layers]
    sums = 0
    for i, (c, lp) in enumerate(zip(tr.calls, layers)):
        sums += lp.params * 4
        moments.append((kept + lp.step_transient_bytes, sums))
        kept -= lp.kept_bytes + (a_bytes.get(c.in_key, 0) if last_user.get(c.in_key) == i else 0)
    moments.append((kept, sums + (sum(lp.params for lp in layers) * elt if elt != 4 else 0)))  # p.grad cast
    return moments


def _kept_inputs(tr: Trace, layers: list[LayerPlan]) -> set[int]:
    """The storages of the inputs A that ours keeps to the step (private linears and convolutions)."""
    return {c.in_key for c, lp in zip(tr.calls, layers) if lp.keeps_input}


@dataclass
class VariantPlan:
    """One variant's memory: peak(B) = fixed + B * batch + max over the step's moments of (B * per example +
    per run), and the largest B whose peak fits in the budget.
    """

    variant: str
    fixed_bytes: int  # weights and optimizer state: held across steps
    batch_bytes: int  # the batch itself (latents, context), per example
    per_example_bytes: int  # the largest per-example part of any moment, with the batch
    max_batch: int
    moments: list[Moment] = field(repr=False)

    def step_bytes(self, batch: int) -> int:
        """What a step allocates above the fixed part and the batch (peak_memory's quantity).

        Args:
            batch: examples.

        Returns:
            Bytes.
        """
        return max(batch * e + r for e, r in self.moments)

    def peak_bytes(self, batch: int) -> int:
        """The whole peak: weights, optimizer state, the batch and the step.

        Args:
            batch: examples.

        Returns:
            Bytes.
        """
        return self.fixed_bytes + batch * self.batch_bytes + self.step_bytes(batch)


def _largest_batch(v: VariantPlan, budget: int) -> int:
    """The largest B with v.peak_bytes(B) <= budget (the peak is a max of lines in B: the tightest one decides)."""
    room = budget - v.fixed_bytes
    if any(r > room for _, r in v.moments):
        return 0
    return min((room - r) // (e + v.batch_bytes) for e, r in v.moments)


def variant_plans(tr: Trace, layers: list[LayerPlan], *, elt: int, optimizer: str, budget: int) -> list[VariantPlan]:
    """Memory of each variant (VARIANTS) and its largest batch in `budget` bytes.

    Args:
        tr: the trace.
        layers: the plans of tr.calls.
        elt: bytes per element of the model's dtype.
        optimizer: "adam" (two states per trainable parameter, in its dtype, as torch's) or "sgd" (none).
        budget: bytes of device memory.

    Returns:
        One VariantPlan per variant.
    """
    n_train = sum(lp.params for lp in layers)
    fixed = tr.weight_bytes + (2 * n_train * elt if optimizer == "adam" else 0)
    zeros = [0] * len(layers)
    grads = [lp.params * elt for lp in layers]  # autograd's weight gradients, written at each layer's backward
    opacus_bwd = _backward(tr, set(), [lp.opacus_kept_bytes for lp in layers],
                           [lp.opacus_transient_bytes for lp in layers], grads)
    gs = sum(lp.opacus_kept_bytes for lp in layers)
    moments = {
        "nonprivate": _backward(tr, set(), zeros, zeros, grads),
        "ours": _backward(tr, _kept_inputs(tr, layers), [lp.kept_bytes for lp in layers],
                          [lp.bwd_transient_bytes for lp in layers], zeros) + _ours_step(tr, layers, elt),
        # the step: clipped sums (summed_grad) beside the gradients, per-sample gradients still held
        "opacus_hooks": opacus_bwd + [(gs, 2 * n_train * elt)],
    }
    plans = []
    for v in VARIANTS:
        per = max(e for e, _ in moments[v]) + tr.input_bytes
        plan = VariantPlan(v, fixed, tr.input_bytes, per, 0, moments[v])
        plan.max_batch = _largest_batch(plan, budget)
        plans.append(plan)
    return plans


def make_plan(unet_config: dict[str, Any], resolution: int, trainable: str, *, lora_rank: int = 8,
              ablation: int = 1, num_classes: int | None = None, dtype: str = "fp32", optimizer: str = "adam",
              budget_gib: float = 80.0, context_tokens: int = CONTEXT_TOKENS) -> dict[str, Any]:
    """The whole plan: the model on the meta device, one traced example, every private layer and every variant.

    Args:
        unet_config: UNet2DConditionModel's arguments.
        resolution: image side in pixels.
        trainable: "attention", "lora" or "all".
        lora_rank: LoRA rank.
        ablation: DP-LDM's ablation index.
        num_classes: None for a text context, else a class-conditional model.
        dtype: "fp32" or "bf16" (weights, activations, per-sample gradients).
        optimizer: "adam" or "sgd".
        budget_gib: device memory, GiB.
        context_tokens: text tokens.

    Returns:
        {"setup": ..., "layers": [LayerPlan], "variants": [VariantPlan], "trace": Trace}.
    """
    torch_dtype = DTYPES[dtype]
    model = build_model(unet_config, trainable, lora_rank=lora_rank, ablation=ablation, num_classes=num_classes,
                        device="meta", dtype=torch_dtype)
    inputs = example_inputs(model, unet_config, resolution, 1, device="meta", dtype=torch_dtype,
                            context_tokens=context_tokens)
    tr = trace(model, inputs)
    flops = step_flops(model, inputs)
    elt = torch.tensor([], dtype=torch_dtype).element_size()
    layers = [layer_plan(c, elt) for c in tr.calls]
    variants = variant_plans(tr, layers, elt=elt, optimizer=optimizer, budget=int(budget_gib * GIB))
    setup = {
        "resolution": resolution, "latent": [unet_config["in_channels"], *inputs[0].shape[2:]],
        "context": list(inputs[2].shape[1:]) if inputs[2].dim() == 3 else "class label",
        "trainable": trainable, "lora_rank": lora_rank if trainable == "lora" else None, "dtype": dtype,
        "optimizer": optimizer, "budget_gib": budget_gib, "block_out_channels": unet_config["block_out_channels"],
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "activations_per_example": sum(nb for _, nb in tr.saved.values()), "attention_saves": tr.backend,
        "step_flops_per_example": flops,
        "ours_kept_inputs": sum(nb for k, (_, nb) in tr.saved.items() if k in _kept_inputs(tr, layers)),
        "ours_kept_grads": sum(lp.kept_bytes for lp in layers),
        "opacus_grad_samples": sum(lp.opacus_kept_bytes for lp in layers),
    }
    return {"setup": setup, "layers": layers, "variants": variants, "trace": tr}


# --- printing ----------------------------------------------------------------------------------------------------
def _h(n: float) -> str:
    """A byte count, readable."""
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _f(n: float) -> str:
    """A FLOP count, readable."""
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{int(n)}"


_SUMS = ("params", "wgrad_flops", "norm_flops", "opacus_flops", "kept_bytes", "opacus_kept_bytes")


def _values(xs: list[int]) -> str:
    """Distinct values, in order: "320" or "320, 768"."""
    return ", ".join(str(x) for x in dict.fromkeys(xs))


def summarise(layers: list[LayerPlan], by: str = "level") -> list[dict[str, Any]]:
    """Layers summarised: count and per-example totals per row.

    Args:
        layers: the layer plans.
        by: "level": one row per (T, kind, method), its d and p listed (the compact table: per block type at each
            resolution); "role": one row per (role, kind, T, d, p, method).

    Returns:
        Rows, by level from the most tokens down, else in forward order ("role" holds the roles merged into a row).
    """
    if by not in ("level", "role"):
        raise ValueError(f"summarise by 'level' or 'role', not {by!r}")
    groups: dict[tuple, list[LayerPlan]] = {}
    for lp in layers:
        key = (lp.T, lp.kind, lp.method) if by == "level" else (lp.role, lp.kind, lp.T, lp.d, lp.p, lp.groups, lp.method)
        groups.setdefault(key, []).append(lp)
    rows = []
    for members in groups.values():
        first = members[0]
        row = {"role": _values([lp.role for lp in members]), "kind": first.kind, "T": first.T,
               "d": _values([lp.d for lp in members]), "p": _values([lp.p for lp in members]),
               "groups": max(lp.groups for lp in members), "method": first.method, "count": len(members)}
        row.update({k: sum(getattr(lp, k) for lp in members) for k in _SUMS})
        rows.append(row)
    return sorted(rows, key=lambda r: -r["T"]) if by == "level" else rows


def format_rows(rows: list[dict[str, Any]], with_count: bool, roles: bool = True) -> str:
    """A markdown table of layers (or summary rows).

    Args:
        rows: LayerPlan dicts (asdict) or `summarise` rows.
        with_count: a count column (summary rows).
        roles: a column naming the layers (summary rows by level may leave it out: it is long).

    Returns:
        The table.
    """
    head = [*(["layer" if not with_count else "role"] if roles else []), "kind", *(["n"] if with_count else []),
            "T", "d", "p", "method", "params", "wgrad FLOPs/ex", "ours norm FLOPs/ex", "Opacus extra FLOPs/ex",
            "ours keeps G (norms: rows)/ex", "Opacus per-sample grads/ex"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        g = f" (x{r['groups']} groups)" if r["groups"] > 1 else ""
        cells = [*([r["role"] if with_count else r["name"]] if roles else []), r["kind"],
                 *([str(r["count"])] if with_count else []), str(r["T"]), str(r["d"]) + g, str(r["p"]), r["method"],
                 f"{r['params']:,}", _f(r["wgrad_flops"]), _f(r["norm_flops"]), _f(r["opacus_flops"]),
                 _h(r["kept_bytes"]), _h(r["opacus_kept_bytes"])]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def format_totals(plan: dict[str, Any]) -> str:
    """Totals over the layers, and each variant's memory and largest batch.

    Args:
        plan: what `make_plan` returned.

    Returns:
        Markdown.
    """
    layers, s = plan["layers"], plan["setup"]
    methods: dict[str, int] = {}
    for lp in layers:
        methods[lp.method] = methods.get(lp.method, 0) + 1
    flops = {k: _f(sum(getattr(lp, k) for lp in layers)) for k in ("wgrad_flops", "norm_flops", "opacus_flops")}
    step = s["step_flops_per_example"]
    norms, opacus = sum(lp.norm_flops for lp in layers), sum(lp.opacus_flops for lp in layers)
    counts = ", ".join(f"{k} {v}" for k, v in methods.items())
    lines = [
        (f"private layers: {len(layers)} ({counts}); trainable parameters {s['trainable_params']:,} of "
         f"{s['params']:,}"),
        (f"FLOPs per example: the non-private step {_f(step)} (FlopCounterMode), of which weight-gradient GEMMs "
         f"{flops['wgrad_flops']}; ours adds its norms {flops['norm_flops']} (+{100 * norms / step:.1f}%), Opacus "
         f"hooks {flops['opacus_flops']} (+{100 * opacus / step:.1f}%)"),
        (f"per example: activations saved for backward {_h(s['activations_per_example'])} (attention saves: "
         f"{s['attention_saves']}); the batch {_h(plan['variants'][0].batch_bytes)}; ours keeps to the step "
         f"A {_h(s['ours_kept_inputs'])} + G {_h(s['ours_kept_grads'])}; Opacus' per-sample gradients "
         f"{_h(s['opacus_grad_samples'])}"),
        "",
        (f"| variant | weights + {s['optimizer']} state | peak at batch 1 | per example (largest) | "
         f"largest batch in {s['budget_gib']:g} GiB | peak there |"),
        "|---|---:|---:|---:|---:|---:|",
    ]
    for v in plan["variants"]:
        lines.append(f"| {v.variant} | {_h(v.fixed_bytes)} | {_h(v.peak_bytes(1))} | {_h(v.per_example_bytes)} | "
                     f"{v.max_batch} | {_h(v.peak_bytes(v.max_batch))} |")
    return "\n".join(lines)


def plan_json(plan: dict[str, Any]) -> dict[str, Any]:
    """The plan as JSON-able data.

    Args:
        plan: what `make_plan` returned.

    Returns:
        {"setup", "layers", "summary", "variants"}.
    """
    layers = [{k: v for k, v in asdict(lp).items() if k != "keeps_input"} for lp in plan["layers"]]
    return {"setup": plan["setup"], "layers": layers, "summary": summarise(plan["layers"], "role"),
            "variants": [{k: v for k, v in asdict(v).items() if k != "moments"} for v in plan["variants"]]}


# --- the CPU check -----------------------------------------------------------------------------------------------
def _threads() -> None:
    n = int(os.environ.get("DPLDM_THREADS", "0"))  # as dpldm: 1 on a machine shared with other jobs
    if n > 0:
        torch.set_num_threads(n)


def probe_step(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    """Peak memory of one real CPU step of `variant`, as `benchmarks.peak_memory.measure_cpu` measures it
    (persistent growth of RssAnon after a warm-up step + VmHWM over the next steps; run in a fresh process).

    Args:
        args: the CLI's arguments (model, resolution, batch).
        variant: one of VARIANTS.

    Returns:
        peak_memory's fields, and the variant.
    """
    from benchmarks.models import Workload
    from benchmarks.peak_memory import _reset_high_water_mark, _status_kib
    from benchmarks.step_variants import make_step

    _threads()
    cfg = _config(args)
    model = build_model(cfg, args.trainable, lora_rank=args.lora_rank, ablation=args.ablation,
                        num_classes=args.num_classes, device="cpu")
    inputs = example_inputs(model, cfg, args.resolution, args.batch, device="cpu", context_tokens=args.context_tokens)
    target = torch.randn_like(inputs[0])
    w = Workload("memory_plan", model, inputs, target, args.batch, "")
    step = make_step(variant, w)
    gc.collect()
    anon0 = _status_kib("RssAnon")
    step()
    gc.collect()
    persistent = max(0, _status_kib("RssAnon") - anon0)
    rss1 = _status_kib("VmRSS")
    _reset_high_water_mark()
    for _ in range(args.steps):
        step()
    transient = max(0, _status_kib("VmHWM") - rss1)
    return {"variant": variant, "peak_mem_bytes": (persistent + transient) * 1024,
            "persistent_bytes": persistent * 1024, "transient_bytes": transient * 1024,
            "threads": torch.get_num_threads()}


def measure_cpu(argv: list[str], variants: tuple[str, ...] = VARIANTS) -> list[dict[str, Any]]:
    """Each variant's real CPU step in a fresh interpreter (glibc returns freed tensors to the OS, as peak_memory).

    Args:
        argv: the CLI arguments that describe the model (without --measure-cpu).
        variants: which to run.

    Returns:
        `probe_step`'s result per variant.
    """
    from benchmarks.peak_memory import MMAP_THRESHOLD

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), MALLOC_TRIM_THRESHOLD_=str(MMAP_THRESHOLD))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out = []
    for v in variants:
        cmd = [sys.executable, "-m", "benchmarks.memory_plan", *argv, "--probe", v]
        proc = subprocess.run(cmd, check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"probe {v} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def predicted_step_bytes(plan: dict[str, Any], batch: int) -> dict[str, int]:
    """What a step allocates above the weights and the batch (peak_memory's quantity), by the plan, for SGD.

    Args:
        plan: `make_plan`'s result with optimizer="sgd" (the benchmark step's optimizer keeps no state).
        batch: examples.

    Returns:
        {variant: bytes}.
    """
    return {v.variant: v.step_bytes(batch) for v in plan["variants"]}


# --- CLI ---------------------------------------------------------------------------------------------------------
def _config(args: argparse.Namespace) -> dict[str, Any]:
    return load_unet_config(args.unet_config, args.block_out_channels, args.cross_attention_dim)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def parser() -> argparse.ArgumentParser:
    """The CLI's arguments.

    Returns:
        The parser.
    """
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--unet-config", required=True, help="a UNet2DConditionModel config.json")
    p.add_argument("--resolution", type=int, required=True, help="image side in pixels (latents: / 8)")
    p.add_argument("--trainable", choices=("attention", "lora", "all"), default="attention")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--ablation", type=int, default=1, help="DP-LDM's: the first i-1 transformer blocks stay frozen")
    p.add_argument("--num-classes", type=int, default=None,
                   help="class-conditional (dpldm's ClassEmbedder, one context token) instead of a text context")
    p.add_argument("--context-tokens", type=int, default=CONTEXT_TOKENS)
    p.add_argument("--block-out-channels", type=_ints, default=None, help="e.g. 32,64,128,128: a reduced size")
    p.add_argument("--cross-attention-dim", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="also print the memory at this batch")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--memory-gib", type=float, default=80.0, help="device memory for the largest batch")
    p.add_argument("--per-layer", action=argparse.BooleanOptionalAction, default=True,
                   help="print every layer (default), not only the summary")
    p.add_argument("--summary", choices=("level", "role"), default="level",
                   help="summary rows per (T, kind, method) (default) or per (role, shape, method)")
    p.add_argument("--json", type=Path, default=None, help="write the plan here")
    p.add_argument("--measure-cpu", action="store_true",
                   help="also measure one real CPU step per variant at --batch (fp32, SGD) and compare")
    p.add_argument("--steps", type=int, default=1, help="measured steps after the warm-up (--measure-cpu)")
    p.add_argument("--probe", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    """Print the plan (and, with --measure-cpu, the CPU comparison).

    Args:
        argv: the command line (default sys.argv[1:]).
    """
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.probe is not None:
        print(json.dumps(probe_step(args, args.probe)))
        return
    if args.measure_cpu and (args.batch is None or args.dtype != "fp32" or args.optimizer != "sgd"):
        raise SystemExit("--measure-cpu needs --batch, --dtype fp32 and --optimizer sgd (the benchmark step's)")
    plan = make_plan(_config(args), args.resolution, args.trainable, lora_rank=args.lora_rank,
                     ablation=args.ablation, num_classes=args.num_classes, dtype=args.dtype,
                     optimizer=args.optimizer, budget_gib=args.memory_gib, context_tokens=args.context_tokens)
    s = plan["setup"]
    print(f"# memory plan: {Path(args.unet_config).name}, channels {s['block_out_channels']}, {s['resolution']} px "
          f"(latents {s['latent']}), context {s['context']}, trainable {s['trainable']}"
          f"{f' (rank {args.lora_rank})' if args.trainable == 'lora' else ''}, {s['dtype']}\n")
    if args.per_layer:
        print(format_rows([asdict(lp) for lp in plan["layers"]], with_count=False) + "\n")
    print(format_rows(summarise(plan["layers"], args.summary), with_count=True, roles=args.summary == "role") + "\n")
    print(format_totals(plan))
    if args.batch is not None:
        print(f"\nat batch {args.batch}: " + ", ".join(
            f"{v.variant} {_h(v.peak_bytes(args.batch))}" for v in plan["variants"]))
    if args.json is not None:
        args.json.write_text(json.dumps(plan_json(plan), indent=1))
    if args.measure_cpu:
        model_argv = [a for a in argv if a != "--measure-cpu"]
        predicted = predicted_step_bytes(plan, args.batch)
        print(f"\nCPU check, batch {args.batch}: one step's memory above the weights and the batch (SGD)\n")
        print("| variant | predicted | measured | measured / predicted |\n|---|---:|---:|---:|")
        for r in measure_cpu(model_argv):
            pr = predicted[r["variant"]]
            print(f"| {r['variant']} | {_h(pr)} | {_h(r['peak_mem_bytes'])} | {r['peak_mem_bytes'] / pr:.2f} |")


if __name__ == "__main__":
    main()
