"""Baselines beside the synthetic-data classifiers: is the synthetic data worth releasing?

Each trains the same SmallCNN as the synthetic-data CNN, and each is tested once on the same real test split:
- (a) public only: the PUBLIC data alone; the epoch is chosen on a held-out slice of the public data.
- (b) DP-SGD: dpkernels.PrivacyEngine on the private TRAIN split, at the DP fine-tuning's (epsilon, delta) and
  accountant. Hyper-parameters are fixed in the config (`evaluate.dp_baseline`) and the final model is used:
  choosing an epoch on private data would cost privacy.
- (b2) DP-SGD from public: the same, started from the public-only CNN (a).
- (c) non-private: the private TRAIN split without DP, the ceiling; the epoch is chosen on a held-out slice of
  the private TRAIN split (never on the test split).

Privacy: (b) and (b2) are separate DP computations on the same private data, each at the same epsilon, run for
comparison only: their models are never saved or released. Their test accuracies, and the ceiling's (c), which is
not private at all, depend on the private training data: a result.json that holds them is not covered by the
fine-tuning's DP guarantee (see dpldm/README.md, "Evaluation").
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from dpldm.calibration import noise_multiplier
from dpldm.classifiers import SmallCNN, accuracy, epochs_for, selected_cnn

# Held-out fraction of the public data that picks the public CNN's epoch (also the Frechet feature space's).
PUBLIC_HOLDOUT = 0.1

# evaluate.dp_baseline entries a config leaves out (the mnist preset's)
DP_DEFAULTS = {"epochs": 5, "batch_size": 256, "max_physical_batch_size": 256, "max_grad_norm": 1.0, "lr": 0.5,
               "momentum": 0.9}

# (result key prefix, column title) in the order of the summary table
COLUMNS = (("cnn", "synthetic CNN"), ("baseline_public_cnn", "(a) public only"), ("baseline_dpsgd_cnn", "(b) DP-SGD"),
           ("baseline_dpsgd_public_init_cnn", "(b2) DP-SGD from public"),
           ("baseline_nonprivate_cnn", "(c) non-private ceiling"))


@dataclass(frozen=True)
class DPTarget:
    """The privacy budget of the DP fine-tuning run, which the DP-SGD baselines spend again (separately)."""

    epsilon: float
    delta: float
    accountant: str = "prv"


@dataclass
class Tensors:
    """Model inputs ([N, C, H, W] in [-1, 1]) and labels."""

    x: torch.Tensor
    y: torch.Tensor


def public_only(public: Tensors, num_classes: int, epochs: int, seed: int = 0, arch: dict | None = None
                ) -> tuple[SmallCNN, float]:
    """(a), and the Frechet feature space: trained and selected on public data only."""
    return selected_cnn(public.x, public.y, num_classes, epochs, PUBLIC_HOLDOUT, seed, arch)


def nonprivate(train: Tensors, num_classes: int, epochs: int, holdout_fraction: float, seed: int = 0,
               arch: dict | None = None) -> tuple[SmallCNN, float]:
    """(c): the ceiling; the epoch is picked on a held-out slice of the private TRAIN split."""
    return selected_cnn(train.x, train.y, num_classes, epochs, holdout_fraction, seed, arch)


def calibrate(target: DPTarget, hp: dict[str, Any], n: int) -> float:
    """Sigma that spends target.epsilon over hp['epochs'] passes at q = 1/ceil(n / batch_size) (the loader's q).
    ValueError when unreachable. Computed once for (b) and (b2): the PRV search takes seconds.

    Args:
        target: the (epsilon, delta, accountant) to spend.
        hp: the baseline's hyper-parameters (batch_size, epochs).
        n: the number of private training examples.

    Returns:
        The noise multiplier (dpldm.calibration.noise_multiplier).
    """
    return noise_multiplier(target.epsilon, target.delta, n, hp["batch_size"], hp["epochs"], target.accountant,
                            quiet=True)


def dpsgd(train: Tensors, num_classes: int, target: DPTarget, hp: dict[str, Any], init: SmallCNN | None = None,
          seed: int = 0, noise_seed: int | None = None, backend: str = "auto", sigma: float | None = None,
          arch: dict | None = None) -> tuple[SmallCNN, dict[str, Any]]:
    """(b) / (b2): DP-SGD through dpkernels.PrivacyEngine, `sigma` (default: calibrate(target, ...)) for
    hp['epochs'] passes.

    Poisson batches of expected size hp['batch_size'], flat clipping at hp['max_grad_norm'], SGD with momentum.
    The final model is returned (no selection on private data). `init`: copy its parameters of matching shape
    (all of them when the label sets agree, else the feature layers). noise_seed None: OS-seeded noise and sampling.
    """
    from dpkernels import PrivacyEngine

    if sigma is None:
        sigma = calibrate(target, hp, len(train.y))
    torch.manual_seed(seed)  # public: initialisation and dropout; the noise and the sampling have their own seeds
    model = SmallCNN(train.x.shape[1], num_classes, **(arch or {}))
    if init is not None:
        _copy_matching(model, init)
    model.train()  # dropout in train mode is per example: each example's gradient depends on itself only
    opt = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp.get("momentum", 0.0))
    loader = DataLoader(TensorDataset(train.x, train.y), batch_size=hp["batch_size"])
    engine = PrivacyEngine(accountant=target.accountant)
    model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=sigma, max_grad_norm=hp["max_grad_norm"],
        poisson_sampling=True, backend=backend, seed=noise_seed)
    empty = 0
    for _ in range(hp["epochs"]):
        for xb, yb in engine.virtual_batches(loader, hp.get("max_physical_batch_size", hp["batch_size"])):
            opt.zero_grad(set_to_none=True)
            if len(xb):
                F.cross_entropy(model(xb), yb).backward()  # mean over rows: the engine divides by q N, as Opacus
            else:
                empty += 1  # an empty Poisson batch still steps (pure noise): the accountant counts it
            opt.step()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        epsilon = engine.get_epsilon(target.delta)
    info = {"epsilon": float(epsilon), "target_epsilon": target.epsilon, "delta": target.delta,
            "sigma": float(opt.noise_multiplier), "steps": int(sum(h[2] for h in engine.accountant.history)),
            "sample_rate": engine.sample_rate, "empty_batches": empty}
    return model.eval(), info


def _copy_matching(model: SmallCNN, source: SmallCNN) -> None:
    own = model.state_dict()
    own.update({k: v for k, v in source.state_dict().items() if k in own and own[k].shape == v.shape})
    model.load_state_dict(own)


def run(cfg: dict[str, Any], train: Tensors, test: Tensors, num_classes: int, target: DPTarget | None,
        public_cnn: SmallCNN | None, public_num_classes: int | None, public_s: float = 0.0, seed: int = 0,
        noise_seed: int | None = None, backend: str = "auto",
        frechet: Callable[[SmallCNN], float] | None = None) -> dict[str, Any]:
    """All baselines, as flat result keys. `public_cnn` is (a), trained by the caller (evaluate shares it with the
    Frechet distance) in `public_s` seconds; None when the config names no public data. `frechet(model)`: the
    synthetic data's Frechet distance in a model's features, reported in (c)'s as
    baseline_nonprivate_cnn_frechet_distance (a feature space that knows the private domain, where (a)'s may not:
    digits for Fashion-MNIST; a baseline key: (c) is trained on the private training split)."""
    hp = cfg["evaluate"]
    res: dict[str, Any] = {}
    notes: list[str] = []
    if public_cnn is None:
        notes.append("no public data: (a) and (b2) skipped")
    elif public_num_classes != num_classes:
        notes.append(f"public data has {public_num_classes} classes, private {num_classes}: (a) skipped, (b2) "
                     "starts from the public CNN's feature layers")
    else:
        res.update(baseline_public_cnn_test_acc=accuracy(public_cnn, test.x, test.y), baseline_public_cnn_s=public_s)
    if target is None:
        notes.append("no target epsilon/delta: (b) and (b2) skipped")
    else:
        dp_hp = {**DP_DEFAULTS, **hp.get("dp_baseline", {})}
        res.update(_dp_baselines(train, test, num_classes, target, dp_hp, public_cnn, seed, noise_seed, backend, notes,
                                 hp.get("cnn")))
    t0 = time.time()
    ceiling, val = nonprivate(train, num_classes, epochs_for(hp, "nonprivate_cnn_epochs", len(train.y)),
                              hp["holdout_fraction"], seed, hp.get("cnn"))
    res.update(baseline_nonprivate_cnn_test_acc=accuracy(ceiling, test.x, test.y),
               baseline_nonprivate_cnn_val_acc=val, baseline_nonprivate_cnn_s=time.time() - t0)
    if frechet is not None:
        res["baseline_nonprivate_cnn_frechet_distance"] = frechet(ceiling)
    if notes:
        res["baselines_note"] = "; ".join(notes)
    return res


def _dp_baselines(train: Tensors, test: Tensors, num_classes: int, target: DPTarget, hp: dict[str, Any],
                  public_cnn: SmallCNN | None, seed: int, noise_seed: int | None, backend: str, notes: list[str],
                  arch: dict | None = None) -> dict[str, Any]:
    """(b), and (b2) when there is a public CNN; the calibration's time is counted in each."""
    t0 = time.time()
    try:
        sigma = calibrate(target, hp, len(train.y))
    except ValueError as e:  # e.g. an epsilon unreachable with these epochs and batch size
        notes.append(f"DP-SGD baselines skipped: {e}")
        return {}
    calibration_s = time.time() - t0
    inits = {"baseline_dpsgd_cnn": None}
    if public_cnn is not None:
        inits["baseline_dpsgd_public_init_cnn"] = public_cnn
    res: dict[str, Any] = {}
    for name, init in inits.items():
        t0 = time.time()
        model, info = dpsgd(train, num_classes, target, hp, init, seed, noise_seed, backend, sigma, arch)
        res[f"{name}_test_acc"] = accuracy(model, test.x, test.y)
        res.update({f"{name}_{k}": v for k, v in info.items()})
        res[f"{name}_s"] = time.time() - t0 + calibration_s
    return res


def verdict(res: dict[str, Any]) -> str:
    """One line: does the synthetic-data CNN beat what a user gets without releasing synthetic data?"""
    syn = res.get("cnn_test_acc")
    rivals = {title: res[f"{key}_test_acc"] for key, title in COLUMNS[1:4] if res.get(f"{key}_test_acc") is not None}
    if syn is None or not rivals:
        return "no public-only or DP-SGD baseline to compare with"
    lost = [f"{t} {a:.3f}" for t, a in rivals.items() if a >= syn]
    if not lost:
        return f"synthetic data ({syn:.3f}) beats the public-only and DP-SGD baselines: worth releasing"
    return f"synthetic data ({syn:.3f}) does not beat " + ", ".join(lost) + ": not worth releasing as it is"


def table(res: dict[str, Any], synthetic_epsilon: float | None = None) -> str:
    """Side-by-side real-test accuracies, and the epsilon each spent on the private train split, of the synthetic
    CNN and the baselines, then the verdict. synthetic_epsilon: default res['epsilon'] (the DP run's)."""
    eps = res.get("epsilon") if synthetic_epsilon is None else synthetic_epsilon
    rows: list[list[str]] = [[""], ["real test accuracy"], ["epsilon"]]
    for key, title in COLUMNS:
        acc = res.get(f"{key}_test_acc")
        rows[0].append(title)
        rows[1].append("-" if acc is None else f"{acc:.3f}")
        rows[2].append("-" if acc is None else _epsilon(res, key, eps))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    return "\n".join(lines + [verdict(res)])


def _epsilon(res: dict[str, Any], key: str, synthetic: float | None) -> str:
    if key == "cnn":
        return "?" if synthetic is None else f"{synthetic:.2f}"
    if key == "baseline_public_cnn":
        return "0 (public)"
    if key == "baseline_nonprivate_cnn":
        return "inf (not DP)"
    return f"{res[key + '_epsilon']:.2f}"
