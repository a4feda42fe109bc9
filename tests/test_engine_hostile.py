"""The engine as a hostile or careless user drives it: every way found to get an update that is not
DP-SGD (or that differs from Opacus without saying so) is tried here, and must be refused or match."""

from __future__ import annotations

import copy
import gc
import itertools
import warnings
import weakref

import opacus
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpkernels import PrivacyEngine
from tests import models


def mlp(d: int = 8, h: int = 16) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, 3))


def mse(model, x, t, reduction: str = "mean"):
    return nn.functional.mse_loss(model(x).mean(1), t, reduction=reduction)


def private(engine, model, params=None, n=16, batch_size=4, noise=0.0, C=1.0, **kw):
    data = TensorDataset(torch.randn(n, 6, 8), torch.randn(n, 3))
    opt = torch.optim.SGD(params if params is not None else model.parameters(), lr=1.0)
    return engine.make_private(module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=batch_size),
                               noise_multiplier=noise, max_grad_norm=C, poisson_sampling=False, **kw)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"


def updates(model, before) -> dict[str, torch.Tensor]:
    return {k.removeprefix("_module."): v.detach() - before[k.removeprefix("_module.")]
            for k, v in model.state_dict().items()}


# --- 1. parameters that become trainable after make_private ---------------------------------------------

def test_parameter_unfrozen_after_make_private_is_refused():
    torch.manual_seed(0)
    model = mlp()
    model[0].requires_grad_(False)  # frozen at setup, but held by the optimizer (gradual unfreezing)
    engine = PrivacyEngine()
    model, opt, _ = private(engine, model, noise=1e6)
    model[0].requires_grad_(True)
    before = snapshot(model)
    mse(model, torch.randn(4, 6, 8), torch.randn(4, 3)).backward()
    with pytest.raises(RuntimeError, match=r"0\.weight"):
        opt.step()
    assert_unchanged(model, before)
    assert engine.accountant.history == []

    # Opacus refuses it too (it has no per-sample gradient for the unfrozen layer)
    ref = mlp()
    ref[0].requires_grad_(False)
    ref, ropt, _ = private(opacus.PrivacyEngine(), ref)
    ref._module[0].requires_grad_(True)
    mse(ref, torch.randn(4, 6, 8), torch.randn(4, 3)).backward()
    with pytest.raises(Exception):  # noqa: B017 (Opacus' own message)
        ropt.step()


def test_parameter_frozen_after_make_private_is_refused():
    model = mlp()
    engine = PrivacyEngine()
    model, opt, _ = private(engine, model)
    model[2].weight.requires_grad_(False)
    mse(model, torch.randn(4, 6, 8), torch.randn(4, 3)).backward()
    with pytest.raises(RuntimeError, match=r"2\.weight"):
        opt.step()
    assert engine.accountant.history == []


def test_gradient_written_by_hand_on_a_non_private_parameter_is_refused():
    model, extra = mlp(), nn.Parameter(torch.zeros(3), requires_grad=False)
    engine = PrivacyEngine()
    model, opt, _ = private(engine, model, params=list(model.parameters()) + [extra])
    extra.grad = torch.ones(3)  # a plain gradient the engine did not write
    with pytest.raises(RuntimeError, match="did not write"):
        opt.step()
    assert torch.equal(extra, torch.zeros(3)) and engine.accountant.history == []


def test_add_param_group_is_refused():
    model, late = mlp(), nn.Linear(3, 3)
    engine = PrivacyEngine()
    model, opt, _ = private(engine, model)
    with pytest.raises(RuntimeError, match="add_param_group"):
        opt.add_param_group({"params": list(late.parameters())})
    assert len(opt.param_groups) == 1
    # and behind the wrapper's back: the step refuses the parameter it did not register
    opt.original_optimizer.add_param_group({"params": list(late.parameters())})
    late(torch.randn(2, 3)).sum().backward()
    before = snapshot(late)
    with pytest.raises(RuntimeError, match="not registered"):
        opt.step()
    assert_unchanged(late, before)
    assert engine.accountant.history == []


# --- 2. zero_grad discards a batch that ran backward ------------------------------------------------------

