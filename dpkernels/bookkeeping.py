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

import logging
from dataclasses import dataclass

import torch
from torch import nn

from dpkernels.grouping import Grouping
from dpkernels.layers.base import DPLayer, Record
from dpkernels.noise import NoiseSource

log = logging.getLogger("dpkernels")


def in_backward() -> bool:
    """Whether autograd runs a backward pass on this thread (a forward now is a recomputation).

    Returns:
        True inside a backward pass.
    """
    return torch._C._current_graph_task_id() != -1


class SecondPassError(RuntimeError):
    """A private layer ran forward again after a backward pass, before optimizer.step()."""


class Recorder:
    """Collects the records of the current physical batch as layers run forward.

    One physical batch is one forward pass (and the backward passes through it) between two steps. A forward
    that autograd runs inside a backward pass is activation checkpointing recomputing a segment: its record
    joins the batch when its own backward runs (reentrant checkpointing, whose first forward ran under no_grad
    and recorded nothing), and is dropped with its graph otherwise (non-reentrant checkpointing: the recomputed
    graph only refills the saved tensors of the first forward, whose record receives G).
    """

    def __init__(self):
        self.records: list[tuple[DPLayer, Record]] = []
        self.rows: int | None = None
        self.example_ids: torch.Tensor | None = None
        self.generation = 0  # counts take(): a record opened before one belongs to a spent batch
        # what the rows must be attributed to (checked at the step): the dim-0 sizes of the private model's tensor
        # inputs in its last eager forward, and the examples of the batch (chunk) the engine's loader yielded last
        self.input_rows: set[int] | None = None
        self.batch_examples: int | None = None

    def new_record(self, layer: DPLayer, saved: dict, rows: int) -> Record:
        """Open the record of one forward call of a private layer; refuse a second forward pass before the step.

        Args:
            layer: the private layer.
            saved: what its `compute` saved.
            rows: the input's first dimension.

        Returns:
            The record (pending, and not yet in the batch, when opened by a recomputation inside a backward pass).
        """
        if in_backward():
            return Record(saved=saved, rows=rows, pending=True, generation=self.generation)
        if any(r.has_grad for _, r in self.records):
            self.discard()
            raise SecondPassError(
                f"module '{layer.name}' ran forward again after a backward pass and before optimizer.step(). "
                "The engine cannot tell a second pass over the same examples (two augmented views, two losses on "
                "two forwards) from new examples, and clipping each pass on its own would bound one example's "
                "update by 2C, not C. Refused, and the batch was dropped. For several views or passes of the same "
                "examples, run their rows in ONE forward and give the rows of one example the same id "
                "(optimizer.set_example_ids), or sum their losses before one backward (or backward(retain_graph="
                "True) through one forward); to accumulate disjoint physical batches, use engine.virtual_batches "
                "(or optimizer.signal_skip_step(True); optimizer.step() after each backward); to drop a batch, "
                "call zero_grad() first; to evaluate, run under torch.no_grad()")
        if layer.record is not None:
            self.discard()
            raise RuntimeError(
                f"module '{layer.name}' was called twice in one forward pass: its per-sample gradients would be "
                "wrong. dpkernels supports each trainable module once per forward (run evaluation under "
                "torch.no_grad())."
            )
        rec = Record(saved=saved, rows=rows, generation=self.generation)
        self._add(layer, rec)
        return rec

    def join(self, layer: DPLayer, rec: Record) -> None:
        """A record opened by a recomputation (see the class) whose backward runs: it joins the batch.

        Args:
            layer: the private layer.
            rec: the recomputation's record.
        """
        if rec.generation != self.generation:
            raise RuntimeError(
                f"backward through module '{layer.name}' after optimizer.step() already used this forward pass: "
                "its gradient would be lost. Run a new forward pass for each step")
        old = layer.record
        if old is not None and old.has_grad:
            self.discard()
            raise RuntimeError(
                f"module '{layer.name}' got a second output gradient from a recomputed forward (two backward "
                "passes through a forward recomputed by reentrant activation checkpointing, or the module called "
                "twice, once inside a checkpointed segment): each example would be clipped once per pass. Refused, "
                "and the batch was dropped: sum the losses before one backward, or use "
                "torch.utils.checkpoint.checkpoint(..., use_reentrant=False)")
        if old is not None:
            # the first forward's record, which no backward reached: a compiled graph backpropagates through its
            # own recomputation, whose record replaces it (a later backward through the first one is refused)
            self.records = [(lyr, r) for lyr, r in self.records if r is not old]
            old.replaced = True
            _free(old)
            layer.record = None
        rec.pending = False
        self._add(layer, rec)

    def _add(self, layer: DPLayer, rec: Record) -> None:
        if self.rows is None:
            self.rows = rec.rows
        elif rec.rows != self.rows:
            rows = self.rows
            self.discard()
            raise RuntimeError(
                f"module '{layer.name}' got an input with {rec.rows} rows but the batch has {rows}: "
                "dpkernels needs the batch as the first dimension of every trainable layer's input"
            )
        layer.record = rec
        self.records.append((layer, rec))

    def take(self) -> Batch:
        """Hand over the current physical batch and start a new one (its records are marked spent).

        Returns:
            The batch.
        """
        out = Batch(self.records, self.rows or 0, self.example_ids, self.input_rows, self.batch_examples)
        for layer, rec in self.records:
            layer.record = None
            rec.spent = True
        self.records, self.rows, self.example_ids = [], None, None
        self.input_rows, self.batch_examples = None, None
        self.generation += 1
        return out

    def discard(self) -> None:
        """Drop the current batch's records (and their A, G): nothing of it reaches a step. The size of the batch
        the loader yielded stays: zero_grad() comes between it and its forward."""
        examples = self.batch_examples
        for _, rec in self.take().records:
            _free(rec)
        self.batch_examples = examples

    def discard_layers(self, layers: set[DPLayer]) -> None:
        """Drop the records of `layers` only (zero_grad on a part of the model); the rest stays pending.

        Args:
            layers: the private layers whose records go.
        """
        keep = []
        for layer, rec in self.records:
            if layer in layers:
                layer.record = None
                rec.spent = True
                _free(rec)
            else:
                keep.append((layer, rec))
        self.records = keep
        if not keep:
            self.discard()


