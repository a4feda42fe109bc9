"""One training step of a workload, four ways: the variants every step benchmark compares.

  nonprivate    plain SGD on the same trainable set (the limit)
  opacus_hooks  opacus.PrivacyEngine, grad_sample_mode="hooks" (per-sample gradients materialised)
  opacus_ghost  opacus.PrivacyEngine, grad_sample_mode="ghost" (ghost norms, two backward passes)
  ours          dpkernels.PrivacyEngine (one backward pass, fused norms and clipped sums), backend "auto"
  ours_triton, ours_cuda   the same with one kernel backend forced (GPU only: GPU_VARIANTS)
  ours_tf32x3   ours_triton with DPK_TRITON_FP32_DOT=tf32x3 (fp32 dots on tensor cores, 3xTF32) during its steps

All use the same noise multiplier, clipping norm, learning rate and fixed batch (poisson_sampling=False,
so every step sees the same B rows: timing stability). A step is forward, backward, optimizer step and
zero_grad(set_to_none=True), so gradients never outlive the step in any variant. With `autocast` (e.g.
torch.bfloat16), every variant runs its forward and loss under torch.autocast, as GPU training does.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.models import PerSampleMSE, Workload

VARIANTS = ("nonprivate", "opacus_hooks", "opacus_ghost", "ours")
GPU_VARIANTS = (*VARIANTS, "ours_triton", "ours_cuda", "ours_tf32x3")
BACKEND_OF = {"ours": "auto", "ours_triton": "triton", "ours_cuda": "cuda", "ours_tf32x3": "triton"}
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
LR = 1e-3


class VariantUnavailable(Exception):
    """A package this variant needs is not installed (the caller skips, saying which)."""


def missing_requirement(variant: str) -> str | None:
    """Why `variant` cannot run here, or None. Only absence counts: a broken install still raises."""
    if variant.startswith("opacus") and importlib.util.find_spec("opacus") is None:
        return "opacus is not installed"
    if variant.startswith("ours") and importlib.util.find_spec("dpkernels.engine") is None:
        return "dpkernels.engine does not exist yet (dpkernels.PrivacyEngine not landed)"
    if BACKEND_OF.get(variant) == "triton" and importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if variant == "ours_cuda":
        from dpkernels import ops

        if not ops.extension_has("cuda"):
            return "the extension was built without its CUDA kernels"
    return None


def _loader(w: Workload) -> DataLoader:
    # Only its length and batch size matter (expected batch size = len(dataset) / len(loader)):
    # the step itself reuses the fixed batch already on the device.
    return DataLoader(TensorDataset(*(t.cpu() for t in w.inputs), w.target.cpu()), batch_size=w.batch_size)


@contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    """os.environ[name] = value inside the block (None: unchanged)."""
    saved = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def make_step(variant: str, w: Workload, autocast: torch.dtype | None = None) -> Callable[[], float]:
    """Set `w.model` up for `variant` (in place, so build a fresh workload per variant); return its step.

    Args:
        variant: one of GPU_VARIANTS (VARIANTS on a CPU).
        w: a fresh workload (benchmarks.models.build).
        autocast: run forward and loss under torch.autocast with this dtype (None: the model's dtype).
    """
    reason = missing_requirement(variant)
    if reason is not None:
        raise VariantUnavailable(f"{variant}: {reason}")
    params = w.trainable()
    optimizer = torch.optim.SGD(params, lr=LR)
    criterion = PerSampleMSE()
    model = w.model
    sync = torch.cuda.synchronize if w.target.is_cuda else (lambda: None)

    if variant == "nonprivate":
        pass
    elif variant in ("opacus_hooks", "opacus_ghost"):
        import opacus

        engine = opacus.PrivacyEngine(accountant="rdp")
        mode = variant.removeprefix("opacus_")
        private = engine.make_private(
            module=model, optimizer=optimizer, criterion=criterion, data_loader=_loader(w),
            noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM, poisson_sampling=False,
            grad_sample_mode=mode,
        )
        if mode == "ghost":  # ghost returns a wrapped criterion whose backward() runs both passes
            model, optimizer, criterion, _ = private
        else:
            model, optimizer, _ = private
    elif variant in BACKEND_OF:
        from dpkernels import PrivacyEngine

        engine = PrivacyEngine(accountant="rdp")
        model, optimizer, _ = engine.make_private(
            module=model, optimizer=optimizer, data_loader=_loader(w),
            noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM, poisson_sampling=False,
            backend=BACKEND_OF[variant],
        )
    else:
        raise ValueError(f"unknown variant {variant!r}; expected one of {GPU_VARIANTS}")

    inputs, target = w.inputs, w.target
    device_type = target.device.type
    fp32_dot = "tf32x3" if variant == "ours_tf32x3" else None

    def step() -> float:
        with _env("DPK_TRITON_FP32_DOT", fp32_dot):
            with torch.autocast(device_type, dtype=autocast or torch.float32, enabled=autocast is not None):
                loss = criterion(model(*inputs), target)
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return float(loss.detach())

    return step
