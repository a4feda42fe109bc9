"""Privacy accounting across compartments.

Shards are disjoint, so each example is used by exactly one compartment, plus anything trained on several
shards together (the router, each time it is trained). Its privacy loss is the composition, with the same accountant, of
the DP-SGD runs that touched it: its own compartment's history (sigma, sample rate, steps) followed by the shared
ones. By parallel composition, the released set of compartments is (max over shards of that epsilon, delta)-DP
for every example: changing one example changes the input of one compartment only, and the other compartments
are computed from data that did not change. Forgetting a shard removes its compartment and leaves the others'
guarantees unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dpldm import calibration

History = Sequence[Sequence[float]]  # [(noise multiplier, sample rate, steps), ...]


def composed_epsilon(histories: Sequence[History], delta: float, mechanism: str) -> float:
    """Epsilon at delta of the DP-SGD runs in `histories` applied to the same example, composed."""
    return calibration.composed_epsilon([entry for h in histories for entry in h], delta, mechanism)


def privacy_report(compartments: Mapping[str, Mapping[str, Any]], delta: float, mechanism: str,
                   shared: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Per-shard epsilon and the overall one (their maximum); shards marked public (--no-dp) are listed apart. A shard composes its compartment's history with
    every `shared` run ({"shards": [...], "accountant_history": ...}, e.g. each router training) it took part in."""
    per_shard = {name: composed_epsilon([meta["accountant_history"],
                                         *(r["accountant_history"] for r in shared if name in r["shards"])],
                                        delta, mechanism)
                 for name, meta in compartments.items() if not meta.get("public")}
    return {"delta": delta, "accountant": mechanism, "epsilon_per_shard": per_shard,
            "epsilon": max(per_shard.values(), default=0.0),
            "public_shards": sorted(name for name, meta in compartments.items() if meta.get("public"))}
