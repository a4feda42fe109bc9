"""Where each noise draw comes from: a Philox (seed, offset) pair that is never reused.

Every Gaussian the engine adds is element `offset + i` of the counter-based stream
of `seed` (see `reference.philox_normal`). The offset only moves forward, so two
steps never share noise. In secure mode the seed is redrawn from the OS every step.
"""

from __future__ import annotations

import secrets

from dpkernels.conventions import round_up4


class NoiseSource:
    """The noise counters of a run: one (seed, offset) stream, the offset only moving forward.

    Args:
        seed: None (drawn from the OS), or a test seed in [0, 2^63).
        secure_mode: a fresh OS seed at every step (no seed may be given).
    """
    def __init__(self, seed: int | None = None, secure_mode: bool = False):
        if seed is not None and secure_mode:
            raise ValueError("secure_mode draws every seed from the OS; do not pass a seed with it")
        if seed is not None and not 0 <= int(seed) < 2**63:
            raise ValueError(f"seed must be in [0, 2^63), got {seed}")
        self.secure_mode = secure_mode
        self.seed = int(seed) if seed is not None else secrets.randbits(63)
        self.offset = 0

    def new_step(self) -> None:
        """Secure mode: a fresh OS seed for every step (offsets restart with it)."""
        if self.secure_mode:
            self.seed = secrets.randbits(63)
            self.offset = 0

    def take(self, numel: int) -> tuple[int, int]:
        """Reserve counters for one noised tensor.

        Args:
            numel: its elements.

        Returns:
            (seed, first counter); the next take starts round_up4(numel) later.
        """
        start = self.offset
        self.offset += round_up4(numel)
        return self.seed, start

    def state_dict(self) -> dict:
        # Secure mode keeps nothing: a resumed run draws fresh OS seeds.
        """Where the stream stands (PRIVATE: it regenerates the noise). Secure mode keeps nothing.

        Returns:
            {"seed", "offset"}, or {} in secure mode.
        """
        return {} if self.secure_mode else {"seed": self.seed, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        """Resume the stream (ignored in secure mode, and for an empty state).

        Args:
            state: what `state_dict` returned.
        """
        if not self.secure_mode and state:
            self.seed, self.offset = int(state["seed"]), int(state["offset"])
