"""The write-ahead log, snapshot generations and recovery on real files, without Ray or gRPC:
a shard's state is rebuilt exactly (rows, Adam state, idempotency keys), also into another shard."""

import asyncio
import os

import numpy as np
import pytest

from engram_mem.errors import CorruptData, InvalidArgument, SequenceTooOld
from engram_mem.storage.recovery import TablePlan, restore_tables, wal_dir
from engram_mem.storage.store import ShardStore
from engram_mem.storage.snapshot import SnapshotWriter, create_empty
from engram_mem.optim import OptimizerSpec
from engram_mem.table import TableSpec
from engram_mem.storage.wal import KIND_PUSH, WriteAheadLog

SPEC = TableSpec("t", rows=6400, dim=8, seed=2, num_slots=64)
ADAM = OptimizerSpec("adam")


def _shard(data, sid, slots, policy="process"):
    create_empty(str(data), sid)
    s = ShardStore(sid)
    placement = np.full(SPEC.n_slots, sid, dtype=np.int32)
    restore_tables(s, str(data), [TablePlan(SPEC, ADAM, "u1", np.asarray(slots), placement)])
    wal = WriteAheadLog(wal_dir(str(data), sid), policy=policy)
    wal.start(s.lsn + 1)
    s.log = wal
    return s, wal


def _snapshot(store, data):
    w = SnapshotWriter(str(data), store.shard_id)
    for name in store.tables:
        owned = store.tables[name].owned_slots().astype(np.int64)
        lsn, parts = store.snapshot_slots(name, owned)
        for slot, p in parts:
            w.put(name, slot, lsn, p)
    store.log.flush()
    return w.publish(store.lsn, {"t": {"uid": "u1"}})


def _pushes(store, rng, n, client="c", seq0=1):
    sent = []
    for k in range(n):
        ids = np.unique(rng.integers(0, SPEC.rows, 300))
        g = rng.standard_normal((ids.size, 8)).astype(np.float32)
        store.push("t", ids, g, lr=0.01, client=client, seq=seq0 + k)
        sent.append((ids, g))
    return sent


def _restore_into(data, sid, source_sid, slots=range(64)):
    s = ShardStore(sid)
    restore_tables(s, str(data), [TablePlan(SPEC, ADAM, "u1", np.asarray(slots),
                                            np.full(SPEC.n_slots, source_sid, dtype=np.int32))])
    return s


def test_snapshot_plus_log_replay_rebuilds_rows_state_and_keys_exactly(tmp_path):
    rng = np.random.default_rng(0)
    a, wal = _shard(tmp_path, 0, range(64))
    _pushes(a, rng, 5)
    _snapshot(a, tmp_path)
    last = _pushes(a, rng, 4, seq0=6)[-1]  # after the snapshot: only in the log
    wal.flush()
    want = a.gather("t", np.arange(SPEC.rows))
    step = a.tables["t"].state["step"].clone()
    wal.close()
    # the same shard restarting, and another shard taking over its slots, get the same bits
    for sid in (0, 3):
        b = _restore_into(tmp_path, sid, source_sid=0)
        assert np.array_equal(b.gather("t", np.arange(SPEC.rows)), want)
        ts = b.tables["t"]
        assert np.array_equal(ts.state["step"].numpy(), step.numpy())
        # the idempotency keys came back: a retry of push 9 changes nothing; 10 applies
        ids, g = last
        assert b.push("t", ids, g, lr=0.01, client="c", seq=9)[0] == ids.size
        assert np.array_equal(b.gather("t", np.arange(SPEC.rows)), want)
        b.push("t", ids, g, lr=0.01, client="c", seq=10)
        assert not np.array_equal(b.gather("t", ids), want[ids])


def test_a_retried_push_applies_once_and_an_ancient_one_is_refused(tmp_path):
    a, wal = _shard(tmp_path, 0, range(64))
    ids = np.array([1, 2, 3])
    g = np.ones((3, 8), np.float32)
    a.push("t", ids, g, lr=0.1, client="x", seq=1)
    once = a.gather("t", ids)
    assert a.push("t", ids, g, lr=0.1, client="x", seq=1)[0] == 3  # answered as applied
    assert np.array_equal(a.gather("t", ids), once)
    for k in range(2, 70):
        a.push("t", ids, g, lr=0.1, client="x", seq=k)
    with pytest.raises(SequenceTooOld):
        a.push("t", ids, g, lr=0.1, client="x", seq=2)
    wal.close()


