"""Pre-copy migration without Ray: the per-slot lsn of the last change, copies with the lsn of their
cut, the changed-since query, installs that overwrite, and SlotMigration driving real stores
through in-process stand-ins for the shard actors. A push that lands between the pre-copy and the
freeze must reach the new shard with its idempotency key."""

import threading
import time

import numpy as np
import pytest

from engram_mem.shard.actor import ShardActor
from engram_mem.errors import InvalidArgument, NotReady
from engram_mem.control.migration import SlotMigration
from engram_mem.optim import OptimizerSpec
from engram_mem.control.placement import rebalance
from engram_mem.storage.recovery import TablePlan, restore_tables, wal_dir
from engram_mem.storage.store import ShardStore
from engram_mem.storage.snapshot import create_empty
from engram_mem.table import TableSpec
from engram_mem.storage.wal import WriteAheadLog

SPEC = TableSpec("t", rows=6400, dim=8, seed=2, num_slots=64)  # 100 rows a slot
ADAM = OptimizerSpec("adam")
G = np.ones((1, 8), np.float32)


def _store(sid, slots, data_dir=None):
    """A store holding `slots` of SPEC (Adam); with data_dir, restored from and logging to its files."""
    s = ShardStore(sid)
    if data_dir is None:
        s.add_table(SPEC, slots, ADAM, uid="u1")
        return s
    create_empty(str(data_dir), sid)
    restore_tables(s, str(data_dir), [TablePlan(SPEC, ADAM, "u1", np.asarray(list(slots), dtype=np.int64),
                                                np.full(SPEC.n_slots, sid, dtype=np.int32))])
    s.log = WriteAheadLog(wal_dir(str(data_dir), sid), policy="process")
    s.log.start(s.lsn + 1)
    return s


def _rows(store, slot):
    return store.gather("t", np.arange(slot * 100, slot * 100 + 100))


def test_mod_lsn_is_the_lsn_of_each_slots_last_change_and_replay_rebuilds_it(tmp_path):
    a = _store(0, range(32), tmp_path)
    _, w = a.write("t", [5], np.full((1, 8), 2.0, np.float32))                       # slot 0
    _, p = a.push("t", [150, 260], np.ones((2, 8), np.float32), lr=0.1, client="c", seq=1)  # slots 1, 2
    _, p2 = a.push("t", [270], G, lr=0.1)                                           # slot 2 again
    other = _store(1, range(40, 42))
    i = a.add_slots("t", other.copy_slots("t", [40, 41])[1])                        # installed slots
    ts = a.tables["t"]
    assert (w, p, p2, i) == (1, 2, 3, 4)
    assert ts.mod_lsn[[0, 1, 2, 3, 40, 41]].tolist() == [w, p, p2, 0, i, i]
    a.import_rows("t", 300, np.zeros((10, 8), np.float32))                           # slot 3: not logged
    assert ts.mod_lsn[3] > a.lsn  # newer than any cut taken so far
    a.log.flush()
    want = ts.mod_lsn[[0, 1, 2, 40, 41]].copy()
    a.log.close()
    b = ShardStore(0)  # the shard restarting: the log replayed gives every slot the same lsn again
    restore_tables(b, str(tmp_path), [TablePlan(SPEC, ADAM, "u1", np.array(list(range(32)) + [40, 41]),
                                                np.zeros(SPEC.n_slots, dtype=np.int32))])
    assert b.tables["t"].mod_lsn[[0, 1, 2, 40, 41]].tolist() == want.tolist()


def test_a_copy_carries_its_cut_and_changed_since_names_only_slots_changed_after_it():
    a = _store(0, range(32))
    a.push("t", [5], G, lr=0.1)
    lsn, data = a.copy_slots("t", [0, 1, 2])
    assert lsn == a.lsn == 1 and sorted(data) == [0, 1, 2]
    assert np.array_equal(data[0].rows, _rows(a, 0)) and set(data[0].state) == {"step", "exp_avg", "exp_avg_sq"}
    assert a.changed_since("t", [0, 1, 2], [lsn] * 3).tolist() == []
    a.push("t", [150], G, lr=0.1)                                   # slot 1, after the cut
    assert a.changed_since("t", [0, 1, 2], [lsn] * 3).tolist() == [1]
    assert a.changed_since("t", [0, 1], [0, 5]).tolist() == [0]     # each slot against its own cut
    a.import_rows("t", 200, np.zeros((3, 8), np.float32))           # an import counts as a change
    assert a.changed_since("t", [2], [a.lsn]).tolist() == [2]
    with pytest.raises(InvalidArgument, match="does not own slot 40"):
        a.copy_slots("t", [40])