def _free(rec: Record) -> None:
    rec.grad_out = None
    rec.saved.clear()
    rec.extra.clear()


@dataclass
class Batch:
    """What `Recorder.take` hands the clipper: one physical batch."""

    records: list[tuple[DPLayer, Record]]
    rows: int
    example_ids: torch.Tensor | None
    input_rows: set[int] | None
    batch_examples: int | None


class Clipper:
    """Turns the records of a physical batch into clipped (and, on the last one, noised) sums.

    Args:
        layers: the private layers.
        max_grad_norm: C (flat), or one threshold per trainable parameter (per_layer; a single C is split evenly).
        clipping: "flat" or "per_layer".
        backend: the ops' backend.
        loss_reduction: "mean" or "sum".
    """

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

    def sums(self, batch: Batch, scale: float, noise_std: float, noise: NoiseSource | None
             ) -> dict[nn.Parameter, torch.Tensor]:
        """Per parameter: scale * sum_b c_b g_b (+ N(0, noise_std^2) when noise is given) for the layers that ran.

        Args:
            batch: the physical batch.
            scale: folded into the clip factors (1 / the expected batch size, for a mean loss).
            noise_std: std of the noise on each sum (ignored without `noise`).
            noise: the noise source, or None (no noise: an accumulating chunk).

        Returns:
            {parameter: its sum, in the parameter's shape}.
        """
        done = [(layer, rec) for layer, rec in batch.records if rec.has_grad]
        if not done:
            return {}
        seen: set[DPLayer] = set()
        for layer, rec in done:  # before anything is computed: a stale A would give a wrong clipped sum
            if layer in seen:  # two gradients of one layer would overwrite each other's norm: never clip on one
                raise RuntimeError(f"module '{layer.name}' has two recorded gradients in one step: refused")
            seen.add(layer)
            rec.check_unmodified(layer.name)
        grouping = Grouping(batch.example_ids, batch.rows)
        check_attribution(batch, grouping.n, done[0][0].name)
        s = float(grouping.n) if self.loss_reduction == "mean" else 1.0
        sq = {layer: layer.sq_norms(rec, grouping, self.backend) for layer, rec in done}
        keep = drop_non_finite(done, sq, grouping)
        factors = self.clip_factors(sq, s, scale)
        if keep is not None:  # what a dropped example contributes: nothing
            factors = {layer: {n: c * keep for n, c in d.items()} for layer, d in factors.items()}
        out: dict[nn.Parameter, torch.Tensor] = {}
        for layer, rec in done:
            sums = layer.clipped_sums(rec, grouping, factors[layer], noise_std if noise else 0.0,
                                      noise or _NO_NOISE, self.backend)
            for name, g in sums.items():
                out[getattr(layer.module, name)] = g
            _free(rec)  # this layer's (A, G) are spent: free them now, so the gradients being written replace them
        return out

    def clip_factors(self, sq: dict[DPLayer, dict[str, torch.Tensor]], s: float, scale: float
                     ) -> dict[DPLayer, dict[str, torch.Tensor]]:
        """Clip factor per example for each trainable parameter (flat: one factor over all of them).

        Args:
            sq: squared per-example norms by layer and parameter name (unscaled).
            s: the per-example gradient's scale (examples in the batch for a mean loss, else 1).
            scale: folded into the factors.

        Returns:
            {layer: {parameter name: [n]}}.
        """
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


