"""The memory cluster on a real local Ray cluster, through the Python client over real gRPC."""

import threading

import numpy as np
import pytest

import engram_mem
from engram_mem.errors import (InvalidArgument, NonFiniteGradient, RowOutOfRange, TableExists, UnknownTable)
from engram_mem.table import TableSpec


@pytest.fixture(scope="module")
def mem(ray_local):
    with engram_mem.connect(shards=1, name="test-cluster") as client:
        yield client


def _owned_rows(mem):
    """Which shard rank holds each slot, read back from the shards themselves (Describe)."""
    out = {}
    for rank, sid in enumerate(mem.view.shard_ids):
        d = mem.describe_shard(mem.view.address(rank))  # the shard's own Describe RPC, with the credential
        for t in d.tables:
            out.setdefault(t.name, {})[rank] = np.frombuffer(t.owned_slots, "<i4")
    return out


def test_gather_equals_direct_reads_across_shard_counts_and_shapes(mem):
    spec = mem.create_table("g", rows=20_000, dim=24, seed=4, num_slots=256)
    half = mem.create_table("g16", rows=3_000, dim=8, dtype="bfloat16", seed=1)
    rng = np.random.default_rng(0)
    written = {int(i): rng.standard_normal(24).astype(np.float32) for i in rng.integers(0, 20_000, 50)}
    mem.write("g", list(written), np.stack(list(written.values())))

    def direct(ids):
        want = spec.init_rows(ids.reshape(-1))
        for j, i in enumerate(ids.reshape(-1)):
            if int(i) in written:
                want[j] = written[int(i)]
        return want.reshape(ids.shape + (24,))

    shapes = [(), (1,), (7,), (3, 5), (2, 3, 4), (0,), (2, 0, 3)]
    for shards in (1, 2, 3, 4):
        if len(mem.view.shard_ids) != shards:
            mem.scale(shards)
        assert len(mem.view.shard_ids) == shards
        owned = _owned_rows(mem)["g"]
        placement = mem.view.tables["g"].placement
        for rank in range(shards):
            assert np.array_equal(owned[rank], np.nonzero(placement == rank)[0])
        for shape in shapes:
            ids = rng.integers(0, spec.rows, shape)
            got = mem.gather("g", ids)
            assert got.shape == ids.shape + (24,) and got.dtype == np.float32
            assert np.array_equal(got, direct(ids)), (shards, shape)
        ids = np.array(list(written)[:5] + list(written)[:5])
        assert np.array_equal(mem.gather("g", ids), direct(ids))
        hid = rng.integers(0, half.rows, (4, 9))
        assert np.array_equal(mem.gather("g16", hid), half.init_rows(hid.reshape(-1)).reshape(4, 9, 8))
        t = mem.gather("g16", hid, as_torch=True)
        assert str(t.dtype) == "torch.bfloat16" and tuple(t.shape) == (4, 9, 8)
    mem.scale(2)


def test_duplicate_ids_and_empty_batch(mem):
    spec = mem.create_table("dup", rows=1000, dim=4, seed=2)
    ids = np.array([[5, 5, 5], [999, 5, 0]])
    assert np.array_equal(mem.gather("dup", ids), spec.init_rows(ids.reshape(-1)).reshape(2, 3, 4))
    assert mem.gather("dup", np.zeros(0, np.int64)).shape == (0, 4)
    assert mem.push("dup", np.zeros(0, np.int64), np.zeros((0, 4), np.float32)) == 0


def test_push_then_gather_sums_duplicates_and_applies_the_table_optimizer(mem):
    spec = mem.create_table("p", rows=5000, dim=8, seed=3, optimizer={"name": "sgd", "lr": 0.1})
    before = mem.gather("p", [10, 20, 4999])
    assert mem.push("p", [10, 20, 10, 4999], np.ones((4, 8), np.float32)) == 3
    after = mem.gather("p", [10, 20, 4999])
    assert np.allclose(before - after, np.array([[0.2], [0.1], [0.1]]) * np.ones(8), atol=1e-6)
    mem.push("p", [20], np.ones((1, 8), np.float32), lr=1.0)  # a push's own lr wins
    assert np.allclose(after[1] - mem.gather("p", [20])[0], 1.0, atol=1e-6)
    mem.set_optimizer("p", {"name": "adam"})
    mem.push("p", [30], np.full((1, 8), 5.0, np.float32), lr=0.01)
    assert np.allclose(spec.init_rows([30])[0] - mem.gather("p", [30])[0], 0.01, atol=1e-5)  # Adam's first step is lr