def test_a_slot_pushed_between_precopy_and_freeze_arrives_with_its_update_and_its_key():
    src, dst = _store(0, range(32)), _store(1, range(32, 64))
    ids = np.array([10, 110])                                       # slots 0 and 1
    src.push("t", ids, np.ones((2, 8), np.float32), lr=0.1, client="c", seq=1)
    cut, data = src.copy_slots("t", [0, 1, 2])                      # the pre-copy: writes go on
    dst.add_slots("t", data)
    assert np.array_equal(_rows(dst, 1), _rows(src, 1))
    src.push("t", [120], G, lr=0.1, client="c", seq=2)              # slot 1 changes at the source
    src.freeze_writes(True)
    with pytest.raises(NotReady):
        src.push("t", [130], G, lr=0.1, client="c", seq=3)
    changed = src.changed_since("t", [0, 1, 2], [cut] * 3)
    assert changed.tolist() == [1]
    dst.add_slots("t", src.copy_slots("t", changed)[1])             # the re-copy overwrites the held slot
    for slot in (0, 1, 2):
        assert np.array_equal(_rows(dst, slot), _rows(src, slot))
    lo, hi = 0, 300  # optimizer state moved too (Adam's step counts differ between slots 1 and 2)
    fs, fd = src.tables["t"], dst.tables["t"]
    for k in ("step", "exp_avg", "exp_avg_sq"):
        local_s = fs.frame_of[np.arange(lo, hi) // 100] * 100 + np.arange(lo, hi) % 100
        local_d = fd.frame_of[np.arange(lo, hi) // 100] * 100 + np.arange(lo, hi) % 100
        assert np.array_equal(fs.state[k].numpy()[local_s], fd.state[k].numpy()[local_d]), k
    src.remove_slots("t", [0, 1, 2])
    before = _rows(dst, 1)
    assert dst.push("t", [120], G, lr=0.1, client="c", seq=2)[0] == 1  # the retry is answered as applied...
    assert np.array_equal(_rows(dst, 1), before)                      # ...and not applied twice
    assert dst.push("t", ids, np.ones((2, 8), np.float32), lr=0.1, client="c", seq=1)[0] == 2
    assert np.array_equal(_rows(dst, 1), before)
    dst.push("t", [120], G, lr=0.1, client="c", seq=3)                # a new request applies
    assert not np.array_equal(_rows(dst, 1), before)


def test_a_write_already_waiting_for_the_order_lock_when_the_freeze_begins_is_refused():
    s = _store(0, range(32))
    before = _rows(s, 0)
    out = []

    def push():
        try:
            out.append(s.push("t", [5], G, lr=0.1))
        except NotReady as e:
            out.append(e)

    with s.order:  # a copy holds the lock; the push passes the first check and waits for the lock
        th = threading.Thread(target=push)
        th.start()
        time.sleep(0.3)
        s.freeze_writes(True)
    th.join()
    assert isinstance(out[0], NotReady) and s.lsn == 0
    assert np.array_equal(_rows(s, 0), before)


def test_an_abandoned_precopy_is_not_loaded_after_a_restart_and_a_finished_one_replays_its_last_copy(tmp_path):
    src = _store(0, range(32))
    dst = _store(1, range(32, 64), tmp_path)
    src.push("t", [505], G, lr=0.1)
    dst.add_slots("t", src.copy_slots("t", [5])[1])                 # pre-copy: logged by the destination
    src.push("t", [505], G, lr=0.1)
    dst.add_slots("t", src.copy_slots("t", [5])[1])                 # re-copy: logged again, overwriting
    want = _rows(src, 5)
    dst.log.flush()
    dst.log.close()

    def restart(slots):
        s = ShardStore(1)
        restore_tables(s, str(tmp_path), [TablePlan(SPEC, ADAM, "u1", np.asarray(slots),
                                                    np.full(SPEC.n_slots, 1, dtype=np.int32))])
        return s

    # The move never published: the cluster file still gives slot 5 to shard 0, so shard 1 holds no copy.
    s = restart(list(range(32, 64)))
    assert s.tables["t"].frame_of[5] < 0
    with pytest.raises(InvalidArgument, match="does not own"):
        s.gather("t", [505])
    # The move published: slot 5 comes back from the log as its last copy.
    s = restart([5] + list(range(32, 64)))
    assert np.array_equal(_rows(s, 5), want)


class _Handle:
    """A ShardActor's control methods called in-process, as the controller calls them through Ray."""

    def __init__(self, store, after_install=None):
        self.store, self.wal, self.pid, self.after_install = store, None, 1, after_install

    def __getattr__(self, name):
        if name == "info":
            return _Remote(lambda: {"pid": self.pid})
        fn = getattr(ShardActor, name)

        def call(*a):
            out = fn(self, *a)
            if name == "add_slots" and self.after_install:
                self.after_install(a[1])
            return out
        return _Remote(call)


class _Remote:
    def __init__(self, call):
        self.call = call

    def remote(self, *a):
        return self.call(*a)

    def options(self, **_):
        return self


@pytest.fixture
def no_ray(monkeypatch):
    """Results of the stand-ins are values already: ray.get hands them back."""
    import ray

    monkeypatch.setattr(ray, "get", lambda refs, timeout=None: refs)


class _Table:
    spec = SPEC


def _scale_1_to_2(after_install=None, batch_slots=8):
    src, dst = _store(0, range(64)), _store(1, [])
    handles = {0: _Handle(src), 1: _Handle(dst, after_install)}
    plans = {"t": rebalance(np.zeros(SPEC.n_slots, np.int32), 2)}
    mig = SlotMigration(handles, {"t": _Table()}, plans, batch_bytes=batch_slots * 100 * SPEC.row_bytes)
    return src, dst, handles, mig, plans["t"][1][(0, 1)]


def test_migration_copies_again_under_the_freeze_only_what_changed_since(no_ray):
    src, dst, _, mig, moved = _scale_1_to_2()
    assert moved.tolist() == list(range(32, 64))
    mig.precopy()
    assert mig.rounds == 1 and mig.precopied_bytes == mig.moved_bytes == 32 * 100 * SPEC.row_bytes
    src.push("t", [3350, 3460, 150], np.ones((3, 8), np.float32), lr=0.1, client="c", seq=7)  # slots 33, 34, 1
    src.freeze_writes(True)
    mig.finish()
    assert mig.recopied_bytes == 2 * 100 * SPEC.row_bytes
    for slot in moved.tolist():
        assert np.array_equal(_rows(dst, slot), _rows(src, slot)), slot
    before = _rows(dst, 33)
    assert dst.push("t", [3350], G, lr=0.1, client="c", seq=7)[0] == 1  # the key came along
    assert np.array_equal(_rows(dst, 33), before)


@pytest.mark.parametrize("pushing", ["fewer each round", "always"])
def test_migration_copies_again_before_the_freeze_while_the_changed_set_shrinks(no_ray, pushing):
    box = {}
    # during round 1, 12 of the 32 moved slots change; during round 2, 5; then none
    changes = {0: range(32, 44), 1: range(32, 37), 2: range(0)}

    def writer(data):  # a client pushing to slots just copied (never under the freeze)
        mig, src = box["mig"], box["src"]
        if src.writes_frozen:
            return
        for slot in data:
            if pushing == "always" or slot in changes[mig.rounds]:
                src.push("t", [slot * 100], G, lr=0.1)

    src, dst, _, mig, moved = _scale_1_to_2(after_install=writer, batch_slots=4)
    box.update(mig=mig, src=src)
    mig.precopy()
    slot_bytes = 100 * SPEC.row_bytes
    if pushing == "fewer each round":  # 12 > 32/8 and <= 32/2: again; 5 > 4 and <= 12/2: again; then the cap
        assert mig.rounds == 3 and mig.precopied_bytes == (32 + 12 + 5) * slot_bytes
    else:  # every slot changed again: more rounds would not converge, so the freeze comes at once
        assert mig.rounds == 1 and mig.precopied_bytes == mig.moved_bytes
    src.freeze_writes(True)
    mig.finish()
    assert mig.recopied_bytes == (0 if pushing == "fewer each round" else mig.moved_bytes)
    for slot in moved.tolist():
        assert np.array_equal(_rows(dst, slot), _rows(src, slot)), slot


def test_a_shard_restarted_during_the_precopy_has_its_moves_copied_again_whole(no_ray):
    src, dst, handles, mig, moved = _scale_1_to_2()
    mig.precopy()
    handles[1].pid = 2  # the destination's process changed: its copies may be gone
    src.freeze_writes(True)
    mig.finish()
    assert mig.recopied_bytes == mig.moved_bytes


def test_an_abandoned_migration_drops_its_copies_from_the_destination(no_ray):
    _, dst, _, mig, moved = _scale_1_to_2()
    mig.precopy()
    assert (dst.tables["t"].frame_of[moved] >= 0).all()
    mig.abandon()
    assert (dst.tables["t"].frame_of[moved] < 0).all()
