"""The sampling rate and the noise multiplier of a DP training, one formula for every DP trainer in dpldm.

dpldm.train, its compartments (dpldm.compartments.train), the router and the DP-SGD baselines all sample with
Poisson batches from a loader of N examples in batches of B: the engine reads the rate off the loader as
1/len(loader) = 1/ceil(N/B), and sigma is calibrated for that rate.
"""

from __future__ import annotations

import contextlib
import math
import warnings


def batches_per_epoch(n: int, batch_size: int) -> int:
    """ceil(n / batch_size): the length of a loader of n examples in batches of batch_size.

    Args:
        n: the number of training examples.
        batch_size: the expected (Poisson) batch size.

    Returns:
        The number of logical steps in one epoch.
    """
    return math.ceil(n / batch_size)


def sample_rate(n: int, batch_size: int) -> float:
    """The Poisson sampling rate q = 1/ceil(n / batch_size) the engine reads off the loader (1 / len(loader)).

    Args:
        n: the number of training examples.
        batch_size: the expected (Poisson) batch size.

    Returns:
        q, in (0, 1].
    """
    return 1.0 / batches_per_epoch(n, batch_size)


def noise_multiplier(target_epsilon: float, delta: float, n: int, batch_size: int, epochs: int, accountant: str,
                     quiet: bool = False) -> float:
    """Sigma that spends target_epsilon at delta over `epochs` passes at q = sample_rate(n, batch_size).

    Args:
        target_epsilon: the budget to spend.
        delta: the target delta.
        n: the number of training examples.
        batch_size: the expected (Poisson) batch size.
        epochs: passes over the data (epochs * ceil(n / batch_size) steps).
        accountant: "prv", "rdp" or "gdp".
        quiet: hide the warning Opacus' PRV accountant gives about its RDP bound's largest alpha (its domain is
            sized with that bound; the PRV answer is not affected).

    Returns:
        The noise multiplier sigma.

    Raises:
        ValueError: when target_epsilon is unreachable (the PRV search takes seconds either way).
    """
    from dpkernels.privacy import get_noise_multiplier  # the accountants load on first use, not on import

    # not quiet: no catch_warnings either, which would reset the once-per-location record of warnings shown
    with warnings.catch_warnings() if quiet else contextlib.nullcontext():
        if quiet:
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                    sample_rate=sample_rate(n, batch_size), epochs=epochs, accountant=accountant)