def test_write_then_gather_imports_rows(mem):
    mem.create_table("w", rows=300, dim=16, dtype="float16")
    rows = np.random.default_rng(1).standard_normal((300, 16)).astype(np.float32)
    assert mem.write("w", np.arange(300), rows) == 300
    assert np.allclose(mem.gather("w", np.arange(300)).astype(np.float32), rows, atol=1e-2)
    rows16 = rows[:2].astype(np.float16)
    mem.write("w", [7, 7], rows16)  # last write of a duplicate id wins
    assert np.array_equal(mem.gather("w", [7])[0], rows16[1])


def test_gather_async_overlaps_with_the_caller(mem):
    spec = mem.create_table("a", rows=100_000, dim=64, seed=8)
    ids = np.random.default_rng(3).integers(0, spec.rows, (8, 512))
    futs = [mem.gather_async("a", ids[i]) for i in range(8)]
    busy = sum(i * i for i in range(10_000))  # the caller keeps computing meanwhile
    for i, f in enumerate(futs):
        assert np.array_equal(f.result(timeout=60), spec.init_rows(ids[i]))
    assert busy > 0


def test_concurrent_clients_see_every_push(mem, ray_local):
    mem.create_table("c", rows=10_000, dim=4, optimizer={"name": "sgd", "lr": 1.0})
    base = mem.gather("c", np.arange(10_000))
    errors = []

    def worker(k):
        try:
            with engram_mem.connect(name="test-cluster") as client:
                for step in range(5):
                    ids = np.arange(k * 100, k * 100 + 100)
                    client.push("c", np.concatenate([ids, [9_999]]), np.ones((101, 4), np.float32))
                    got = client.gather("c", ids)  # read-your-writes within a client
                    assert np.allclose(base[ids] - got, step + 1, atol=1e-5)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    final = mem.gather("c", np.arange(10_000))
    assert np.allclose(base[:400] - final[:400], 5.0, atol=1e-5)
    assert np.allclose(base[9_999] - final[9_999], 20.0, atol=1e-4)  # every worker's pushes landed
    assert np.array_equal(final[400:9_999], base[400:9_999])


def test_bad_input_raises_typed_errors_and_the_cluster_keeps_serving(mem):
    spec = mem.create_table("e", rows=100, dim=4)
    before = mem.gather("e", np.arange(100))
    with pytest.raises(UnknownTable, match="'missing'"):
        mem.gather("missing", [1])
    with pytest.raises(RowOutOfRange, match="row id 100"):
        mem.gather("e", [1, 100])
    with pytest.raises(RowOutOfRange, match="row id -3"):
        mem.push("e", [-3], np.ones((1, 4), np.float32))
    with pytest.raises(InvalidArgument, match="integers"):
        mem.gather("e", np.array([1.5]))
    with pytest.raises(InvalidArgument, match=r"shape \(2, 3\)"):
        mem.push("e", [1, 2], np.ones((2, 3), np.float32))
    with pytest.raises(InvalidArgument, match="dtype int32"):
        mem.write("e", [1], np.ones((1, 4), np.int32))
    with pytest.raises(NonFiniteGradient, match="nothing from this push was applied"):
        mem.push("e", [1, 99], np.array([[1, 1, 1, 1], [0, 0, np.inf, 0]], np.float32))
    with pytest.raises(TableExists):
        mem.create_table("e", rows=100, dim=4, seed=5)
    assert np.array_equal(mem.gather("e", np.arange(100)), before)
    assert all(h["status"] == "SERVING" for h in mem.health())


def test_stale_placement_is_refreshed_after_another_client_scales(mem):
    spec = mem.create_table("s", rows=50_000, dim=8, seed=6)
    with engram_mem.connect(name="test-cluster") as other:
        old_epoch = other.view.epoch
        ids = np.random.default_rng(4).integers(0, spec.rows, 2000)
        mem.scale(3)
        assert other.view.epoch == old_epoch  # still routing by the old placement
        assert np.array_equal(other.gather("s", ids), spec.init_rows(ids))
        assert other.view.epoch > old_epoch
        other.push("s", ids[:10], np.zeros((10, 8), np.float32))
    mem.scale(2)


def test_status_rows_and_stats(mem):
    stats = mem.stats()
    assert len(stats) == len(mem.view.shard_ids)
    assert all(s["table_bytes"] > 0 and s["rss_bytes"] > 0 for s in stats)
    assert sum(s["requests"].get("Gather", 0) for s in stats) > 0


def test_a_client_attached_before_a_table_is_created_finds_it(mem):
    with engram_mem.connect(name="test-cluster") as early:  # e.g. a worker that attached before rank 0 made it
        spec = mem.create_table("late", rows=100, dim=4, optimizer={"name": "sgd", "lr": 1.0})
        early.push("late", [7], -np.ones((1, 4), np.float32))
        assert np.allclose(early.gather("late", [7])[0], spec.init_rows([7])[0] + 1.0)
