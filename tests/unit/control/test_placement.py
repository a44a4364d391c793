import numpy as np
import pytest

from engram_mem.control.placement import initial_placement, rebalance, targets


def test_initial_placement_is_contiguous_and_balanced():
    p = initial_placement(4096, 3)
    assert np.all(np.diff(p) >= 0)
    assert np.bincount(p).max() - np.bincount(p).min() <= 1


@pytest.mark.parametrize("n_slots, before, after", [(4096, 2, 3), (4096, 3, 2), (100, 1, 4), (100, 4, 1), (7, 2, 5), (4096, 4, 4)])
def test_rebalance_moves_the_fewest_slots(n_slots, before, after):
    p = initial_placement(n_slots, before)
    q, moves = rebalance(p, after)
    counts = np.bincount(q, minlength=after)
    assert q.max() < after and np.array_equal(np.sort(counts)[::-1], np.sort(targets(n_slots, after))[::-1])
    moved = np.nonzero(p != q)[0]
    # Every move is listed once, from the old owner to the new one.
    listed = np.sort(np.concatenate([s for s in moves.values()])) if moves else np.zeros(0, int)
    assert np.array_equal(listed, moved)
    for (src, dst), slots in moves.items():
        assert np.all(p[slots] == src) and np.all(q[slots] == dst)
    # The minimum: each kept shard keeps min(had, target) slots.
    had = np.bincount(p, minlength=max(before, after))
    want = np.zeros_like(had)
    want[:after] = targets(n_slots, after)
    assert moved.size == int(np.maximum(had - want, 0).sum())


def test_split_by_shard_never_drops_ids_of_a_shard_it_does_not_know():
    """A placement that names a shard the client's view lacks (a scale in progress) must not lose
    that shard's part of a request: the split refuses with StaleEpoch, and the client re-reads."""
    from engram_mem.errors import StaleEpoch
    from engram_mem.optim import OptimizerSpec
    from engram_mem.client.routing import TableView, split_by_shard
    from engram_mem.table import TableSpec

    spec = TableSpec("t", 1024, 4, num_slots=8)
    placement = np.array([0, 1, 0, 1, 2, 2, 0, 1], dtype=np.int32)
    t = TableView(spec, OptimizerSpec.from_dict(None), placement)
    ids = np.arange(0, 1024, 16)
    grouped, parts, _ = split_by_shard(t, ids, 3)
    assert sum(b - a for _, a, b in parts) == ids.size and {r for r, _, _ in parts} == {0, 1, 2}
    with pytest.raises(StaleEpoch, match="names shard 2"):
        split_by_shard(t, ids, 2)
