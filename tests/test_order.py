"""The data order and the layer plan are pure functions: test them as properties."""

from __future__ import annotations

import numpy as np
import pytest

from saetrain.order import epoch_windows, split_holdout, window_permutation
from saetrain.plan import plan_layers


@pytest.mark.parametrize("n, frac", [(100, 0.0), (100, 0.05), (7, 0.5), (3, 0.01)])
def test_holdout_is_a_partition(n, frac):
    chunks = list(range(10, 10 + n))
    train, hold = split_holdout(chunks, frac, seed=3)
    assert sorted(train + hold) == chunks and not set(train) & set(hold)
    assert len(hold) == (max(1, round(frac * n)) if frac else 0)
    assert split_holdout(chunks, frac, seed=3) == (train, hold)
    if frac and n > 10:
        assert split_holdout(chunks, frac, seed=4)[1] != hold


@pytest.mark.parametrize("world", [1, 2, 3])
def test_epoch_windows_cover_every_chunk_once(world):
    chunks = list(range(0, 200, 2))
    for epoch in range(3):
        per_rank = [epoch_windows(chunks, seed=1, epoch=epoch, window=8, rank=r, world=world) for r in range(world)]
        flat = [c for windows in per_rank for w in windows for c in w]
        assert sorted(flat) == chunks
        assert all(len(w) <= 8 for windows in per_rank for w in windows)
    a = epoch_windows(chunks, seed=1, epoch=0, window=8)
    assert a == epoch_windows(chunks, seed=1, epoch=0, window=8)
    assert a != epoch_windows(chunks, seed=1, epoch=1, window=8)
    assert a != epoch_windows(chunks, seed=2, epoch=0, window=8)


def test_window_permutation_is_a_permutation():
    p = window_permutation(1000, seed=0, epoch=1, window=2)
    assert sorted(p.tolist()) == list(range(1000))
    assert not np.array_equal(p, window_permutation(1000, seed=0, epoch=1, window=3))


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_layer_plan_balanced(world):
    costs = {f"layer_{i}": float(1 + (i % 3)) for i in range(10)}
    plan = plan_layers(costs, world)
    assert len(plan) == world
    assert sorted(n for p in plan for n in p) == sorted(costs)
    loads = [sum(costs[n] for n in p) for p in plan]
    # LPT is within 4/3 of optimal; optimal >= max(mean load, largest item).
    bound = max(sum(costs.values()) / world, max(costs.values()))
    assert max(loads) <= 4 / 3 * bound + 1e-9
    assert plan == plan_layers(costs, world)


def test_layer_plan_more_ranks_than_layers():
    plan = plan_layers({"a": 1.0, "b": 2.0}, 3)
    assert plan == [["b"], ["a"], []]
