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


def test_ids_grouped_by_shard_split_without_a_reorder_and_keep_each_shards_ids_sorted():
    """shard_grouped puts sorted distinct ids in shard order (each shard's still sorted):
    split_by_shard then needs no reorder (each shard's rows land contiguously, nothing scattered),
    and is_shard_grouped accepts them, so a push of them is not sorted again."""
    from engram_mem.optim import OptimizerSpec
    from engram_mem.client.routing import TableView, is_shard_grouped, shard_grouped, split_by_shard
    from engram_mem.table import TableSpec

    spec = TableSpec("t", 1024, 4, num_slots=8)
    placement = np.array([0, 1, 0, 1, 2, 2, 0, 1], dtype=np.int32)
    t = TableView(spec, OptimizerSpec.from_dict(None), placement)
    ids = np.unique(np.random.default_rng(0).integers(0, 1024, 300))
    grouped, order = shard_grouped(t, ids)
    assert order is not None and np.array_equal(grouped, ids[order]) and np.array_equal(np.sort(grouped), ids)
    ranks = placement[grouped // spec.slot_rows]
    assert np.all(np.diff(ranks) >= 0)
    for r in range(3):
        assert np.all(np.diff(grouped[ranks == r]) > 0)
    same, parts, reorder = split_by_shard(t, grouped, 3)
    assert reorder is None and same is grouped
    assert [(r, b - a) for r, a, b in parts] == [(r, int((ranks == r).sum())) for r in range(3)]
    # sorted ids spread over shards need the reorder; the same ids grouped need none
    assert split_by_shard(t, ids, 3)[2] is not None and shard_grouped(t, grouped)[1] is None
    assert is_shard_grouped(t, grouped) and is_shard_grouped(t, ids[:1])
    assert not is_shard_grouped(t, ids)                                     # sorted, not grouped
    assert not is_shard_grouped(t, np.concatenate([grouped[:5], grouped[4:]]))   # a repeat
    assert not is_shard_grouped(t, np.concatenate([grouped[1:2], grouped[:1], grouped[2:]]))  # unsorted in a shard
