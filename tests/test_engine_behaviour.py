"""The engine's contract beyond parity: one backward pass, virtual batches, noise multiplicity,
empty batches, noise, accounting, and a clear error (and an unchanged model) for every bad input."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

import dpkernels
from dpkernels import PrivacyEngine
from tests import models


def make(model, n=16, batch_size=4, noise=0.0, C=1.0, poisson=False, dim=(6, 8), data=None, **kw):
    data = data or TensorDataset(torch.randn(n, *dim), torch.randn(n, 3))
    loader = DataLoader(data, batch_size=batch_size)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    engine = PrivacyEngine(accountant=kw.pop("accountant", "prv"))
    model, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=noise,
                                             max_grad_norm=C, poisson_sampling=poisson, **kw)
    return engine, model, opt, loader


def mlp(d=8, h=16):
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, 3))


def mse(model, x, t):
    return ((model(x).mean(1) - t) ** 2).mean()


def per_example_reference(model, xs, ts, ids, C, E):
    """Brute force: each example's gradient (mean over its rows), flat-clipped, summed, / E."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for e in ids.unique():
        rows = ids == e
        g = torch.autograd.grad(mse(model, xs[rows], ts[rows]), params)
        norm = torch.sqrt(sum((x**2).sum() for x in g))
        c = min(1.0, C / (norm.item() + 1e-6))
        total = [a + c * b for a, b in zip(total, g)]
    return [t / E for t in total]


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.shapes.append(tuple(out.shape))
        return out


def test_one_backward_pass_computes_no_weight_gradients():
    torch.manual_seed(0)
    model = mlp()
    x, t = torch.randn(4, 6, 8), torch.randn(4, 3)
    plain = copy.deepcopy(model)
    loss = mse(plain, x, t)
    with CountMatmuls() as counted:
        loss.backward()
    weight_shapes = {tuple(p.shape) for p in plain.parameters() if p.dim() == 2}
    assert weight_shapes & set(counted.shapes), "the non-private backward should compute weight gradients"

    _, model, opt, _ = make(model)
    loss = mse(model, x, t)
    with CountMatmuls() as ours:
        loss.backward()
    assert not weight_shapes & set(ours.shapes), f"weight-gradient GEMMs ran in our backward: {ours.shapes}"
    assert len(ours.shapes) == 2  # the input gradients of layers 2 and 3; layer 1's input needs none
    assert all(p.grad is None for p in model.parameters())  # nothing written before step
    opt.step()
    assert all(p.grad is not None for p in model.parameters())


def test_virtual_batches_equal_one_physical_batch_and_noise_is_added_once():
    torch.manual_seed(1)
    base = mlp()
    data = TensorDataset(torch.randn(12, 6, 8), torch.randn(12, 3))
    engine, model, opt, loader = make(copy.deepcopy(base), data=data, batch_size=12)
    before = [p.detach().clone() for p in model.parameters()]
    chunks = 0
    for x, t in engine.virtual_batches(loader, max_physical_batch_size=5):
        opt.zero_grad()
        mse(model, x, t).backward()
        opt.step()
        chunks += 1
    assert chunks == 3
    split = [p.detach() - b for p, b in zip(model.parameters(), before)]

    engine, model2, opt2, loader2 = make(copy.deepcopy(base), data=data, batch_size=12)
    x, t = next(iter(loader2))
    mse(model2, x, t).backward()
    opt2.step()
    whole = [p.detach() - b for p, b in zip(model2.parameters(), before)]
    for a, b in zip(split, whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert len(engine.accountant.history) == 1

    # with noise and zero data: one draw of std sigma*C/E, not sqrt(chunks) times more
    lin = nn.Linear(64, 256, bias=False)
    data = TensorDataset(torch.zeros(12, 64), torch.zeros(12, 256))
    eng = PrivacyEngine()
    lin, o, dl = eng.make_private(module=lin, optimizer=torch.optim.SGD(lin.parameters(), lr=1.0),
                                  data_loader=DataLoader(data, batch_size=12), noise_multiplier=2.0, max_grad_norm=1.5,
                                  poisson_sampling=False, seed=7)
    for i, (x, y) in enumerate(eng.virtual_batches(dl, 5)):
        ((lin(x) - y) ** 2).mean().backward()
        o.step()
        assert (lin.weight.grad is None) == (i < 2), "only the last chunk's step writes gradients"
    std = lin.weight.grad.std().item()
    assert abs(std - 2.0 * 1.5 / 12) < 0.03 * (2.0 * 1.5 / 12)


def test_noise_multiplicity_clips_each_example_once():
    torch.manual_seed(2)
    base = mlp()
    k, n_ex = 3, 4
    ids = torch.arange(n_ex).repeat_interleave(k)
    x, t = torch.randn(n_ex * k, 6, 8), torch.randn(n_ex * k, 3)
    C, E = 0.05, 4
    for order in (torch.arange(n_ex * k), torch.randperm(n_ex * k)):  # grouped rows, then shuffled rows
        _, model, opt, _ = make(copy.deepcopy(base), n=16, batch_size=E, C=C)
        before = [p.detach().clone() for p in model.parameters()]
        mse(model, x[order], t[order]).backward()
        opt.set_example_ids(ids[order])
        opt.step()
        ours = [b - p.detach() for p, b in zip(model.parameters(), before)]
        ref = per_example_reference(copy.deepcopy(base), x, t, ids, C, E)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # unequal copies per example
    ids = torch.tensor([0, 0, 1, 2, 2, 2])
    _, model, opt, _ = make(copy.deepcopy(base), n=16, batch_size=E, C=C)
    before = [p.detach().clone() for p in model.parameters()]
    loss = mse(model, x[:6], t[:6])
    loss.backward()
    opt.set_example_ids(ids)
    opt.step()
    ours = [b - p.detach() for p, b in zip(model.parameters(), before)]
    # the loss is a mean over rows: example e's gradient is (n_ex / rows) * (sum of its rows' gradients)
    params = [p for p in base.parameters()]
    ref = [torch.zeros_like(p) for p in params]
    for e in range(3):
        rows = ids == e
        g = torch.autograd.grad(((base(x[:6][rows]).mean(1) - t[:6][rows]) ** 2).sum() * 3 / 6, params)
        norm = torch.sqrt(sum((gi**2).sum() for gi in g)).item()
        ref = [r + min(1.0, C / (norm + 1e-6)) * gi / E for r, gi in zip(ref, g)]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_empty_poisson_batch_steps_with_pure_noise():
    torch.manual_seed(3)
    model = models.AllLayers()
    data = TensorDataset(*models.all_layers_batch(8))
    engine = PrivacyEngine()
    model, opt, _loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                             data_loader=DataLoader(data, batch_size=2), noise_multiplier=1.0,
                                             max_grad_norm=1.0, seed=3)
    before = [p.detach().clone() for p in model.parameters()]
    empty = tuple(b[:0] for b in models.all_layers_batch(8))
    models.all_layers_loss(model, empty).backward()  # a mean over no rows: NaN loss, empty gradients
    opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.isfinite(p).all() and not torch.equal(p, b), "an empty batch must still add noise"
    assert len(engine.accountant.history) == 1
    opt.zero_grad()
    opt.step()  # no forward at all: still a noisy step
    assert engine.accountant.history == [(1.0, 0.25, 2)]


