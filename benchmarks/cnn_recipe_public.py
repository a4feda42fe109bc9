"""Choose the evaluation CNN's training length on PUBLIC data only (issue 9): train `train_cnn` on N font-rendered
digits for E epochs, score it on other renders and on sklearn's handwritten digits (upscaled). No MNIST is read.

    python -m benchmarks.cnn_recipe_public --n 2000 --epochs 8,40,128
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from dpldm import data, font_digits
from dpldm.classifiers import accuracy, split_holdout, to_input, train_cnn


def renders(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = font_digits.render(n, seed=seed)
    return to_input(x[..., None]), torch.from_numpy(y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", default="2000", help="comma-separated training set sizes")
    p.add_argument("--epochs", default="8,40,128", help="comma-separated epoch counts")
    args = p.parse_args()
    other = renders(3000, seed=4242)
    sk = data.digits28()
    proxy = (to_input(np.concatenate([sk.train.images, sk.test.images])),
             torch.from_numpy(np.concatenate([sk.train.labels, sk.test.labels])))
    for n in (int(v) for v in args.n.split(",")):
        x, y = renders(n, seed=99)
        tr, val = split_holdout(n, 0.1, 0)
        for epochs in (int(v) for v in args.epochs.split(",")):
            t0 = time.time()
            model, val_acc = train_cnn(x[tr], y[tr], x[val], y[val], 10, epochs, 0)
            steps = epochs * -(-len(tr) // 128)
            print(f"n {n} epochs {epochs} steps {steps}: own held-out {val_acc:.3f}, other renders "
                  f"{accuracy(model, *other):.3f}, sklearn digits {accuracy(model, *proxy):.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
