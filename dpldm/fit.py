"""Ordinary (non-private) training of an LDM on latents: one loop for the public pre-training, the DP warm-up's
post-processing and a public compartment.

A long fit (hours of public pre-training on a CPU) can checkpoint: every `every` steps the model, optimizer,
learning-rate schedule, the batch stream's position and the generator are written to one file; the same call
with that file resumes where it stopped and trains exactly as an uninterrupted fit would.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dpldm.common import warmup_cosine
from dpldm.diffusion import diffusion_loss, train_scheduler
from dpldm.runlog import RunLog, progress


class BatchStream:
    """Endless shuffled index batches, a fresh permutation per pass; its position can be saved and restored."""

    def __init__(self, n: int, batch_size: int, gen: torch.Generator) -> None:
        """Args:
        n: how many examples.
        batch_size: indices per batch (the last partial batch of a pass is dropped, unless n < batch_size).
        gen: draws the permutations.
        """
        self.n, self.batch_size, self.gen = n, batch_size, gen
        self.perm: torch.Tensor | None = None
        self.pos = 0

    def __next__(self) -> torch.Tensor:
        last = self.n - self.batch_size if self.n >= self.batch_size else 0
        if self.perm is None or self.pos > last:
            self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state_dict(self) -> dict[str, Any]:
        """The position (the generator's state is saved with the fit)."""
        return {"n": self.n, "batch_size": self.batch_size, "perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by state_dict.

        Args:
            state: what state_dict returned.
        """
        self.perm, self.pos = state["perm"], state["pos"]


def resume_file(out: Path) -> Path:
    """Where a pre-training into the folder `out` keeps its checkpoint until it is done.

    Args:
        out: the folder the pre-training writes.

    Returns:
        out's sibling <name>.resume.pt.
    """
    return out.with_name(out.name + ".resume.pt")


@dataclass(frozen=True)
class Recipe:
    """What a fit runs: a checkpoint is resumed only by the same recipe on the same latents."""

    steps: int
    batch_size: int
    lr: float
    label_dropout: float = 0.0
    weight_decay: float = 0.01  # AdamW's default
    cosine: bool = True  # linear warm-up then cosine decay; False: a constant learning rate


@dataclass
class Fitted:
    """What a fit did."""

    losses: list[float] = field(default_factory=list)  # every 50th step's and the last, a resumed fit's included
    resumed_at: list[int] = field(default_factory=list)  # the step of each resume from a checkpoint
    earlier_s: float = 0.0  # seconds spent before the last resume (up to the last checkpoint written)


def fit(model: torch.nn.Module, latents: torch.Tensor, labels: torch.Tensor, cfg: dict[str, Any], recipe: Recipe,
        gen: torch.Generator, device: str = "cpu", desc: str = "fit", log: RunLog | None = None,
        checkpoint: Path | None = None, every: int = 500) -> Fitted:
    """Train the model's trainable parameters on the epsilon-prediction loss (diffusion_loss), in place.

    Args:
        model: the LDM; only its parameters with requires_grad are trained.
        latents: clean latents [N, C, H, W].
        labels: their classes [N].
        cfg: the config (its scheduler section).
        recipe: steps, batch size, learning rate and the rest.
        gen: draws batches, timesteps, noise and label dropout.
        device: where to train.
        desc: the progress bar's label.
        log: where every 50th step's loss is logged (None: not logged).
        checkpoint: a file to save the fit to every `every` steps and to resume from when it exists (removed
            once the fit is done); None: no checkpoint.
        every: steps between checkpoints.

    Returns:
        The losses, and where it resumed.

    Raises:
        ValueError: the checkpoint is of another recipe or another number of latents.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    lr_sched = warmup_cosine(opt, recipe.steps) if recipe.cosine else None
    batches = BatchStream(len(latents), recipe.batch_size, gen)
    sched = train_scheduler(cfg)
    model.to(device).train()
    t0, start, done = time.time(), 0, Fitted()
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=True)
        if state["recipe"] != vars(recipe) or state["data"] != _digest(latents, labels):
            raise ValueError(f"{checkpoint}: a checkpoint of another fit (recipe {state['recipe']}, latents "
                             f"{state['data'][:12]}; this one: {vars(recipe)}, {_digest(latents, labels)[:12]}): "
                             "remove it to start over")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if lr_sched is not None:
            lr_sched.load_state_dict(state["lr_sched"])
        batches.load_state_dict(state["batches"])
        gen.set_state(state["gen"])
        start, done = state["step"], Fitted(state["losses"], state["resumed_at"] + [state["step"]], state["elapsed_s"])
        if log is not None:
            log.print(f"{desc}: resumed from {checkpoint} at step {start} of {recipe.steps}", resumed_at=start)
    bar = progress(recipe.steps, desc, initial=start)
    for step in range(start, recipe.steps):
        idx = next(batches)
        loss = diffusion_loss(model, sched, latents[idx].to(device), labels[idx].to(device), recipe.label_dropout,
                              gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if lr_sched is not None:
            lr_sched.step()
        bar.update()
        if step % 50 == 0 or step == recipe.steps - 1:
            done.losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if log is not None:
                log.log(step=step, loss=loss.item())
        if checkpoint is not None and (step + 1) % every == 0 and step + 1 < recipe.steps:
            _save(checkpoint, {"recipe": vars(recipe), "data": _digest(latents, labels), "step": step + 1, "losses": done.losses,
                               "resumed_at": done.resumed_at, "elapsed_s": done.earlier_s + time.time() - t0,
                               "model": model.state_dict(), "opt": opt.state_dict(),
                               "lr_sched": lr_sched.state_dict() if lr_sched is not None else None,
                               "batches": batches.state_dict(), "gen": gen.get_state()})
    bar.close()
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return done


def _digest(latents: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 of the training data: a checkpoint resumes only on the latents (autoencoder, data) it was made on."""
    h = hashlib.sha256()
    for t in (latents, labels):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _save(path: Path, state: dict[str, Any]) -> None:
    """Write then rename: a kill during the write leaves the previous checkpoint whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
