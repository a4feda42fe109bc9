"""Downstream classifiers for utility: a small CNN (torch), an MLP and logistic regression (sklearn).

Model selection uses a held-out slice of the SYNTHETIC training data; the real test set is touched only
once, by the selected model.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks and a hidden layer: the evaluation's classifier (synthetic data, baselines, DP-SGD).

    Args:
        channels: input channels.
        num_classes: outputs.
        width: the first block's channels (the second has twice as many).
        groups: GroupNorm groups after each conv (0: none). GroupNorm, not BatchNorm: the DP-SGD baselines train
            this same model through the engine, which refuses batch statistics.
        pool: the feature map's side before the hidden layer (adaptive average pooling; 7 keeps 28px inputs'
            7x7 map whole).
        hidden: the hidden layer's width.
        dropout: before the output layer.
    """

    def __init__(self, channels: int, num_classes: int, width: int = 32, groups: int = 0, pool: int = 3,
                 hidden: int = 128, dropout: float = 0.3) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            norm = [nn.GroupNorm(groups, c_out)] if groups else []
            return [nn.Conv2d(c_in, c_out, 3, padding=1), *norm, nn.ReLU(), nn.MaxPool2d(2)]

        self.features = nn.Sequential(
            *block(channels, width), *block(width, 2 * width),
            nn.AdaptiveAvgPool2d(pool), nn.Flatten(), nn.Linear(2 * width * pool * pool, hidden), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits.

        Args:
            x: images in [-1, 1], [N, C, H, W].

        Returns:
            [N, num_classes].
        """
        return self.head(self.features(x))


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W,C] -> float [N,C,H,W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    return float((pred == y).float().mean()) if len(y) else float("nan")


def epochs_for(hp: dict, key: str, n_train: int, batch_size: int = 128) -> int:
    """Epochs of the CNN recipe `key` (e.g. 'public_cnn_epochs'): with `cnn_steps` in the config, every CNN
    (synthetic, (a), (c)) trains for the same number of Adam steps whatever its data size, so that a smaller
    synthetic set is not also given a shorter training than the baselines; else hp[key] epochs."""
    if hp.get("cnn_steps"):
        return max(1, math.ceil(hp["cnn_steps"] / math.ceil(max(1, n_train) / batch_size)))  # batches per epoch
    return int(hp.get(key) or hp["cnn_epochs"])


def split_holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held-out) with a fixed public seed; at least one held-out example."""
    perm = np.random.default_rng(seed).permutation(n)
    k = max(1, round(fraction * n))
    return perm[k:], perm[:k]


def selected_cnn(x: torch.Tensor, y: torch.Tensor, num_classes: int, epochs: int, holdout_fraction: float,
                 seed: int = 0, arch: dict | None = None) -> tuple[SmallCNN, float]:
    """train_cnn on (x, y) less a held-out slice of (x, y) itself, which picks the epoch."""
    tr, val = split_holdout(len(y), holdout_fraction, seed)
    return train_cnn(x[tr], y[tr], x[val], y[val], num_classes, epochs, seed, arch=arch)


def train_cnn(x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, num_classes: int,
              epochs: int, seed: int = 0, batch_size: int = 128, lr: float = 2e-3, arch: dict | None = None
              ) -> tuple[SmallCNN, float]:
    """Adam, random-shift augmentation; returns the epoch with the best accuracy on (x_val, y_val).
    arch: SmallCNN's options (the config's evaluate.cnn)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallCNN(x.shape[1], num_classes, **(arch or {}))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    best, best_acc = copy.deepcopy(model), -1.0
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            xb = _shift(x[idx], g)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        acc = accuracy(model, x_val, y_val)
        if acc > best_acc:
            best, best_acc = copy.deepcopy(model), acc
    return best.eval(), best_acc


def _shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=g))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def sklearn_models(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, seed: int = 0
                   ) -> dict[str, tuple[object, float]]:
    """Logistic regression (C grid) and an MLP (alpha grid), each selected on the synthetic held-out slice."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    out: dict[str, tuple[object, float]] = {}
    candidates = {
        "logreg": [LogisticRegression(C=c, max_iter=300) for c in (0.01, 0.1)],
        "mlp": [MLPClassifier((128,), alpha=a, max_iter=40, early_stopping=False, random_state=seed)
                for a in (1e-4, 1e-2)],
    }
    for name, models in candidates.items():
        best = None
        for m in models:
            m.fit(x, y)
            acc = float(m.score(x_val, y_val)) if len(y_val) else float("nan")
            if best is None or acc > best[1]:
                best = (m, acc)
        out[name] = best
    return out