def test_torn_log_tail_is_cut_and_a_damaged_middle_is_named(tmp_path):
    rng = np.random.default_rng(1)
    a, wal = _shard(tmp_path, 0, range(64))
    _pushes(a, rng, 6)
    wal.flush()
    seg = wal.segments()[-1]
    wal.close()
    size = os.path.getsize(seg)
    with open(seg, "r+b") as f:  # the process died mid-append: half a record at the end
        f.truncate(size - 100)
    b = _restore_into(tmp_path, 0, 0)
    assert b.lsn == 5  # the torn sixth push was never acknowledged; the five before it are there
    with open(seg, "r+b") as f:  # now damage a record in the middle
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CorruptData, match=r"\.wal has a record whose crc32c does not match at offset \d+ \(not a torn end\)"):
        _restore_into(tmp_path, 0, 0)


def test_group_commit_acknowledges_after_the_write(tmp_path):
    wal = WriteAheadLog(str(tmp_path / "wal"), policy="fsync")
    wal.start(1)

    async def many():
        for lsn in range(1, 51):
            wal.append(lsn, KIND_PUSH, {"t": "t"}, [np.arange(lsn, dtype="<i8")])
        await asyncio.gather(*(wal.wait(lsn) for lsn in range(1, 51)))
        return wal.written_lsn

    assert asyncio.run(many()) == 50
    wal.close()
    got = list(WriteAheadLog(str(tmp_path / "wal")).replay())
    assert [r.lsn for r in got] == list(range(1, 51))
    assert np.array_equal(np.frombuffer(got[9].blobs[0], "<i8"), np.arange(10))


def test_older_generations_are_pruned_and_never_read(tmp_path):
    a, wal = _shard(tmp_path, 0, range(64))
    rng = np.random.default_rng(2)
    for _ in range(4):
        _pushes(a, rng, 1, seq0=int(a.lsn) + 1)
        doc = _snapshot(a, tmp_path)
    gens = sorted(d for d in os.listdir(tmp_path / "shard-0000") if d.startswith("gen-"))
    assert gens == [f"gen-{doc['generation'] - 1:08d}", f"gen-{doc['generation']:08d}"]
    wal.close()


def test_a_slot_image_round_trips_through_its_parts_and_refuses_a_wrong_size():
    """SlotImage.parts() is what the log and snapshots store; from_parts gives the same image back."""
    from engram_mem.storage.slot_image import SlotImage

    store = ShardStore(0)
    store.add_table(TableSpec("img", rows=200, dim=4, num_slots=4), range(4), optimizer=OptimizerSpec("adam"), epoch=1)
    store.push("img", np.array([1, 2]), np.ones((2, 4), np.float32), lr=0.1, client="c", seq=1)
    ts = store.tables["img"]
    img = SlotImage.read(ts, 0)
    back = SlotImage.from_parts(ts, 0, {k: (v.tobytes() if hasattr(v, "tobytes") else v) for k, v in img.parts()})
    assert np.array_equal(back.rows, img.rows) and set(back.state) == set(img.state) == set(ts.optimizer.state_names)
    assert all(np.array_equal(back.state[k], img.state[k]) for k in img.state) and back.dedup == img.dedup
    bad = dict(img.parts())
    bad["rows"] = img.rows[:-1].tobytes()
    with pytest.raises(InvalidArgument, match="table 'img' slot 0: the image holds"):
        SlotImage.from_parts(ts, 0, bad)


def test_a_damaged_lmdb_page_is_refused_naming_the_snapshot_file(tmp_path):
    """lmdb's own errors (MDB_CORRUPTED, MDB_PAGE_NOTFOUND, ...) come back as CorruptData that names
    the snapshot file, the table and the slot, not lmdb's words alone."""
    import glob

    from engram_mem.storage.snapshot import SnapshotReader

    store, wal = _shard(tmp_path, 0, range(SPEC.n_slots))
    _pushes(store, np.random.default_rng(0), 5)
    _snapshot(store, tmp_path)
    wal.close()
    path = glob.glob(str(tmp_path / "shard-0000" / "*" / "data.mdb"))[0]
    raw = bytearray(open(path, "rb").read())
    page = 4096
    for at in range(2 * page, len(raw), page):  # every page past the two meta pages: garbage headers
        raw[at:at + 16] = b"\xa5" * 16
    open(path, "wb").write(bytes(raw))
    r = SnapshotReader(str(tmp_path), 0)
    with pytest.raises(CorruptData, match=r"snapshot file .*data\.mdb \(table 't' slot 0\)( is damaged: lmdb says|:)"):
        for slot in range(SPEC.n_slots):
            r.get("t", slot)