def step_on(engine, model, batches, zero_between: bool, zero_model: bool = False):
    model = copy.deepcopy(model)
    before = snapshot(model)
    model, opt, _ = private(engine, model, batch_size=4)
    for i, (x, t) in enumerate(batches):
        if i and zero_between:
            (model if zero_model else opt).zero_grad()
        mse(model, x, t).backward()
    opt.step()
    return updates(model, before), engine


def test_zero_grad_discards_the_batch_before_it():
    torch.manual_seed(1)
    base = mlp()
    b1 = (torch.randn(4, 6, 8) * 5, torch.randn(4, 3))
    b2 = (torch.randn(4, 6, 8), torch.randn(4, 3))
    alone, _ = step_on(PrivacyEngine(), base, [b2], zero_between=True)
    theirs, _ = step_on(opacus.PrivacyEngine(), base, [b1, b2], zero_between=True)
    for zero_model in (False, True):  # optimizer.zero_grad() or model.zero_grad()
        ours, engine = step_on(PrivacyEngine(), base, [b1, b2], zero_between=True, zero_model=zero_model)
        for k in alone:
            torch.testing.assert_close(ours[k], alone[k], rtol=1e-6, atol=1e-8)
            torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-7)
        assert len(engine.accountant.history) == 1


def test_zero_grad_after_forward_without_backward_discards_it():
    model = mlp()
    model, opt, _ = private(PrivacyEngine(), model)
    mse(model, torch.randn(4, 6, 8), torch.randn(4, 3))  # forward only, then abandoned
    opt.zero_grad()
    mse(model, torch.randn(4, 6, 8), torch.randn(4, 3)).backward()
    opt.step()


def test_zero_grad_keeps_what_virtual_batches_accumulated():
    torch.manual_seed(2)
    base = mlp()
    data = TensorDataset(torch.randn(12, 6, 8), torch.randn(12, 3))

    def run(chunk: int):
        model = copy.deepcopy(base)
        before = snapshot(model)
        engine = PrivacyEngine()
        model, opt, loader = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            data_loader=DataLoader(data, batch_size=12), noise_multiplier=0.0, max_grad_norm=0.1,
            poisson_sampling=False)
        for x, t in engine.virtual_batches(loader, chunk):
            opt.zero_grad()
            mse(model, x, t).backward()
            opt.step()
        return updates(model, before)

    whole, split = run(12), run(5)
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], rtol=1e-5, atol=1e-7)


# --- 4. loss_reduction="sum" --------------------------------------------------------------------------

@pytest.mark.parametrize("C", [0.05, 100.0])
def test_sum_reduction_matches_opacus(C):
    torch.manual_seed(3)
    base = models.AllLayers().double()
    batch = tuple(b.double() if b.is_floating_point() else b for b in models.all_layers_batch(6))

    def run(engine):
        model = copy.deepcopy(base)
        before = snapshot(model)
        loader = DataLoader(TensorDataset(*batch), batch_size=3)  # expected batch 3: a division would show
        model, opt, _ = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                            data_loader=loader, noise_multiplier=0.0, max_grad_norm=C,
                                            poisson_sampling=False, loss_reduction="sum")
        x, y, t = batch
        ((model(x, y) - t) ** 2).sum().backward()
        opt.step()
        return updates(model, before)

    ours, theirs = run(PrivacyEngine()), run(opacus.PrivacyEngine())
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-6, atol=1e-10)


def test_sum_reduction_noise_is_not_divided():
    lin = nn.Linear(64, 128, bias=False)
    data = TensorDataset(torch.zeros(40, 64), torch.zeros(40, 128))
    lin, opt, _ = PrivacyEngine().make_private(
        module=lin, optimizer=torch.optim.SGD(lin.parameters(), lr=0.0), data_loader=DataLoader(data, batch_size=10),
        noise_multiplier=2.0, max_grad_norm=1.5, poisson_sampling=False, loss_reduction="sum", seed=1)
    opt.step()
    assert abs(lin.weight.grad.std().item() / 3.0 - 1) < 0.03


# --- 5. two backward passes through one forward -----------------------------------------------------------

