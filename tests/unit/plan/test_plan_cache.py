"""Cache size for a hit rate from the id distribution, checked against exact sums and simulations:
an exact LRU (OrderedDict) and the project's own RowCache (TinyLFU admission) fed Zipf ids.

    pytest tests/unit/plan/test_plan_cache.py -q
"""

from collections import OrderedDict

import numpy as np
import pytest

from engram_mem.worker.cache import RowCache
from engram_mem.plan.planner import Hardware, plan
from engram_mem.plan.presets import DEVICE_PRESETS, MODEL_PRESETS
from engram_mem.plan.hotspots import hot_shares
from engram_mem.plan.tiers import TIER_PRESETS, PlanInputError
from engram_mem.plan.workload import TraceDistribution, Workload, Zipf


def exact_p(n, s):
    p = np.arange(1, n + 1, dtype=np.float64) ** -s
    return p / p.sum()


@pytest.mark.parametrize("n,s", [(200_000, 0.8), (200_000, 1.0), (300_000, 1.2)])
def test_binned_zipf_matches_exact_sums(n, s):
    z, p = Zipf(n, s), exact_p(n, s)
    for c in (100, 5_000, 60_000):
        assert z.hit_rate(c) == pytest.approx(p[:c].sum(), abs=2e-3)
    for draws in (64, 4096):
        assert z.distinct(draws) == pytest.approx(-np.expm1(draws * np.log1p(-p)).sum(), rel=1e-3)
    c = z.rows_for_hit_rate(0.5)
    assert p[: int(c)].sum() >= 0.5 - 2e-3 and p[: max(int(c) - 1 - int(c) // 100, 0)].sum() < 0.5 + 2e-3


def lru_hit_rate(ids, capacity, warm):
    cache, hits = OrderedDict(), 0
    for i, x in enumerate(ids):
        if x in cache:
            cache.move_to_end(x)
            hits += i >= warm
        else:
            cache[x] = True
            if len(cache) > capacity:
                cache.popitem(last=False)
    return hits / (len(ids) - warm)


def zipf_ids(n, s, size, seed=0):
    rng = np.random.default_rng(seed)
    ranks = rng.choice(n, size=size, p=exact_p(n, s))
    return rng.permutation(n)[ranks]          # hot rows at random ids, as hashing places them


@pytest.mark.parametrize("s", [0.9, 1.1])
def test_che_approximation_matches_an_exact_lru(s):
    n, cap = 50_000, 2_000
    ids = zipf_ids(n, s, 200_000)
    measured = lru_hit_rate(ids.tolist(), cap, warm=50_000)
    assert Zipf(n, s).hit_rate(cap, "lru") == pytest.approx(measured, abs=0.015)
    assert Zipf(n, s).hit_rate(cap, "lfu") > measured      # the static top-C cache is the upper bound


def test_rowcache_tinylfu_lands_between_lru_and_the_ideal_lfu():
    n, s, cap, batch = 50_000, 1.0, 2_000, 1_000
    ids = zipf_ids(n, s, 300_000, seed=1)
    dim = 4
    cache = RowCache(cap * (dim * 4 + 68), dim, np.float32)
    assert cache.capacity == cap
    hits = looked = 0
    for b in range(0, ids.size, batch):
        uniq = np.unique(ids[b:b + batch])
        cache.record(uniq)
        hit, _ = cache.lookup(uniq)
        miss = uniq[~hit]
        cache.admit(miss, np.zeros((miss.size, dim), np.float32))
        if b >= 100_000:
            hits, looked = hits + hit.sum(), looked + uniq.size
    measured = hits / looked                                  # per distinct row of a batch, as the fetcher counts
    z = Zipf(n, s)
    # The planner's per-distinct-row prediction for an LFU-like cache of `cap` rows:
    predicted = 1 - z.distinct_missing(batch, cap, "lfu") / z.distinct(batch)
    lru = 1 - z.distinct_missing(batch, cap, "lru") / z.distinct(batch)
    assert lru - 0.03 <= measured <= predicted + 0.03, (lru, measured, predicted)
    assert measured == pytest.approx(predicted, abs=0.08)


def test_trace_distribution_from_recorded_counts():
    ids = zipf_ids(20_000, 1.0, 100_000, seed=2)
    _, counts = np.unique(ids, return_counts=True)
    tr = TraceDistribution(counts=counts, lookups_per_call=1000, distinct_per_call=500, table_rows=20_000)
    assert tr.fit_zipf() == pytest.approx(1.0, abs=0.15)
    top = np.sort(counts)[::-1]
    assert tr.hit_rate(1000) == pytest.approx(top[:1000].sum() / top.sum())
    assert tr.hit_rate(tr.rows_for_hit_rate(0.6)) >= 0.6
    with pytest.raises(PlanInputError, match="no ids"):
        TraceDistribution(counts=np.zeros(0), lookups_per_call=0, distinct_per_call=0, table_rows=1)


def test_plan_reports_cache_size_for_the_target_and_hot_shards_shrink_with_replicas_and_cache():
    m = MODEL_PRESETS["v4.1-flash"]
    hw = Hardware(device=DEVICE_PRESETS["h800"], rows_tier=TIER_PRESETS["rdma-400g"], cache_tier=TIER_PRESETS["hbm"])
    p = plan(m, Workload(mode="decode", batch=64, seq_len=1, context=2048, target_hit_rate=0.6), hw)
    per_head = p["cache"]["rows_for_target"]["lfu"] / m.rows_per_token
    assert Zipf(m.table_rows // m.rows_per_token, 1.0).hit_rate(per_head) == pytest.approx(0.6, abs=1e-3)
    assert p["cache"]["rows_for_target"]["lru"] > p["cache"]["rows_for_target"]["lfu"]
    wl = Workload(mode="prefill", batch=8, seq_len=1024, zipf_s=1.2)
    one = hot_shares(m, wl, shards=512, nodes=64)["max_shard_share"]
    four = hot_shares(m, wl.replace(replicas=4), shards=512, nodes=64)["max_shard_share"]
    cached = hot_shares(m, wl.replace(cache_rows=262_144), shards=512, nodes=64)["max_shard_share"]
    assert one > 1 / 512 and four < one and cached < one
