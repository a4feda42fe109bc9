"""Each option of a supported layer that the README's table advertises, one layer at a time: the clipped gradient
(noise 0, one SGD step, float64) against Opacus hooks to 1e-5 relative.

Conv2d: stride, groups, dilation, padding (ints, a tuple, "same", "valid") and the padding modes (with numeric
padding; "same" with a mode other than zeros is refused); Embedding: padding_idx. Opacus' hooks get two of them wrong, so there the reference is each example's own gradient from autograd
(clipped and summed by hand): its conv grad sampler unfolds the unpadded input with zeros whatever the padding_mode
(reflect, replicate and circular padding are not zeros), and its embedding grad sampler gives the padding row a
per-sample gradient that autograd does not (that row never trains). The hand reference is checked against Opacus on
every option where Opacus is right.
"""

from __future__ import annotations

import opacus
import pytest
import torch
from torch import nn

import dpkernels
from tests.test_engine_parity import assert_same_update, one_step

RTOL = 1e-5  # float64: the math agrees far below this; float32 rounding alone would not
CLIP = [0.05, 100.0]  # most examples clipped / none clipped


def per_example_update(model: nn.Module, batch: tuple, loss_fn, max_grad_norm: float) -> dict[str, torch.Tensor]:
    """The DP-SGD update (lr 1, noise 0, mean loss over B examples) from each example's own autograd gradient."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for _, p in named]
    B = len(batch[0])
    for b in range(B):
        grads = torch.autograd.grad(loss_fn(model, tuple(x[b:b + 1] for x in batch)), [p for _, p in named])
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        c = (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        for t, g in zip(total, grads):
            t.add_(c * g)
    return {n: -t / B for (n, _), t in zip(named, total)}


class Conv(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flatten(1)


def conv_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    x, w = batch
    return ((model(x) ** 2).sum(1) * w).mean()  # per-example weights: examples differ in norm, so some are clipped


def conv_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, 4, 9, 8, generator=g, dtype=torch.float64), torch.rand(5, generator=g, dtype=torch.float64)


CONV_OPTIONS = {
    "stride": {"stride": 2},
    "stride-hw": {"stride": (2, 1)},
    "groups": {"groups": 2},
    "groups-padded": {"groups": 2, "padding": 1},
    "dilation": {"dilation": 2},
    "dilation-hw": {"dilation": (1, 2), "padding": (0, 2)},
    "padding": {"padding": 1},
    "padding-hw": {"padding": (1, 2)},
    "padding-same": {"padding": "same"},
    "padding-same-dilated": {"padding": "same", "dilation": 2},
    "padding-valid": {"padding": "valid"},
    "everything": {"stride": (2, 1), "groups": 2, "dilation": (1, 2), "padding": (1, 2), "bias": False},
}
PADDING_MODES = ["reflect", "replicate", "circular"]


@pytest.mark.parametrize("max_grad_norm", CLIP)
@pytest.mark.parametrize("name", list(CONV_OPTIONS))
def test_conv2d_option_matches_opacus(name: str, max_grad_norm: float) -> None:
    torch.manual_seed(0)
    model, batch = Conv(**CONV_OPTIONS[name]).double(), conv_batch(1)
    trainable = [n for n, _ in model.named_parameters()]
    ours = one_step(dpkernels.PrivacyEngine(), model, batch, conv_loss, max_grad_norm)
    theirs = one_step(opacus.PrivacyEngine(), model, batch, conv_loss, max_grad_norm)
    assert_same_update(ours, theirs, trainable, RTOL)
    # the hand reference of the padding-mode test agrees with Opacus where Opacus is right
    assert_same_update(per_example_update(model, batch, conv_loss, max_grad_norm), theirs, trainable, RTOL)


@pytest.mark.parametrize("max_grad_norm", CLIP)
@pytest.mark.parametrize("options", [{"padding": 1}, {"padding": (2, 1), "stride": 2, "groups": 2, "dilation": (2, 1)}],
                         ids=["plain", "strided-grouped-dilated"])
@pytest.mark.parametrize("mode", PADDING_MODES)
def test_conv2d_padding_mode_matches_per_example_gradients(mode: str, options: dict, max_grad_norm: float) -> None:
    torch.manual_seed(0)
    model, batch = Conv(padding_mode=mode, **options).double(), conv_batch(2)
    ours = one_step(dpkernels.PrivacyEngine(), model, batch, conv_loss, max_grad_norm)
    want = per_example_update(model, batch, conv_loss, max_grad_norm)
    assert_same_update(ours, want, [n for n, _ in model.named_parameters()], RTOL)


@pytest.mark.parametrize("mode", PADDING_MODES)
def test_conv2d_padding_same_with_a_padding_mode_is_refused(mode: str) -> None:
    """padding="same" pads only with zeros here; another mode is refused by make_private, before any step."""
    model = Conv(padding="same", padding_mode=mode).double()
    with pytest.raises(ValueError, match="padding='same' with padding_mode"):
        one_step(dpkernels.PrivacyEngine(), model, conv_batch(2), conv_loss, 1.0)


class Embed(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.emb = nn.Embedding(7, 5, **options)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids).sum(1)


def embed_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    ids, target = batch
    return ((model(ids) - target) ** 2).mean()


def embed_batch(padding_idx: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 7, (6, 4), generator=g)
    if padding_idx is not None:  # every example holds the padding id, one of them twice
        ids[:, 0] = padding_idx
        ids[1, 2] = padding_idx
    return ids, torch.randn(6, 5, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("max_grad_norm", CLIP)
@pytest.mark.parametrize("padding_idx", [0, 4, -1])
def test_embedding_padding_idx_matches_per_example_gradients(padding_idx: int, max_grad_norm: float) -> None:
    torch.manual_seed(0)
    model = Embed(padding_idx=padding_idx).double()
    batch = embed_batch(model.emb.padding_idx)  # -1 is stored as 6
    ours = one_step(dpkernels.PrivacyEngine(), model, batch, embed_loss, max_grad_norm)
    want = per_example_update(model, batch, embed_loss, max_grad_norm)
    assert_same_update(ours, want, ["emb.weight"], RTOL)
    assert torch.count_nonzero(ours["emb.weight"][model.emb.padding_idx]) == 0, "the padding row moved"


@pytest.mark.parametrize("max_grad_norm", CLIP)
def test_embedding_without_padding_idx_matches_opacus(max_grad_norm: float) -> None:
    """The hand reference agrees with Opacus on the embedding too, when there is no padding row."""
    torch.manual_seed(0)
    model, batch = Embed().double(), embed_batch(None)
    ours = one_step(dpkernels.PrivacyEngine(), model, batch, embed_loss, max_grad_norm)
    theirs = one_step(opacus.PrivacyEngine(), model, batch, embed_loss, max_grad_norm)
    assert_same_update(ours, theirs, ["emb.weight"], RTOL)
    assert_same_update(per_example_update(model, batch, embed_loss, max_grad_norm), theirs, ["emb.weight"], RTOL)
