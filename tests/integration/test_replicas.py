"""Replicas (replication.py): each shard's members on different Ray nodes (127.0.0.2 and 127.0.0.3),
real processes killed with kill -9, counted with the known-effect workload of test_durability
(SGD, lr 1, gradient -1: each acknowledged push adds exactly 1.0 to each of its rows).
"""

import os
import signal
import threading
import time

import numpy as np
import pytest

import engram_mem
from engram_mem.errors import InvalidArgument

ROWS, DIM = 4096, 8
SPREAD = np.arange(0, ROWS, 64)  # every slot range: each push reaches every shard


def _rows_at(mem, address, table, ids):
    """The rows one member (primary or replica) serves, read from it alone (over gRPC)."""
    t = mem.view.table(table)
    out = np.empty((ids.size, t.spec.storage_dim), dtype=t.spec.storage_dtype)
    mem._chans.submit(mem._gather_from({"address": address}, mem.view.epoch, table, ids, out, 0, None)).result(30)
    return out


def _wait_replicas_equal(mem, table, ids, timeout=60.0):
    """Every replica serves exactly its primary's rows (after the lag drains); returns the rows."""
    deadline = time.time() + timeout
    while True:
        view = mem.refresh(check_shards=True)
        try:
            same = True
            for rank in range(len(view.shard_ids)):
                members = view.members(rank)
                t = view.table(table)
                mine = ids[t.placement[ids // t.spec.slot_rows] == rank]
                want = _rows_at(mem, members[0]["address"], table, mine)
                for m in members[1:]:
                    same &= m.get("ready", False) and np.array_equal(_rows_at(mem, m["address"], table, mine), want)
            if same:
                return mem.gather(table, ids)
        except Exception:  # noqa: BLE001 - a member still restarting or copying
            if time.time() > deadline:
                raise
        if time.time() > deadline:
            raise AssertionError("replicas did not converge to their primaries")
        time.sleep(0.3)


def _pusher(mem, n, acked, errors, pause=0.005):
    g = -np.ones((SPREAD.size, DIM), np.float32)
    for _ in range(n):
        try:
            mem.push("r", SPREAD, g, lr=1.0)
            acked.append(1)
        except Exception as e:  # noqa: BLE001 - counted; the test fails on any
            errors.append(repr(e))
        time.sleep(pause)


def _reader(mem, stop, latencies, errors):
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            mem.gather("r", SPREAD)
            latencies.append(time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))


def _member_pid(view, rank, member):
    return view.members(rank)[member]["pid"]


@pytest.fixture(scope="module")
def replicated(two_nodes, tmp_path_factory):
    data = tmp_path_factory.mktemp("replicated")
    with engram_mem.connect(shards=2, name="rep", replicas=2, cpus_per_shard=0.5, data_dir=str(data),
                            snapshot_interval_s=2.0) as mem:
        mem.create_table("r", rows=ROWS, dim=DIM, optimizer={"name": "sgd"}, init_std=0.0)
        yield mem


def test_members_on_different_nodes_and_replicas_follow_in_order(replicated):
    mem = replicated
    view = mem.refresh(check_shards=True)
    for rank in range(len(view.shard_ids)):
        members = view.members(rank)
        assert len(members) == 2 and members[1]["member"] == 1
        assert len({m["node_ip"] for m in members}) == 2, "a shard's members share a node"
    total = mem.gather("r", SPREAD)[0, 0]
    acked, errors = [], []
    _pusher(mem, 40, acked, errors, pause=0.0)
    mem.push("r", SPREAD[:5], np.full((5, DIM), -2.0, np.float32), lr=1.0)  # an order-sensitive tail
    assert errors == []
    rows = _wait_replicas_equal(mem, "r", SPREAD)
    want = np.full((SPREAD.size, DIM), total + 40, np.float32)
    want[:5] += 2
    assert np.array_equal(rows, want)
    reader = engram_mem.connect(name="rep", read_only=True)
    try:  # a read-only client spreads its gathers over both members of each shard, same rows
        for _ in range(6):
            assert np.array_equal(reader.gather("r", SPREAD), want)
        assert reader.read_replicas
        stats = {s["address"]: s["requests"] for s in reader.stats()}
        assert len(stats) == 2
    finally:
        reader.close()
    lag = [i["replication"] for i in mem.describe()["shards"].values()]
    assert all(f and all(v["records"] > 0 for v in f.values()) for f in lag)


def _rows_gathered(mem) -> dict[str, int]:
    """Rows each member (primaries and replicas) has gathered so far, from its own Stats."""
    from engram_mem.pb.v1 import memory_pb2 as pb

    view = mem.refresh(check_shards=True)
    addresses = [m["address"] for rank in range(len(view.shard_ids)) for m in view.members(rank)]

    async def one(address):
        return (await mem._chans.stubs(address).stats(pb.StatsRequest())).rows_gathered

    return {a: mem._chans.submit(one(a)).result(30) for a in addresses}


def test_through_the_agent_a_read_only_worker_spreads_its_reads_and_a_writer_reads_primaries(replicated):
    """A read-only worker's fetches through the node's agent reach every member of each shard, as
    its own client's gathers do (the replicas are its read capacity); a worker with the full
    credential reads primaries only (its own writes); a read-only worker that reads a table
    through the node's cache reads primaries too (what enters the shared cache must be as fresh
    as a primary). The rows are the primaries' rows every time."""
    from engram_mem.agent.reader import AgentReader

    mem = replicated
    want = _wait_replicas_equal(mem, "r", SPREAD)
    view = mem.refresh(check_shards=True)
    replicas = {m["address"] for rank in range(len(view.shard_ids)) for m in view.members(rank)[1:]}
    reader = engram_mem.connect(name="rep", read_only=True)
    try:
        for client, cache, spreads in ((mem, None, False), (reader, None, True), (reader, {"r": 1 << 20}, False)):
            w = AgentReader(client, node_local=False, cache_bytes=cache)
            try:
                before = _rows_gathered(mem)
                for _ in range(4):
                    uniq, rows, inverse = w.fetch("r", SPREAD)
                    assert np.array_equal(rows[inverse], want)
                    if cache:
                        w.clear_caches()  # every fetch a miss: it goes to the shards
                after = _rows_gathered(mem)
            finally:
                w.close()
            served = {a for a in after if after[a] > before.get(a, 0)}
            if spreads:
                assert served == set(after), f"members that served none of the read-only worker's rows: " \
                                             f"{set(after) - served}"
            else:
                assert not served & replicas, f"replicas served a worker that reads primaries: {served & replicas}"
    finally:
        reader.close()


@pytest.mark.slow
@pytest.mark.parametrize("member", [1, 0], ids=["replica", "primary"])
def test_kill9_member_reads_fail_over_and_it_is_rebuilt(replicated, member):
    """kill -9 one member of shard 1 while a read-only client gathers and a writer pushes: no gather
    and no push fails, every acknowledged push is there once, and the killed member comes back
    (a new process) holding exactly its primary's rows."""
    mem = replicated
    view = mem.refresh(check_shards=True)
    before = mem.gather("r", SPREAD)
    reader = engram_mem.connect(name="rep", read_only=True)
    acked, errors, latencies = [], [], []
    stop = threading.Event()
    t_push = threading.Thread(target=_pusher, args=(mem, 150, acked, errors))
    t_read = threading.Thread(target=_reader, args=(reader, stop, latencies, errors))
    t_push.start()
    t_read.start()
    try:
        while len(acked) < 40:
            time.sleep(0.01)
        n_before_kill = len(latencies)
        pid = _member_pid(view, 1, member)
        os.kill(pid, signal.SIGKILL)
        t_push.join()
        time.sleep(0.5)
        stop.set()
        t_read.join()
    finally:
        stop.set()
        reader.close()
    assert errors == []
    assert len(latencies) > n_before_kill, "no gather completed after the kill"
    print(f"kill -9 {'primary' if member == 0 else 'replica'}: {len(latencies)} gathers, slowest "
          f"{max(latencies[n_before_kill:]) * 1e3:.0f} ms after the kill")
    rows = _wait_replicas_equal(mem, "r", SPREAD, timeout=120)
    assert np.array_equal(rows, before + len(acked)), (
        f"lost {int((before + len(acked) - rows).max())}, applied twice {int((rows - before - len(acked)).max())}")
    assert len(acked) == 150
    assert _member_pid(mem.view, 1, member) != pid


@pytest.mark.slow
def test_scale_moves_replicas_with_their_shards(replicated):
    mem = replicated
    before = mem.gather("r", SPREAD)
    mem.scale(3)
    try:
        view = mem.refresh(check_shards=True)
        assert len(view.shard_ids) == 3
        for rank in range(3):
            assert len({m["node_ip"] for m in view.members(rank)}) == 2
        g = -np.ones((SPREAD.size, DIM), np.float32)
        mem.push("r", SPREAD, g, lr=1.0)
        assert np.array_equal(_wait_replicas_equal(mem, "r", SPREAD, timeout=120), before + 1)
    finally:
        mem.scale(2)
    assert np.array_equal(_wait_replicas_equal(mem, "r", SPREAD, timeout=120), before + 1)


@pytest.mark.slow
@pytest.mark.parametrize("durability", ["process"])
def test_kill9_primary_three_times_with_replicas_every_push_ends_acked_once_or_typed(two_nodes, tmp_path,
                                                                                     durability):
    """The counted workload of test_exactly_once.py with 2 members per shard; the third kill takes
    the primary while its replica rebuilds. Under the default durability only (30 s a run): the log's
    fsync mode is killed three times by test_exactly_once.py, which runs both modes."""
    from tests.kill_workload import three_kills

    with engram_mem.connect(shards=2, name=f"rep-once-{durability}", replicas=2, cpus_per_shard=0.5,
                            data_dir=str(tmp_path), durability=durability, snapshot_interval_s=1.0) as mem:
        three_kills(mem, replicas=2)


def test_more_replicas_than_nodes_is_refused_up_front(two_nodes):
    with pytest.raises(InvalidArgument, match="replicas=3.*2 node"):
        engram_mem.connect(shards=1, name="rep-3", replicas=3, cpus_per_shard=0.5)


@pytest.mark.slow
def test_primary_without_data_dir_restores_from_its_replica(two_nodes):
    """No data directory: a killed primary comes back with its replica's rows, not initial values."""
    with engram_mem.connect(shards=1, name="rep-mem", replicas=2, cpus_per_shard=0.5) as mem:
        mem.create_table("r", rows=ROWS, dim=DIM, optimizer={"name": "sgd"}, init_std=0.0)
        acked, errors = [], []
        _pusher(mem, 25, acked, errors, pause=0.0)
        assert errors == []
        _wait_replicas_equal(mem, "r", SPREAD)  # shipped: the replica has all 25
        pid = _member_pid(mem.refresh(check_shards=True), 0, 0)
        os.kill(pid, signal.SIGKILL)
        mem.push("r", SPREAD, -np.ones((SPREAD.size, DIM), np.float32), lr=1.0)  # waits for the new primary
        rows = _wait_replicas_equal(mem, "r", SPREAD, timeout=120)
        assert np.array_equal(rows, np.full_like(rows, 26.0))
        info = mem.view.shards[mem.view.shard_ids[0]]
        assert info["pid"] != pid and info["restore"].get("source") == "replica 1"


# ---- replica_ack=all: acknowledged means applied on every in-sync replica ---------------------------

def _primary_replication(name):
    """The primary's own view of its followers (describe() is the controller's, refreshed each second)."""
    import ray

    from engram_mem.config import member_name
    from engram_mem.config import NAMESPACE

    return ray.get(ray.get_actor(member_name(name, 0, 0), namespace=NAMESPACE).info.remote(), timeout=60)["replication"]


@pytest.fixture(scope="module")
def acked_all(two_nodes, tmp_path_factory):
    data = tmp_path_factory.mktemp("acked-all")
    # No snapshots by time: a snapshot taken after the directory is deleted would recreate it.
    with engram_mem.connect(shards=1, name="rep-ack", replicas=2, cpus_per_shard=0.5, data_dir=str(data),
                            replica_ack="all", replica_ack_timeout_s=5.0, snapshot_interval_s=0) as mem:
        mem.create_table("r", rows=ROWS, dim=DIM, optimizer={"name": "sgd"}, init_std=0.0)
        _wait_replicas_equal(mem, "r", SPREAD)   # the replica has copied: it is in the in-sync set
        yield mem, str(data)


def test_replica_ack_all_acknowledged_push_is_already_on_the_replica(acked_all):
    mem, _ = acked_all
    view = mem.refresh(check_shards=True)
    replica = view.members(0)[1]["address"]
    base = _rows_at(mem, replica, "r", SPREAD)
    g = -np.ones((SPREAD.size, DIM), np.float32)
    for i in range(1, 31):
        mem.push("r", SPREAD, g, lr=1.0)
        assert np.array_equal(_rows_at(mem, replica, "r", SPREAD), base + i), f"push {i} acknowledged before the replica had it"
    assert [f["in_sync"] for f in _primary_replication("rep-ack").values()] == [True]


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["deleted", "corrupt"])
def test_lost_shard_directory_restores_from_the_replica_losing_nothing(acked_all, damage):
    """The primary's disk is lost (its shard directory deleted, or its manifest overwritten) and the
    primary is killed -9 mid-pushes: it comes back from its in-sync replica with every acknowledged
    push exactly once, makes the copy its own directory again, and a later kill restores from that."""
    import shutil

    from engram_mem.storage.snapshot import shard_dir

    mem, data = acked_all
    _wait_replicas_equal(mem, "r", SPREAD)
    before = mem.gather("r", SPREAD)
    acked, errors = [], []
    t_push = threading.Thread(target=_pusher, args=(mem, 120, acked, errors))
    t_push.start()
    while len(acked) < 40 and t_push.is_alive():
        time.sleep(0.01)
    pid = _member_pid(mem.refresh(check_shards=True), 0, 0)
    d = shard_dir(data, 0)
    if damage == "deleted":
        shutil.rmtree(d)
    else:
        with open(os.path.join(d, "MANIFEST.json"), "wb") as f:
            f.write(b"\x00garbage")
    os.kill(pid, signal.SIGKILL)
    t_push.join()
    assert errors == [] and len(acked) == 120
    rows = _wait_replicas_equal(mem, "r", SPREAD, timeout=120)
    assert np.array_equal(rows, before + len(acked)), (
        f"lost {int((before + len(acked) - rows).max())}, applied twice {int((rows - before - len(acked)).max())}")
    info = mem.view.shards[mem.view.shard_ids[0]]
    assert info["pid"] != pid and info["restore"]["source"] == "replica 1", info["restore"]
    assert ("moved_aside" in info["restore"]) == (damage == "corrupt")
    assert os.path.exists(os.path.join(d, "MANIFEST.json"))
    # the copy is the primary's own again: a plain kill -9 now restores from its directory and log
    mem.push("r", SPREAD, -np.ones((SPREAD.size, DIM), np.float32), lr=1.0)
    os.kill(info["pid"], signal.SIGKILL)
    mem.push("r", SPREAD, -np.ones((SPREAD.size, DIM), np.float32), lr=1.0)   # waits for the restart
    rows = _wait_replicas_equal(mem, "r", SPREAD, timeout=120)
    assert np.array_equal(rows, before + len(acked) + 2)
    assert mem.view.shards[mem.view.shard_ids[0]]["restore"].get("source") != "replica 1"


@pytest.mark.slow
def test_a_hung_replica_is_dropped_from_the_in_sync_set_and_rebuilds(acked_all):
    """SIGSTOP the replica: pushes are acknowledged after replica_ack_timeout_s (5 s) without it;
    once it runs again it rebuilds and holds exactly its primary's rows."""
    mem, _ = acked_all
    _wait_replicas_equal(mem, "r", SPREAD, timeout=120)
    before = mem.gather("r", SPREAD)
    view = mem.refresh(check_shards=True)
    pid = _member_pid(view, 0, 1)
    g = -np.ones((SPREAD.size, DIM), np.float32)
    os.kill(pid, signal.SIGSTOP)
    try:
        for _ in range(5):
            mem.push("r", SPREAD, g, lr=1.0)
        follower = _primary_replication("rep-ack")
        assert not any(f["in_sync"] for f in follower.values()), follower
    finally:
        os.kill(pid, signal.SIGCONT)
    rows = _wait_replicas_equal(mem, "r", SPREAD, timeout=120)
    assert np.array_equal(rows, before + 5)
    assert _member_pid(mem.refresh(check_shards=True), 0, 1) == pid   # the same process, rebuilt