def drop_non_finite(done: list[tuple[DPLayer, Record]], sq: dict[DPLayer, dict[str, torch.Tensor]],
                    grouping: Grouping) -> torch.Tensor | None:
    """Examples whose gradient is not finite (an inf or NaN input, activation or loss) contribute nothing: their
    rows are zeroed in every layer's record and their squared norms set to 0, in place of `sq`. Refusing the step
    instead would make whether the step happens depend on one example's presence (a membership signal outside the
    noise: a loop that catches the error and goes on trains a different model); dropping keeps the step DP (any
    c_b in [0, C / ||g_b||] is). The step goes on, noise and accounting included, and the drop is logged.

    Args:
        done: the layers that ran backward and their records.
        sq: squared per-example norms per layer and parameter ([n] each); changed in place where examples drop.
        grouping: rows -> examples.

    Returns:
        None when every example is finite, else a float mask [n] of the examples kept (multiplies c).
    """
    finite = torch.stack([torch.isfinite(v) for d in sq.values() for v in d.values()]).all(0)
    if bool(finite.all()):
        return None
    drop = ~finite
    log.warning("dpkernels: %d of %d examples had a non-finite gradient: they contribute nothing to this step",
                int(drop.sum()), drop.numel())
    for layer, rec in done:
        layer.drop_examples(rec, grouping, drop)
    for d in sq.values():
        for n, v in d.items():
            d[n] = v.masked_fill(drop.to(v.device), 0.0)
    return finite.to(torch.float32)


def check_attribution(batch: Batch, examples: int, first: str) -> None:
    """Refuse rows the engine cannot attribute to examples: the first dimension of every private layer's input is
    taken as the batch, so a model whose layers all see [T, B, d] (time first) or [B * P, d] (patches as rows)
    would be clipped per time step or patch. Checked against the model's inputs and the loader's batch.

    Args:
        batch: the physical batch (its rows, and what they are checked against).
        examples: the examples its rows form (rows, or distinct example ids).
        first: the name of its first private layer, for the message.
    """
    ins = batch.input_rows
    if ins and batch.rows not in ins and examples not in ins:
        raise RuntimeError(
            f"the private layers (first: module '{first}') saw {batch.rows} rows, but no tensor input of the model's "
            f"forward has that many (their first dimensions: {sorted(ins)}): the engine clips each row (or each "
            "example id) as one example, so rows that are not examples (a time-first [T, B, d] layout, patches or "
            "tokens flattened into rows) would be clipped on their own and one example's update could exceed C. "
            "Refused: keep the batch as the first dimension of every trainable layer's input (batch_first=True)")
    if batch.batch_examples is not None and examples != batch.batch_examples:
        raise RuntimeError(
            f"the private layers (first: module '{first}') saw {examples} examples ({batch.rows} rows), but the "
            f"batch the private data loader yielded last has {batch.batch_examples}: rows that are not examples (a "
            "time-first [T, B, d] layout, tokens flattened into rows, or views of one example without a shared id) "
            "would each be clipped on their own, and one example's update could exceed C. Refused: keep the batch "
            "as the first dimension of every trainable layer's input, and give the rows of one example the same id "
            "(optimizer.set_example_ids)")


class _NoNoise(NoiseSource):
    """Counters for noise-free sums: nothing is drawn, so nothing is consumed."""

    def __init__(self):
        super().__init__(seed=0)

    def take(self, numel: int) -> tuple[int, int]:
        return 0, 0


_NO_NOISE = _NoNoise()
