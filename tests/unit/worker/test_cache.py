import numpy as np

from engram_mem.worker.cache import CountMinSketch, RowCache

D = 4


def _rows(ids):
    return np.repeat(ids.astype(np.float32)[:, None], D, axis=1)


def _fetch(cache, ids):
    """What the fetcher does: look up, then count the access and offer the misses (their rows = their ids)."""
    ids = np.unique(ids)
    hit, rows, noted = cache.peek(ids)
    assert np.array_equal(rows, _rows(ids[hit]))  # a hit always serves that id's own row
    cache.record_and_admit(ids, ids[~hit], _rows(ids[~hit]), noted)
    return hit


def test_sketch_never_underestimates():
    s = CountMinSketch(width=64)
    ids = np.arange(500)
    counts = np.arange(500) % 7 + 1
    s.add(ids, counts)
    assert np.all(s.estimate(ids) >= counts)


def test_capacity_is_bounded_in_bytes():
    budget = 100 * (D * 4 + 68)
    cache = RowCache(capacity_bytes=budget, dim=D, dtype=np.float32)
    assert cache.capacity == 100 and cache.nbytes <= budget
    for i in range(20):
        _fetch(cache, np.arange(i * 50, i * 50 + 50) * 7919)
    assert len(cache) == 100 and cache.n_free == 0 and cache.keys.size == 100
    hit, rows = cache.lookup(cache.keys)
    assert hit.all() and np.array_equal(rows, _rows(cache.keys))
    assert cache.nbytes <= budget


def test_many_evictions_and_invalidations_keep_the_index_exact():
    """Churn far beyond the capacity (tombstones, index rebuilds): every lookup still answers
    exactly the ids cached, each with its own row."""
    rng = np.random.default_rng(5)
    cache = RowCache(capacity_bytes=300 * (D * 4 + 68), dim=D, dtype=np.float32)
    for i in range(400):
        ids = np.unique(rng.zipf(1.3, 200) % 5000)
        _fetch(cache, ids)
        if i % 7 == 0:
            cache.invalidate(rng.integers(0, 5000, 50))
    cached = set(cache.keys.tolist())
    assert len(cached) == len(cache) <= cache.capacity
    probe = np.arange(5000)
    hit, rows = cache.lookup(probe)
    assert set(probe[hit].tolist()) == cached
    assert np.array_equal(rows, _rows(probe[hit]))


def test_hot_rows_survive_a_scan_of_cold_ones():
    cache = RowCache(capacity_bytes=64 * (D * 4 + 68), dim=D, dtype=np.float32)
    hot = np.arange(32) * 1000
    for _ in range(10):
        _fetch(cache, hot)
    for start in range(1, 20_000, 200):          # a long scan (every cold id asked for once)
        _fetch(cache, np.concatenate([hot, np.arange(start, start + 200)]))  # while the hot ones stay hot
    hit = _fetch(cache, hot)
    assert hit.all()


def test_zipf_traffic_hit_rate_is_near_the_ideal():
    rng = np.random.default_rng(0)
    n_ids, cap = 100_000, 2000
    cache = RowCache(capacity_bytes=cap * (D * 4 + 68), dim=D, dtype=np.float32)
    draw = lambda: rng.zipf(1.2, 4096) % n_ids  # noqa: E731
    for _ in range(50):
        _fetch(cache, draw())
    hits = looked = 0
    seen = []
    for _ in range(50):
        ids = draw()
        seen.append(ids)
        uniq = np.unique(ids)
        hits += int(_fetch(cache, ids).sum())
        looked += uniq.size
    # The ideal: a cache holding the `cap` most frequent ids of this traffic.
    all_ids, counts = np.unique(np.concatenate(seen), return_counts=True)
    top = set(all_ids[np.argsort(-counts)[:cap]].tolist())
    ideal = sum(int(np.isin(np.unique(ids), list(top)).sum()) for ids in seen)
    assert hits / looked > 0.8 * ideal / looked, (hits / looked, ideal / looked)


def test_invalidate_drops_rows_and_a_fetch_that_overlapped_it_admits_nothing():
    cache = RowCache(capacity_bytes=1 << 16, dim=D, dtype=np.float32)
    ids = np.arange(10)
    _fetch(cache, ids)
    assert len(cache) == 10
    assert cache.invalidate(np.array([3, 4, 99])) == 2
    assert set(cache.keys.tolist()) == set(range(10)) - {3, 4}
    hit, _, noted = cache.peek(np.array([3, 4]))
    cache.invalidate(np.array([3]))               # a push lands while the fetch is reading
    cache.record_and_admit(np.array([3, 4]), np.array([3, 4]), _rows(np.array([3, 4])), noted)
    assert 3 not in cache.keys and 4 not in cache.keys
    assert cache.stats["stale_skipped"] == 2


def test_a_fetch_booked_after_its_answer_counts_its_access_and_keeps_the_staleness_rule():
    """The agent's order: peek (no count), answer, then record_and_admit from the noted state."""
    cache = RowCache(capacity_bytes=1 << 16, dim=D, dtype=np.float32, min_frequency=2)
    ids = np.arange(8)
    hit, _, noted = cache.peek(ids)
    assert not hit.any() and cache.sketch.estimate(ids).max() == 0    # peek counts nothing
    cache.record_and_admit(ids, ids, _rows(ids), noted)              # counted once: under min_frequency
    assert len(cache) == 0 and np.all(cache.sketch.estimate(ids) >= 1)
    hit, _, noted = cache.peek(ids)
    cache.record_and_admit(ids, ids, _rows(ids), noted)              # second access: admitted
    assert set(cache.keys.tolist()) == set(range(8))
    # Two fetches of the same misses overlap: the second books after the first admitted them, so
    # it must look again and not index the ids twice.
    more = np.arange(100, 104)
    for _ in range(2):
        cache.record(more)
    _, _, n1 = cache.peek(more)
    _, _, n2 = cache.peek(more)
    cache.record_and_admit(more, more, _rows(more), n1)
    cache.record_and_admit(more, more, _rows(more), n2)
    assert len(cache) == 12 and np.array_equal(cache.keys, np.concatenate([ids, more]))
    hit, rows = cache.lookup(more)
    assert hit.all() and np.array_equal(rows, _rows(more))
    # A push between the peek and the booking: nothing of that fetch enters.
    late = np.arange(200, 203)
    for _ in range(2):
        cache.record(late)
    _, _, noted = cache.peek(late)
    cache.invalidate(np.array([201]))
    cache.record_and_admit(late, late, _rows(late), noted)
    assert not set(late.tolist()) & set(cache.keys.tolist())