@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_two_backward_passes_accumulate_per_example(compiled: bool):
    """Two losses, retain_graph=True: the per-sample gradient is the sum, so is its norm (every layer type); the
    same through a torch.compile'd model (aot_eager; dpkernels/layers/tap_ops.py)."""
    torch.manual_seed(4)
    base = models.AllLayers().double()
    batch = tuple(b.double() if b.is_floating_point() else b for b in models.all_layers_batch(5))
    torch._dynamo.reset()

    def run(engine, twice: bool):
        model = copy.deepcopy(base)
        before = snapshot(model)
        loader = DataLoader(TensorDataset(*batch), batch_size=5)
        model, opt, _ = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                            data_loader=loader, noise_multiplier=0.0, max_grad_norm=0.05,
                                            poisson_sampling=False)
        x, y, t = batch
        f = torch.compile(model, backend="aot_eager") if compiled and twice else model
        out = f(x, y)
        first, second = ((out - t) ** 2).mean(), (out.sin() * t).mean()
        if twice:
            first.backward(retain_graph=True)
            second.backward()
        else:
            (first + second).backward()
        opt.step()
        return updates(model, before)

    ours = run(PrivacyEngine(), twice=True)
    once = run(PrivacyEngine(), twice=False)
    theirs = run(opacus.PrivacyEngine(), twice=False)
    for k in theirs:
        torch.testing.assert_close(ours[k], once[k], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-6, atol=1e-10)


def test_second_backward_without_retain_graph_is_an_error():
    model, _opt, _ = private(PrivacyEngine(), mlp())
    loss = mse(model, torch.randn(4, 6, 8), torch.randn(4, 3))
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


# --- 6. a layer input modified in place -------------------------------------------------------------------

class InPlaceAfterUse(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        out = self.b(h)
        h.mul_(2.0)  # b's saved input is now wrong
        return out


@pytest.mark.parametrize("module", ["plain", "ours"])
def test_input_modified_in_place_after_forward_raises(module):
    model = InPlaceAfterUse()
    if module == "ours":
        model, _opt, _ = private(PrivacyEngine(), model)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        model(torch.randn(4, 8)).sum().backward()


def test_input_modified_in_place_after_backward_raises_at_step():
    engine = PrivacyEngine()
    model, opt, _ = private(engine, mlp())
    x = torch.randn(4, 6, 8)
    before = snapshot(model)
    mse(model, x, torch.randn(4, 3)).backward()
    x.add_(1.0)  # the first layer's saved input
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        opt.step()
    assert_unchanged(model, before)
    assert engine.accountant.history == []


# --- 7. the private gradient carries no graph ------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_private_gradient_has_no_graph_and_frees_activations(backend):
    torch.manual_seed(5)
    model = mlp()
    model, opt, _ = private(PrivacyEngine(), model, backend=backend)
    kept: list[weakref.ref] = []
    model[2].register_forward_hook(lambda m, inp, out: kept.append(weakref.ref(inp[0])))
    x = torch.randn(4, 6, 8, requires_grad=True)
    mse(model, x, torch.randn(4, 3)).backward()
    opt.step()
    for p in model.parameters():
        assert p.grad is not None and p.grad.grad_fn is None and not p.grad.requires_grad
    gc.collect()
    assert kept and kept[0]() is None, "an activation is still alive after step()"


# --- 9. BatchNorm in train mode ---------------------------------------------------------------------------

class FrozenBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4).requires_grad_(False)

    def forward(self, x):
        return self.bn(self.fc(x))


def bn_setup(model):
    data = TensorDataset(torch.randn(8, 4), torch.randn(8, 4))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    return PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=4),
                                        noise_multiplier=1.0, max_grad_norm=1.0)


def test_frozen_batchnorm_in_train_mode_is_refused():
    model = FrozenBN()
    state = snapshot(model)
    with pytest.raises(ValueError, match=r"'bn' \(BatchNorm1d\).*train mode"):
        bn_setup(model)
    assert all("forward" not in vars(m) for m in model.modules())
    assert_unchanged(model, state)


def test_frozen_batchnorm_in_eval_mode_is_allowed_until_train_is_called():
    model = FrozenBN()
    model.bn.eval()
    model, opt, _ = bn_setup(model)
    model(torch.randn(4, 4)).sum().backward()
    opt.step()
    stats = model.bn.running_mean.clone()
    model.train()  # back to batch statistics: the next forward would mix examples and leak running means
    with pytest.raises(RuntimeError, match="train mode"):
        model(torch.randn(4, 4))
    assert torch.equal(model.bn.running_mean, stats)


