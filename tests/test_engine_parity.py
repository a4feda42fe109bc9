"""The engine against Opacus hooks (noise 0, the same fixed batch): the same parameter update."""

from __future__ import annotations

import copy

import opacus
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import dpkernels
from tests import models


def one_step(engine, model, batch, loss_fn, max_grad_norm=0.5, clipping="flat", **kw):
    """One private SGD step (lr 1) on a fixed batch; returns the parameter updates by name."""
    model = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    loader = DataLoader(TensorDataset(*batch), batch_size=len(batch[0]))
    model, opt, _ = engine.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.0,
                                        max_grad_norm=max_grad_norm, poisson_sampling=False, clipping=clipping, **kw)
    loss_fn(model, batch).backward()
    opt.step()
    named = dict(model.named_parameters())
    return {n.removeprefix("_module."): named[n].detach() - before[n.removeprefix("_module.")]
            for n in named if n.removeprefix("_module.") in before}


def assert_same_update(ours, theirs, trainable, rtol=1e-5):
    assert set(trainable) <= set(ours)
    scale = max(theirs[n].norm() for n in trainable)
    moved = 0
    for n in trainable:
        ref = theirs[n]
        if ref.norm() == 0:  # e.g. attn2.to_q under a one-token context: softmax over one key has no gradient
            assert ours[n].norm() <= 1e-6 * scale, f"{n}: reference update is zero, ours is not"
            continue
        moved += 1
        err = (ours[n] - ref).norm() / ref.norm()
        assert err < rtol, f"{n}: relative difference {err:.2e}"
    assert moved >= 0.75 * len(trainable), "too few parameters moved for the comparison to mean much"
    for n, d in ours.items():
        if n not in trainable:
            assert torch.count_nonzero(d) == 0, f"frozen {n} changed"


def as_dtype(model, batch, dtype):
    return model.to(dtype), tuple(b.to(dtype) if b.is_floating_point() else b for b in batch)


# float64 shows the math agrees to far below 1e-5; float32 differs by rounding alone (summation
# orders differ between our kernels and Opacus' einsums, and with the thread count), hence 1e-4 there.
DTYPES = [(torch.float64, 1e-5), (torch.float32, 1e-4)]


@pytest.mark.parametrize("dtype,rtol", DTYPES)
@pytest.mark.parametrize("max_grad_norm", [0.05, 100.0])  # most samples clipped / none clipped
def test_every_layer_type_matches_opacus(max_grad_norm, dtype, rtol):
    torch.manual_seed(0)
    model, batch = as_dtype(models.AllLayers(), models.all_layers_batch(7), dtype)
    ours = one_step(dpkernels.PrivacyEngine(), model, batch, models.all_layers_loss, max_grad_norm)
    theirs = one_step(opacus.PrivacyEngine(), model, batch, models.all_layers_loss, max_grad_norm)
    assert_same_update(ours, theirs, [n for n, _ in model.named_parameters()], rtol)


@pytest.mark.parametrize("dtype,rtol", DTYPES)
def test_per_layer_clipping_matches_opacus(dtype, rtol):
    torch.manual_seed(1)
    model, batch = as_dtype(models.AllLayers(), models.all_layers_batch(5, seed=1), dtype)
    n = sum(1 for _ in model.parameters())
    norms = [0.01 * (i + 1) for i in range(n)]
    ours = one_step(dpkernels.PrivacyEngine(), model, batch, models.all_layers_loss, norms, "per_layer")
    theirs = one_step(opacus.PrivacyEngine(), model, batch, models.all_layers_loss, norms, "per_layer")
    assert_same_update(ours, theirs, [n for n, _ in model.named_parameters()], rtol)


@pytest.mark.parametrize("strategy", ["ghost", "direct"])
def test_unet_transformer_blocks_and_class_embedding_match_opacus(strategy, monkeypatch):
    monkeypatch.setattr(dpkernels.ops, "choose_strategy", lambda T, d, p: strategy)
    # float64: attention's key gradients cancel, and fp32 rounding alone differs by ~1e-5 between two einsum orders
    torch.manual_seed(2)
    model = models.ClassConditionedUNet().double()
    models.freeze_all_but_attention(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("class_embed" in n for n in trainable) and any("attn2.to_k" in n for n in trainable)
    batch = tuple(b.double() if b.is_floating_point() else b for b in models.unet_batch(4))
    ours = one_step(dpkernels.PrivacyEngine(), model, batch, models.unet_loss, 0.1)
    theirs = one_step(opacus.PrivacyEngine(), model, batch, models.unet_loss, 0.1)
    assert_same_update(ours, theirs, trainable)


def test_peft_lora_matches_opacus():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    base = models.TinyAttention()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                            init_lora_weights="gaussian"))
    for n, p in model.named_parameters():
        if "lora_B" in n:  # peft starts B at zero, which would leave A without a gradient to compare
            torch.nn.init.normal_(p, std=0.1)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    x, t = torch.randn(6, 9, 16), torch.randn(6, 3)
    loss = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()
    ours = one_step(dpkernels.PrivacyEngine(), model, (x, t), loss, 0.2)
    theirs = one_step(opacus.PrivacyEngine(), model, (x, t), loss, 0.2)
    assert_same_update(ours, theirs, trainable)


def test_every_layer_type_through_the_triton_kernels_matches_opacus():
    """The whole engine on the Triton backend (on CPU tensors under TRITON_INTERPRET without a GPU)."""
    pytest.importorskip("triton")
    torch.manual_seed(4)
    model, batch = models.AllLayers(), models.all_layers_batch(5, seed=4)
    if torch.cuda.is_available():
        model, batch = model.cuda(), tuple(b.cuda() for b in batch)
    ours = one_step(dpkernels.PrivacyEngine(), model, batch, models.all_layers_loss, 0.05, backend="triton")
    theirs = one_step(opacus.PrivacyEngine(), model, batch, models.all_layers_loss, 0.05)
    assert_same_update(ours, theirs, [n for n, _ in model.named_parameters()], rtol=1e-4)  # float32
