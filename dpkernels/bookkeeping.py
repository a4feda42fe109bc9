"""Book-keeping for one backward pass: every trainable layer's (A, G) of the current
physical batch, then clip factors and the clipped, noised sums.

Flat clipping: n_b = sqrt(sum over parameters of ||g_b||^2), c_b = min(1, C / (n_b + 1e-6)).
Per-layer clipping: the same per parameter, with its own threshold C_i.
With a mean-reduced loss, G carries a 1/rows factor: the true per-example gradient is
s * (G_b^T A_b) with s = number of examples in the physical batch, and the division by
the expected batch size E is folded into the clip factors and the noise std, so each
parameter's gradient is written by one fused pass.
"""

from __future__ import annotations

import torch
from torch import nn

from dpkernels.grouping import Grouping
from dpkernels.layers.base import DPLayer, Record
from dpkernels.noise import NoiseSource


class NonFiniteGradientError(FloatingPointError):
    """A per-sample gradient norm was NaN or infinite: the step is refused and no parameter changes."""


class Recorder:
    """Collects the records of the current physical batch as layers run forward."""

    def __init__(self):
        self.records: list[tuple[DPLayer, Record]] = []
        self.rows: int | None = None
        self.example_ids: torch.Tensor | None = None
        self.on_new_batch = None  # set by the optimizer: flushes a finished batch before a new one starts

    def new_record(self, layer: DPLayer, saved: dict, rows: int) -> Record:
        if self.records and any(r.has_grad for _, r in self.records) and self.on_new_batch:
            self.on_new_batch()  # forward after backward without a step: gradient accumulation
        if layer.record is not None:
            self.discard()
            raise RuntimeError(
                f"module '{layer.name}' was called twice in one forward pass: its per-sample gradients would be "
                "wrong. dpkernels supports each trainable module once per forward (run evaluation under "
                "torch.no_grad())."
            )
        if self.rows is None:
            self.rows = rows
        elif rows != self.rows:
            self.discard()
            raise RuntimeError(
                f"module '{layer.name}' got an input with {rows} rows but the batch has {self.rows}: "
                "dpkernels needs the batch as the first dimension of every trainable layer's input"
            )
        rec = Record(saved=saved, rows=rows)
        layer.record = rec
        self.records.append((layer, rec))
        return rec

    def take(self) -> tuple[list[tuple[DPLayer, Record]], int, torch.Tensor | None]:
        out = (self.records, self.rows or 0, self.example_ids)
        for layer, rec in self.records:
            layer.record = None
            rec.spent = True
        self.records, self.rows, self.example_ids = [], None, None
        return out

    def discard(self) -> None:
        """Drop the current batch's records (and their A, G): nothing of it reaches a step."""
        records, _, _ = self.take()
        for _, rec in records:
            rec.grad_out = None
            rec.saved.clear()
            rec.extra.clear()


class Clipper:
    """Turns the records of a physical batch into clipped (and, on the last one, noised) sums."""

    def __init__(self, layers: list[DPLayer], max_grad_norm: float | list[float], clipping: str, backend: str,
                 loss_reduction: str):
        self.layers = layers
        self.clipping = clipping
        self.backend = backend
        self.loss_reduction = loss_reduction
        self.keys = [(layer, name) for layer in layers for name in layer.trainable]
        for layer in layers:
            layer.backend = backend
        if clipping == "flat":
            if not isinstance(max_grad_norm, (int, float)):
                raise ValueError("flat clipping takes one max_grad_norm")
            self.thresholds = None
            self.total_norm = float(max_grad_norm)
        elif clipping == "per_layer":
            n = len(self.keys)
            if isinstance(max_grad_norm, (int, float)):
                # split C evenly so the sensitivity of the whole gradient stays C
                max_grad_norm = [float(max_grad_norm) / n**0.5] * n
            if len(max_grad_norm) != n:
                raise ValueError(f"per-layer clipping needs {n} thresholds (one per trainable parameter), "
                                 f"got {len(max_grad_norm)}")
            self.thresholds = dict(zip(self.keys, map(float, max_grad_norm)))
            self.total_norm = sum(c * c for c in max_grad_norm) ** 0.5
        else:
            raise ValueError(f"clipping must be 'flat' or 'per_layer', got {clipping!r}")
        for c in [self.total_norm] + list((self.thresholds or {}).values()):
            if not c > 0:
                raise ValueError(f"max_grad_norm must be positive, got {c}")

    def sums(self, records, rows: int, example_ids, scale: float, noise_std: float, noise: NoiseSource | None
             ) -> dict[nn.Parameter, torch.Tensor]:
        """Per parameter: scale * sum_b c_b g_b (+ N(0, noise_std^2) when noise is given) for the layers that ran."""
        done = [(layer, rec) for layer, rec in records if rec.has_grad]
        if not done:
            return {}
        for layer, rec in done:  # before anything is computed: a stale A would give a wrong clipped sum
            rec.check_unmodified(layer.name)
        grouping = Grouping(example_ids, rows)
        s = float(grouping.n) if self.loss_reduction == "mean" else 1.0
        sq = {layer: layer.sq_norms(rec, grouping, self.backend) for layer, rec in done}
        factors = self.clip_factors(sq, s, scale)
        out: dict[nn.Parameter, torch.Tensor] = {}
        for layer, rec in done:
            sums = layer.clipped_sums(rec, grouping, factors[layer], noise_std if noise else 0.0,
                                      noise or _NO_NOISE, self.backend)
            for name, g in sums.items():
                out[getattr(layer.module, name)] = g
            # this layer's (A, G) are spent: free them now, so the gradients being written replace them
            rec.grad_out = None
            rec.saved.clear()
            rec.extra.clear()
        return out

    def clip_factors(self, sq: dict[DPLayer, dict[str, torch.Tensor]], s: float, scale: float
                     ) -> dict[DPLayer, dict[str, torch.Tensor]]:
        bad = [f"{layer.name}.{n}" for layer, d in sq.items() for n, v in d.items() if not torch.isfinite(v).all()]
        if bad:
            raise NonFiniteGradientError(
                f"non-finite per-sample gradient in {', '.join(bad)}: step refused, no parameter was changed")
        if self.clipping == "flat":
            total = torch.stack([v for d in sq.values() for v in d.values()]).sum(0).sqrt() * s
            c = (self.total_norm / (total + 1e-6)).clamp(max=1.0) * (s * scale)
            return {layer: {n: c for n in d} for layer, d in sq.items()}
        out = {}
        for layer, d in sq.items():
            out[layer] = {}
            for n, v in d.items():
                norm = v.sqrt() * s
                out[layer][n] = (self.thresholds[(layer, n)] / (norm + 1e-6)).clamp(max=1.0) * (s * scale)
        return out


class _NoNoise(NoiseSource):
    """Counters for noise-free sums: nothing is drawn, so nothing is consumed."""

    def __init__(self):
        super().__init__(seed=0)

    def take(self, numel: int) -> tuple[int, int]:
        return 0, 0


_NO_NOISE = _NoNoise()