def test_instance_norm_tracking_running_stats_in_train_mode_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.Unflatten(1, (1, 4)), nn.InstanceNorm1d(1, track_running_stats=True))
    with pytest.raises(ValueError, match="running statistics"):
        bn_setup(model)


# --- 3. where the noise and the Poisson masks come from ----------------------------------------------------

def poisson_batches(seed=None, steps=6, state=None):
    torch.manual_seed(0)  # a public global seed must not decide anything private
    model = mlp()
    data = TensorDataset(torch.arange(64.0)[:, None].expand(64, 8).contiguous(), torch.zeros(64, 3))
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                             data_loader=DataLoader(data, batch_size=8), noise_multiplier=1.0,
                                             max_grad_norm=1.0, seed=seed)
    if state is not None:
        engine.load_state_dict(state)
    out = []
    for _ in range(steps):
        x, _t = next(iter(loader))
        out.append(tuple(x[:, 0].long().tolist()))
        opt.step()
        out.append(model[0].weight.grad.flatten()[:4].tolist())
    return out, engine


def test_default_noise_and_sampling_come_from_the_os():
    a, _ = poisson_batches()
    b, _ = poisson_batches()
    assert a[0::2] != b[0::2], "Poisson batches repeat under the same global torch seed"
    assert a[1::2] != b[1::2], "noise repeats under the same global torch seed"
    c, _ = poisson_batches(seed=5)
    d, _ = poisson_batches(seed=5)
    assert c == d, "an explicit seed must reproduce both streams"


def test_engine_state_continues_both_private_streams():
    full, _ = poisson_batches(seed=None, steps=6)
    for seed in (None, 9):
        first, engine = poisson_batches(seed=seed, steps=3)
        state = copy.deepcopy(engine.state_dict())
        rest_a, _ = poisson_batches(seed=None, steps=3, state=state)
        rest_b, _ = poisson_batches(seed=None, steps=3, state=state)
        assert rest_a == rest_b, "a resumed run must continue the same private streams"
        whole, _ = poisson_batches(seed=seed, steps=6) if seed is not None else (None, None)
        if whole is not None:
            assert first + rest_a == whole
    assert full


# --- 10. activation checkpointing (issue 17, item 1) -------------------------------------------------------

class CheckpointedOnly(nn.Module):
    """All private layers inside checkpointed segments: a reentrant recomputation used to start a new batch, so
    each segment was clipped on its own (one example's update sqrt(2) C)."""

    def __init__(self, mode: str | None):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 3)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.requires_grad_(True)
        h = models.checkpointed(lambda x: torch.tanh(self.a(x)), self.mode)(x)
        return models.checkpointed(self.b, self.mode)(h).mean(1)


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_activation_checkpointing_clips_each_example_once(mode):
    """The clipped update with checkpointed segments equals the one without (and Opacus hooks', noise 0), and one
    example's update has norm C (clipped), not sqrt(2) C."""
    torch.manual_seed(10)
    base = models.AllLayers().double()
    batch = tuple(b.double() if b.is_floating_point() else b for b in models.all_layers_batch(5, seed=10))

    def run(engine, model_mode):
        model = models.CheckpointedAllLayers(model_mode).double()
        model.load_state_dict(base.state_dict())
        before = snapshot(model)
        loader = DataLoader(TensorDataset(*batch), batch_size=5)
        model, opt, _ = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                            data_loader=loader, noise_multiplier=0.0, max_grad_norm=0.05,
                                            poisson_sampling=False)
        models.all_layers_loss(model, (batch[0].clone(), *batch[1:])).backward()
        opt.step()
        return updates(model, before)

    ours, plain, theirs = run(PrivacyEngine(), mode), run(PrivacyEngine(), None), run(opacus.PrivacyEngine(), None)
    for k in theirs:
        torch.testing.assert_close(ours[k], plain[k], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-10)

    # one example, C = 1, a sum loss: its update is its clipped gradient
    for model_mode in (mode, None):
        torch.manual_seed(11)
        model = CheckpointedOnly(model_mode).double()
        before = snapshot(model)
        model, opt, _ = private(PrivacyEngine(), model, loss_reduction="sum")
        (model(torch.randn(1, 6, 8, dtype=torch.float64) * 50) ** 2).sum().backward()
        opt.step()
        norm = torch.sqrt(sum((u**2).sum() for u in updates(model, before).values()))
        assert norm == pytest.approx(1.0, rel=1e-5), f"{model_mode}: one example's update has norm {norm:.4f} C"


