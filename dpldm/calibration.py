"""The sampling rate and the noise multiplier of a DP training, one formula for every DP trainer in dpldm.

dpldm.train, its compartments (dpldm.compartments.train), the router and the DP-SGD baselines all sample with
Poisson batches from a loader of N examples in batches of B: the engine reads the rate off the loader as
1/len(loader) = 1/ceil(N/B), and sigma is calibrated for that rate.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Sequence


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
                     quiet: bool = False, prior: Sequence[tuple[float, float, int]] = ()) -> float:
    """Sigma that spends target_epsilon at delta over `epochs` passes at q = sample_rate(n, batch_size), after the
    mechanisms in `prior` (composed by the accountant, never by adding epsilons).

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
    # not quiet: no catch_warnings either, which would reset the once-per-location record of warnings shown
    with warnings.catch_warnings() if quiet else contextlib.nullcontext():
        if quiet:
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return _calibrated(float(target_epsilon), float(delta), sample_rate(n, batch_size), int(epochs),
                           epochs * batches_per_epoch(n, batch_size), accountant,
                           tuple((float(s), float(q), int(k)) for s, q, k in prior))


@functools.lru_cache(maxsize=256)
def _calibrated(target: float, delta: float, q: float, epochs: int, steps: int, accountant: str,
                prior: tuple[tuple[float, float, int], ...]) -> float:
    # a pure function of its arguments, remembered: a compartments run checks each shard's rate before training
    # and dpldm.train calibrates it again, each a PRV search of seconds to a minute (a refusal is not remembered)
    from dpkernels.privacy import get_noise_multiplier  # the accountants load on first use, not on import

    if not prior:
        return get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, epochs=epochs,
                                    accountant=accountant)
    return _after_prior(target, delta, q, steps, accountant, list(prior))


def composed_epsilon(history: Sequence[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """The epsilon of mechanisms composed by the accountant.

    Args:
        history: (sigma, sample rate, steps) entries, as an Opacus accountant's history.
        delta: the target delta.
        accountant: "prv", "rdp" or "gdp".

    Returns:
        epsilon.
    """
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    if not acc.history:
        return 0.0
    with warnings.catch_warnings():  # PRV at sample rate 1 (a release on the whole data): log(1 - q) = -inf, unused
        warnings.filterwarnings("ignore", message="divide by zero", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(acc.get_epsilon(delta=delta))


def _after_prior(target: float, delta: float, q: float, steps: int, accountant: str,
                 prior: list[tuple[float, float, int]], tolerance: float = 0.01, max_sigma: float = 2000.0) -> float:
    # Opacus' bisection (get_noise_multiplier), with the prior mechanisms in the history
    if composed_epsilon(prior, delta, accountant) >= target:
        raise ValueError(f"the mechanisms before DP-SGD alone spend epsilon "
                         f"{composed_epsilon(prior, delta, accountant):.3f} >= {target}")
    low, high, eps_high = 0.0, 10.0, float("inf")
    while eps_high > target:
        high *= 2
        if high > max_sigma:
            raise ValueError("The privacy budget is too low.")
        eps_high = composed_epsilon([*prior, (high, q, steps)], delta, accountant)
    while target - eps_high > tolerance:
        mid = (low + high) / 2
        eps = composed_epsilon([*prior, (mid, q, steps)], delta, accountant)
        if eps < target:
            high, eps_high = mid, eps
        else:
            low = mid
    return high
