"""The shared non-private training loop (dpldm/fit.py): a killed fit resumes from its checkpoint and ends exactly
where an uninterrupted one does; a checkpoint of another fit is refused, never silently resumed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dpldm import fit as fit_mod
from dpldm.common import cycle_batches
from dpldm.config import load_config
from dpldm.fit import BatchStream, Recipe, fit
from dpldm.models import build_unet

CFG = load_config("tiny")
RECIPE = Recipe(steps=7, batch_size=4, lr=1e-3, label_dropout=0.2)


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c, s = CFG["unet"]["in_channels"], CFG["unet"]["sample_size"]
    return torch.randn(10, c, s, s, generator=g), torch.randint(0, CFG["data"]["num_classes"], (10,), generator=g)


def fresh_fit(checkpoint: Path | None, recipe: Recipe = RECIPE, latents: tuple | None = None, every: int = 2):
    torch.manual_seed(0)
    model = build_unet(CFG)
    z, y = latents or data()
    done = fit(model, z, y, CFG, recipe, torch.Generator().manual_seed(1), checkpoint=checkpoint, every=every)
    return model, done


class Killed(RuntimeError):
    pass


def killed_at(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """The diffusion loss raises on its `call`-th use (a kill in the middle of a step)."""
    real, calls = fit_mod.diffusion_loss, [0]

    def loss(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(fit_mod, "diffusion_loss", loss)


def test_batch_stream_draws_as_cycle_batches() -> None:
    a, b = BatchStream(10, 4, torch.Generator().manual_seed(3)), cycle_batches(10, 4, torch.Generator().manual_seed(3))
    for _ in range(9):
        assert torch.equal(next(a), next(b))


@pytest.mark.parametrize("kill_at", [2, 4, 6])  # before the first checkpoint, just after one, after two
def test_a_killed_fit_resumes_to_the_uninterrupted_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          kill_at: int) -> None:
    whole, whole_done = fresh_fit(None)
    ckpt = tmp_path / "fit.pt"
    with monkeypatch.context() as m:
        killed_at(m, kill_at)
        with pytest.raises(Killed):
            fresh_fit(ckpt)
    assert ckpt.is_file() == (kill_at > 2)
    resumed, done = fresh_fit(ckpt)
    for (name, p), q in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert done.losses == whole_done.losses
    assert done.resumed_at == ([2 * ((kill_at - 1) // 2)] if kill_at > 2 else [])
    assert not ckpt.exists(), "a finished fit leaves no checkpoint behind"


@pytest.mark.parametrize("other", ["recipe", "latents"])
def test_a_checkpoint_of_another_fit_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, other: str) -> None:
    ckpt = tmp_path / "fit.pt"
    with monkeypatch.context() as m:
        killed_at(m, 4)
        with pytest.raises(Killed):
            fresh_fit(ckpt)
    kwargs = {"recipe": Recipe(7, 4, 2e-3, 0.2)} if other == "recipe" else {"latents": data(seed=5)}
    with pytest.raises(ValueError, match="a checkpoint of another fit"):
        fresh_fit(ckpt, **kwargs)
    assert ckpt.is_file(), "the refused checkpoint is kept"