def test_reentrant_checkpointing_backward_twice_is_refused():
    """Two backward passes through a reentrant-checkpointed forward recompute the segment twice: two records of
    one layer, which would be clipped apart. Refused (retain_graph through non-reentrant checkpointing works)."""
    engine = PrivacyEngine()
    model, _opt, _ = private(engine, CheckpointedOnly("reentrant"))
    out = model(torch.randn(4, 6, 8))
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="module '(a|b)' got a second output gradient from a recomputed forward"):
        out.square().sum().backward()

    torch.manual_seed(12)
    base = CheckpointedOnly(None)
    x = torch.randn(4, 6, 8)

    def run(mode, twice):
        model = CheckpointedOnly(mode)
        model.load_state_dict(base.state_dict())
        before = snapshot(model)
        model, opt, _ = private(PrivacyEngine(), model, C=0.05)
        out = model(x.clone())
        if twice:
            out.sum().backward(retain_graph=True)
            out.square().sum().backward()
        else:
            (out.sum() + out.square().sum()).backward()
        opt.step()
        return updates(model, before)

    twice, once = run("non-reentrant", True), run(None, False)
    for k in once:
        torch.testing.assert_close(twice[k], once[k], rtol=1e-5, atol=1e-8)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")  # reentrant, around a frozen block
@pytest.mark.parametrize("reentrant", [False, True], ids=["diffusers-default", "reentrant"])
def test_diffusers_unet_with_gradient_checkpointing_matches_opacus(reentrant):
    """The DP-LDM setting with the UNet's gradient checkpointing on (diffusers' default non-reentrant function, and
    a reentrant one): the update equals Opacus hooks' on the same model without checkpointing."""
    torch.manual_seed(2)
    base = models.ClassConditionedUNet().double()
    models.freeze_all_but_attention(base)
    trainable = [n for n, p in base.named_parameters() if p.requires_grad]
    batch = tuple(b.double() if b.is_floating_point() else b for b in models.unet_batch(3))

    def run(engine, checkpointing):
        model = copy.deepcopy(base)
        if checkpointing:
            fn = ((lambda m, *a: torch.utils.checkpoint.checkpoint(m.__call__, *a, use_reentrant=True))
                  if reentrant else None)
            model.unet.enable_gradient_checkpointing(fn)
            assert model.unet.is_gradient_checkpointing
        before = snapshot(model)
        loader = DataLoader(TensorDataset(*batch), batch_size=3)
        model, opt, _ = engine.make_private(module=model, optimizer=torch.optim.SGD(
            [p for p in model.parameters() if p.requires_grad], lr=1.0), data_loader=loader, noise_multiplier=0.0,
            max_grad_norm=0.1, poisson_sampling=False)
        models.unet_loss(model, batch).backward()
        opt.step()
        return updates(model, before)

    ours = run(PrivacyEngine(), True)
    theirs = run(opacus.PrivacyEngine(), False)
    moved = 0
    for n in trainable:
        ref = theirs[n]
        if ref.norm() == 0:  # a cross-attention over one context token: no gradient in q and k
            assert ours[n].norm() == 0, n
            continue
        moved += 1
        assert (ours[n] - ref).norm() / ref.norm() < 1e-5, n
    assert moved >= 0.75 * len(trainable)


# --- 11. two forward passes before one step (issue 17, item 2) -----------------------------------------------