def test_noise_statistics_and_no_reuse():
    lin = nn.Linear(128, 256)
    sigma, C, E = 1.3, 0.7, 10
    data = TensorDataset(torch.zeros(40, 128), torch.zeros(40, 256))
    engine = PrivacyEngine()
    lin, opt, _loader = engine.make_private(module=lin, optimizer=torch.optim.SGD(lin.parameters(), lr=0.0),
                                           data_loader=DataLoader(data, batch_size=E), noise_multiplier=sigma,
                                           max_grad_norm=C, poisson_sampling=False, seed=1234)
    grads = []
    for _ in range(2):
        opt.step()
        grads.append(lin.weight.grad.clone())
    g = grads[0]
    expected = sigma * C / E
    assert abs(g.mean().item()) < 4 * expected / math.sqrt(g.numel())
    assert abs(g.std().item() / expected - 1) < 0.02
    corr = torch.corrcoef(torch.stack([grads[0].flatten(), grads[1].flatten()]))[0, 1]
    assert abs(corr) < 0.02, "two steps share noise"
    assert not torch.equal(lin.weight.grad[:, :1].flatten(), lin.bias.grad), "weight and bias share noise"


def test_seed_reproduces_and_secure_mode_does_not():
    def noise_of(**kw):
        lin = nn.Linear(16, 16)
        data = TensorDataset(torch.zeros(8, 16), torch.zeros(8, 16))
        engine = PrivacyEngine(secure_mode=kw.pop("secure_mode", False))
        lin, opt, _ = engine.make_private(module=lin, optimizer=torch.optim.SGD(lin.parameters(), lr=0.0),
                                          data_loader=DataLoader(data, batch_size=4), noise_multiplier=1.0,
                                          max_grad_norm=1.0, poisson_sampling=False, **kw)
        opt.step()
        return lin.weight.grad.clone()

    assert torch.equal(noise_of(seed=5), noise_of(seed=5))
    assert not torch.equal(noise_of(seed=5), noise_of(seed=6))
    assert not torch.equal(noise_of(secure_mode=True), noise_of(secure_mode=True))
    with pytest.raises(ValueError, match="secure_mode"):
        noise_of(secure_mode=True, seed=1)


@pytest.mark.parametrize("accountant,cls", [("prv", PRVAccountant), ("rdp", RDPAccountant)])
def test_epsilon_equals_opacus_accountant(accountant, cls):
    _, model, opt, loader = make(mlp(), n=40, batch_size=4, noise=1.1, poisson=True, accountant=accountant)
    engine = model._dpkernels_engine
    for _ in range(7):
        for x, t in loader:
            opt.zero_grad()
            if len(x):
                mse(model, x, t).backward()
            opt.step()
            break
    ref = cls()
    for _ in range(7):
        ref.step(noise_multiplier=1.1, sample_rate=0.1)
    assert engine.get_epsilon(1e-5) == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-9)


