"""The engine as a hostile or careless user drives it: every way found to get an update that is not
DP-SGD (or that differs from Opacus without saying so) is tried here, and must be refused or match."""

from __future__ import annotations

import copy
import gc
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
    same through a torch.compile'd model (aot_eager; dpkernels/layers/compiled.py)."""
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