def test_second_forward_of_the_same_examples_before_step_is_refused():
    """Two augmented views on two forward passes: each pass used to be clipped on its own (one example's update up
    to 2C under one accountant step; 1.8 C here, C = 1). Refused, as Opacus refuses it under Poisson sampling;
    nothing of either pass reaches a parameter."""
    torch.manual_seed(13)
    x = torch.randn(1, 6, 8) * 50
    engine = PrivacyEngine()
    model, opt, _ = private(engine, mlp(), loss_reduction="sum")
    before = snapshot(model)
    (model(x) ** 2).sum().backward()
    with pytest.raises(RuntimeError, match="module '0' ran forward again after a backward pass"):
        model(x.flip(-1))  # the second view
    opt.step()  # the batch was dropped: a step now is pure noise (none here)
    assert_unchanged(model, before)

    ref = mlp()
    ref, _ropt, _ = opacus.PrivacyEngine().make_private(
        module=ref, optimizer=torch.optim.SGD(ref.parameters(), lr=1.0),
        data_loader=DataLoader(TensorDataset(torch.randn(16, 6, 8)), batch_size=4), noise_multiplier=0.0,
        max_grad_norm=1.0, poisson_sampling=True)
    (ref(x) ** 2).sum().backward()
    with pytest.raises(ValueError, match="Poisson sampling is not compatible with grad accumulation"):
        (ref(x.flip(-1)) ** 2).sum().backward()


def test_views_in_one_forward_with_shared_ids_are_clipped_once():
    """What the refusal points to: both views' rows in one forward, one id per example: one example's update is C."""
    torch.manual_seed(14)
    x = torch.randn(1, 6, 8) * 50
    model = mlp()
    before = snapshot(model)
    model, opt, _ = private(PrivacyEngine(), model, loss_reduction="sum")
    (model(torch.cat([x, x.flip(-1)])) ** 2).sum().backward()
    opt.set_example_ids(torch.tensor([0, 0]))
    opt.step()
    norm = torch.sqrt(sum((u**2).sum() for u in updates(model, before).values()))
    assert norm == pytest.approx(1.0, rel=1e-4)


# --- 12. every zero_grad a user can reach (issue 17, item 3) -------------------------------------------------

ZERO_GRADS = {
    "dpkernels.compile": lambda model, opt, run: run.zero_grad(),
    "torch.compile": lambda model, opt, run: run.zero_grad(),
    "a module holding the model": lambda model, opt, run: nn.ModuleList([model]).zero_grad(),
    "the wrapped optimizer": lambda model, opt, run: opt.original_optimizer.zero_grad(),
    "another optimizer": lambda model, opt, run: torch.optim.Adam(model.parameters()).zero_grad(),
}


@pytest.mark.parametrize("how", list(ZERO_GRADS))
def test_every_reachable_zero_grad_drops_the_batch(how):
    """forward, backward, zero_grad through `how`, then a batch and a step: the update is that batch's alone (as
    after optimizer.zero_grad(), and as Opacus'), never the dropped batch added into it."""
    import dpkernels

    torch.manual_seed(15)
    base = mlp()
    b1 = (torch.randn(4, 6, 8) * 5, torch.randn(4, 3))
    b2 = (torch.randn(4, 6, 8), torch.randn(4, 3))
    alone, _ = step_on(PrivacyEngine(), base, [b2], zero_between=True)
    theirs, _ = step_on(opacus.PrivacyEngine(), base, [b1, b2], zero_between=True)
    torch._dynamo.reset()
    model = copy.deepcopy(base)
    before = snapshot(model)
    engine = PrivacyEngine()
    model, opt, _ = private(engine, model)
    run = {"dpkernels.compile": lambda m: dpkernels.compile(m, backend="aot_eager"),
           "torch.compile": lambda m: torch.compile(m, backend="aot_eager")}.get(how, lambda m: m)(model)
    mse(run, *b1).backward()
    ZERO_GRADS[how](model, opt, run)
    mse(run, *b2).backward()
    opt.step()
    ours = updates(model, before)
    for k in alone:
        torch.testing.assert_close(ours[k], alone[k], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-7)
    assert len(engine.accountant.history) == 1


