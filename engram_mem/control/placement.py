"""Placement: which shard owns each slot of each table, and the epoch that versions it.

A table's slots start as contiguous ranges, one per shard. When the shard count changes, only
the slots needed to even out the load move (each shard ends with floor or ceil of n_slots/shards),
and the epoch goes up by one. Clients route by the placement they read; a shard that sees another
epoch answers "stale epoch" and the client re-reads it.

    p = initial_placement(n_slots=4096, shards=2)        # int32 [4096]: shard of each slot
    q, moves = rebalance(p, shards=3)                     # moves: {(src, dst): slots}
"""

from __future__ import annotations

import numpy as np

from engram_mem.errors import InvalidArgument


def initial_placement(n_slots: int, shards: int) -> np.ndarray:
    if shards <= 0:
        raise InvalidArgument(f"shard count must be positive, got {shards}")
    return (np.arange(n_slots, dtype=np.int64) * shards // n_slots).astype(np.int32)


def targets(n_slots: int, shards: int) -> np.ndarray:
    """Balanced slot count per shard: the first n_slots % shards shards take one extra."""
    t = np.full(shards, n_slots // shards, dtype=np.int64)
    t[: n_slots % shards] += 1
    return t


def rebalance(placement: np.ndarray, shards: int) -> tuple[np.ndarray, dict[tuple[int, int], np.ndarray]]:
    """Move the fewest slots so that `shards` shards hold a balanced share each.

    Shards >= `shards` give up all their slots (scale down); new shards receive slots (scale up).
    Returns the new placement and the moves grouped by (source, destination).
    """
    if shards <= 0:
        raise InvalidArgument(f"shard count must be positive, got {shards}")
    placement = np.asarray(placement, dtype=np.int32)
    n = placement.size
    want = targets(n, shards)
    new = placement.copy()
    # Slots a shard must give up: all of them on removed shards, the surplus (its highest slots) elsewhere.
    spare: list[int] = []
    for s in range(int(placement.max(initial=-1)) + 1):
        owned = np.nonzero(placement == s)[0]
        keep = int(want[s]) if s < shards else 0
        spare.extend(owned[keep:].tolist())
    have = np.bincount(new[~np.isin(np.arange(n), spare)], minlength=shards)[:shards]
    moves: dict[tuple[int, int], list[int]] = {}
    it = iter(sorted(spare))
    for dst in range(shards):
        for _ in range(int(want[dst] - have[dst])):
            slot = next(it)
            moves.setdefault((int(placement[slot]), dst), []).append(slot)
            new[slot] = dst
    return new, {k: np.asarray(v, dtype=np.int64) for k, v in moves.items()}
