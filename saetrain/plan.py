"""Which rank trains which layers under `--distribute-layers`: a pure, balanced plan."""

from __future__ import annotations


def plan_layers(costs: dict[str, float], world: int) -> list[list[str]]:
    """Assign layers to `world` ranks, balancing the summed cost (longest-processing-time first).

    The number of ranks need not divide the number of layers. Ties go to the lower rank,
    and each rank's layers keep the input order, so the plan is deterministic.
    """
    if world < 1:
        raise ValueError(f"world size must be positive, got {world}")
    loads = [0.0] * world
    plan: list[list[str]] = [[] for _ in range(world)]
    order = list(costs)
    for name in sorted(order, key=lambda n: (-costs[n], order.index(n))):
        r = min(range(world), key=lambda i: (loads[i], i))
        plan[r].append(name)
        loads[r] += costs[name]
    return [sorted(p, key=order.index) for p in plan]
