"""How close is a public set to the private one? A CNN trained on each public set, tested on real MNIST.

The embedded default pre-trains on public digits; the closer they are to MNIST, the less the DP step has
to move the model. Run: `python -m benchmarks.public_prior_gap` (about 2 min on 2 cores).
"""

from __future__ import annotations

import torch

from dpldm import data
from dpldm.classifiers import accuracy, to_input, train_cnn


def main(epochs: int = 8) -> None:
    real = data.mnist5k().test
    xt, yt = to_input(real.images), torch.from_numpy(real.labels)
    for name in ("digits", "fontdigits"):
        pub = data.load(name)
        x, y = to_input(pub.train.images), torch.from_numpy(pub.train.labels)
        xv, yv = to_input(pub.test.images), torch.from_numpy(pub.test.labels)
        model, val = train_cnn(x, y, xv, yv, 10, epochs)
        print(f"{name:>10}: {len(y)} public train images, public held-out {val:.3f}, "
              f"real MNIST-5k test {accuracy(model, xt, yt):.3f}")


if __name__ == "__main__":
    main()