def test_make_private_with_epsilon_calibrates_with_opacus():
    model = mlp()
    data = TensorDataset(torch.randn(100, 6, 8), torch.randn(100, 3))
    engine = PrivacyEngine(accountant="rdp")
    model, opt, _loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=10), target_epsilon=3.0, target_delta=1e-5, epochs=2,
        max_grad_norm=1.0)
    sigma = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.1, epochs=2, accountant="rdp")
    assert opt.noise_multiplier == sigma
    for _ in range(20):
        opt.step()
    assert engine.get_epsilon(1e-5) <= 3.0 + 0.01


# --- bad inputs: a clear error, and the model unchanged -------------------------------------------

class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.fc(x))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(x))


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        return self.a(self.a(x))


@pytest.mark.parametrize("model,message", [
    (WithBatchNorm(), r"module 'bn' \(BatchNorm1d\) has trainable parameter 'weight'"),
    (Tied(), r"weight tying"),
])
def test_unsupported_models_are_refused_before_anything_changes(model, message):
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        make(model, dim=(4,))
    assert all("forward" not in vars(m) for m in model.modules()), "a module was patched despite the error"
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_module_called_twice_is_refused_before_any_step():
    model = Twice()
    state = copy.deepcopy(model.state_dict())
    _, model, _opt, _ = make(model, dim=(4,))
    with pytest.raises(RuntimeError, match="called twice"):
        model(torch.randn(3, 4))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


@pytest.mark.parametrize("where", ["input", "target"])
def test_non_finite_examples_contribute_nothing_and_the_step_goes_on(where, caplog):
    """An example whose gradient is inf/NaN is dropped (c = 0, its rows zeroed): refusing the step instead would
    make the step's happening depend on that one example (a membership signal outside the noise). The update equals
    the one of the same batch with that example's loss removed, and the accountant steps."""
    torch.manual_seed(3)
    x, t = torch.randn(4, 6, 8), torch.randn(4, 3)
    (x if where == "input" else t)[1].fill_(float("inf"))
    losses = {}
    for name, keep in (("dropped", [0, 1, 2, 3]), ("without", [0, 2, 3])):
        torch.manual_seed(4)
        engine, model, opt, _ = make(mlp(), loss_reduction="sum", C=0.5)
        before = copy.deepcopy(model.state_dict())
        with caplog.at_level(logging.WARNING, logger="dpkernels"):
            ((model(x[keep]).mean(1) - t[keep]) ** 2).sum().backward()
            opt.step()
        losses[name] = {k: v - before[k] for k, v in model.state_dict().items()}
        assert len(engine.accountant.history) == 1
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert "1 of 4 examples had a non-finite gradient" in caplog.text
    for k, v in losses["dropped"].items():
        torch.testing.assert_close(v, losses["without"][k], rtol=1e-5, atol=1e-7)


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="optimizer holds a parameter"):
        model = mlp()
        engine = PrivacyEngine()
        engine.make_private(module=model, optimizer=torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=1.0),
                            data_loader=DataLoader(TensorDataset(torch.randn(8, 8)), batch_size=2),
                            noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="unknown backend"):
        make(mlp(), backend="fpga")
    with pytest.raises(ValueError, match="max_grad_norm must be positive"):
        make(mlp(), C=0.0)
    with pytest.raises(ValueError, match="per-layer clipping needs 6 thresholds"):
        make(mlp(), C=[1.0, 2.0], clipping="per_layer")
    with pytest.raises(ValueError, match="noise_multiplier"):
        make(mlp(), noise=-1.0)
    _, model, opt, _ = make(mlp())
    mse(model, torch.randn(4, 6, 8), torch.randn(4, 3)).backward()
    with pytest.raises(ValueError, match="one id per row"):
        opt.set_example_ids(torch.tensor([0, 1]))
        opt.step()
    with pytest.raises(ValueError, match="no trainable parameters"):
        frozen = mlp().requires_grad_(False)
        PrivacyEngine().make_private(module=frozen, optimizer=torch.optim.SGD(frozen.parameters(), lr=1.0),
                                     data_loader=DataLoader(TensorDataset(torch.randn(8, 8)), batch_size=2),
                                     noise_multiplier=1.0, max_grad_norm=1.0)


def test_per_layer_sensitivity_is_the_norm_of_the_thresholds():
    _, _, opt, _ = make(mlp(), C=[0.5] * 6, clipping="per_layer")
    assert opt.max_grad_norm == pytest.approx(0.5 * math.sqrt(6))
    _, _, opt, _ = make(mlp(), C=2.0, clipping="per_layer")
    assert opt.max_grad_norm == pytest.approx(2.0)


def test_package_exports():
    assert dpkernels.PrivacyEngine is PrivacyEngine