def test_zero_grad_of_a_submodule_drops_its_layers_only():
    """As in plain PyTorch, zero_grad on a part of the model drops that part's gradient; the rest is clipped over
    the layers left, which is Opacus' update with that part frozen."""
    torch.manual_seed(16)
    base = mlp()
    x, t = torch.randn(4, 6, 8), torch.randn(4, 3)
    model = copy.deepcopy(base)
    before = snapshot(model)
    model, opt, _ = private(PrivacyEngine(), model, C=0.05)
    mse(model, x, t).backward()
    model[0].zero_grad()
    opt.step()
    ours = updates(model, before)
    ref = copy.deepcopy(base)
    ref[0].requires_grad_(False)
    ref_before = snapshot(ref)
    ref, ropt, _ = private(opacus.PrivacyEngine(), ref, params=[p for p in ref.parameters() if p.requires_grad], C=0.05)
    mse(ref, x, t).backward()
    ropt.step()
    theirs = updates(ref, ref_before)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-7)
    assert not ours["0.weight"].any() and ours["2.weight"].any()


# --- 13. rows that are not examples (issue 17, item 4) -------------------------------------------------------

class TimeFirst(nn.Module):
    """Takes [B, T, d] and runs its layers time first, [T, B, d]: each time step was clipped as an example."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x.transpose(0, 1)))).mean(0)


def test_time_first_layers_are_refused():
    """One example (T = 6 time steps), C = 1: its update had norm 1.3 C (each time step clipped to C). Refused at
    the step, naming the module; nothing changes and the accountant does not step."""
    torch.manual_seed(17)
    engine = PrivacyEngine()
    model, opt, _ = private(engine, TimeFirst(), loss_reduction="sum")
    before = snapshot(model)
    (model(torch.randn(1, 6, 8) * 10) ** 2).sum().backward()
    with pytest.raises(RuntimeError, match=r"module 'a'\) saw 6 rows, but no tensor input .* has that many"):
        opt.step()
    assert_unchanged(model, before)
    assert engine.accountant.history == []


def test_time_first_batches_from_the_private_loader_are_refused():
    """The model itself takes [T, B, d] (its inputs' first dimension is T) and the loop transposes the loader's
    batches: the rows are checked against the examples the engine's Poisson loader yielded."""
    torch.manual_seed(18)
    data = TensorDataset(torch.randn(32, 5, 8), torch.randn(32, 3))
    engine = PrivacyEngine()
    model = mlp()
    model, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                             data_loader=DataLoader(data, batch_size=16), noise_multiplier=1.0,
                                             max_grad_norm=1.0, seed=3)
    before = snapshot(model)
    x, _t = next((x, t) for x, t in loader if len(x) not in (0, 5))
    ((model(x.transpose(0, 1)).mean(0).mean(1, keepdim=True) - 1) ** 2).mean().backward()
    with pytest.raises(RuntimeError, match=rf"saw 5 examples \(5 rows\), but the batch the private data loader "
                                           rf"yielded last has {len(x)}"):
        opt.step()
    assert_unchanged(model, before)
    assert engine.accountant.history == []


class TokenSum(nn.Module):
    """Embedding -> Linear on token ids, summed over tokens: the dimension layout is whatever the batch has."""

    def __init__(self):
        super().__init__()
        self.emb, self.lin = nn.Embedding(5, 4), nn.Linear(4, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin(self.emb(ids))


@pytest.mark.parametrize("layout", ["time-first", "packed", "batch-first"])
def test_collated_batches_that_are_not_batch_first_are_refused(layout):
    """The count of examples comes from the indices the Poisson sampler drew, never from the collated batch: a
    collate_fn returning pad_sequence's default [T, B] (or all tokens packed in one dimension) made the batch look
    like T examples, and ONE example's update reached T C (6 C here). Refused as the loader yields it; batch first
    is accepted and clipped to C."""
    from torch.nn.utils.rnn import pad_sequence

    collate = {"time-first": lambda b: (pad_sequence([s for (s,) in b]),),
               "packed": lambda b: (torch.cat([s for (s,) in b]),),
               "batch-first": lambda b: (pad_sequence([s for (s,) in b], batch_first=True),)}[layout]
    data = [(torch.full((6,), 2),)]  # ONE example of 6 tokens
    engine = PrivacyEngine()
    model = TokenSum()
    before = snapshot(model)
    model, opt, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=1.0,
        data_loader=DataLoader(data, batch_size=1, collate_fn=collate), loss_reduction="sum", seed=1)
    batches = iter(loader)
    if layout != "batch-first":
        with pytest.raises(ValueError, match=r"drew 1 examples, but its collated batch .* first dimensions are \[6\]"):
            next(batches)
        return
    (ids,) = next(batches)
    opt.zero_grad()
    (model(ids).sum() * 100).backward()
    opt.step()
    update = torch.cat([v.flatten() for v in updates(model, before).values()])
    assert float(update.norm()) <= 1.0 + 1e-6


def test_time_first_module_is_refused_at_make_private():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0)  # batch_first=False, torch's default
    layer.self_attn.requires_grad_(False)
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"module 'self_attn' \(MultiheadAttention\) has batch_first=False"):
        private(PrivacyEngine(), layer)
    assert all("forward" not in vars(m) for m in layer.modules())
    assert_unchanged(layer, before)


# --- cancelling tokens: a norm that rounding destroyed must not let an example through ------------------------

def cancelling_example(kind: str, seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """ONE example whose token gradients nearly cancel (G_2 = -G_1 + small, on identical inputs): its true
    gradient norm is 1000, its Gram (or direct, or id-Gram) norm in fp32 is rounding noise (0, negative, NaN)."""
    g = torch.Generator().manual_seed(seed)
    a, G1, u = (v / v.norm() for v in torch.randn(3, 64, generator=g))
    Gt = torch.stack([G1, -G1 + 2e-4 * u])[None]  # loss = sum_t <out_t, Gt_t>, so G = Gt
    if kind == "embedding":  # the same id twice: its rows' gradients cancel in the id-Gram
        return nn.Embedding(4, 64), torch.tensor([[2, 2]]), Gt * 5e6
    return nn.Linear(64, 64, bias=kind == "bias"), torch.stack([a, a])[None] * 5e6, Gt


@pytest.mark.parametrize("kind,strategy", [("linear", "ghost"), ("linear", "direct"), ("bias", "ghost"),
                                           ("embedding", None)])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_cancelling_tokens_never_let_one_example_exceed_C(kind, strategy, backend, monkeypatch):
    """A crafted example's update was 1000 C (c = 1 from a norm of 0) or NaN (a negative squared norm) on the
    default backend. Now at most C, as with Opacus hooks (per-sample gradients materialised): the cancellation-free
    bound sum_t ||G_t|| ||a_t|| replaces a norm that rounding made meaningless."""
    import dpkernels.ops

    if strategy is not None:
        monkeypatch.setattr(dpkernels.ops, "choose_strategy", lambda T, d, p: strategy)
    worst = 0.0
    for seed in range(6):
        layer, x, Gt = cancelling_example(kind, seed)
        with torch.no_grad():
            true = torch.einsum("tp,td->pd", Gt[0].double(), x[0].double()).norm() if kind != "embedding" else \
                Gt[0].double().sum(0).norm()
        assert true > 100  # the example needs clipping, by a lot
        before = snapshot(layer)
        model, opt, _ = private(PrivacyEngine(), layer, C=1.0, loss_reduction="sum", backend=backend)
        opt.zero_grad()
        (model(x) * Gt).sum().backward()
        opt.step()
        update = torch.cat([v.flatten() for v in updates(model, before).values()])
        assert torch.isfinite(update).all()
        worst = max(worst, float(update.norm()))  # lr 1: the update is the clipped gradient
    assert worst <= 1.0 + 1e-6, worst


def test_poisson_accounting_with_batches_from_another_loader_warns():
    """poisson_sampling=True, but the loop iterates the user's own (shuffled, fixed-size) loader: the epsilon the
    accountant reports assumes the returned Poisson loader, so the step warns (once); the returned loader does not."""
    torch.manual_seed(21)
    data = TensorDataset(torch.randn(32, 6, 8), torch.randn(32, 3))
    own = DataLoader(data, batch_size=8, shuffle=True)
    engine = PrivacyEngine()
    model = mlp()
    model, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                             data_loader=own, noise_multiplier=1.0, max_grad_norm=1.0, seed=2)
    for batches, warns in ((loader, False), (own, True)):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for x, t in itertools.islice(batches, 2):
                opt.zero_grad()
                mse(model, x, t).backward()
                opt.step()
        hits = [w for w in seen if "did not come from the private data loader" in str(w.message)]
        assert len(hits) == int(warns), [str(w.message) for w in seen]
