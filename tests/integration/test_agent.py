"""The per-node fetch agent (engram_mem/agent/) on a real local Ray cluster: same rows as the
in-process path, one cache for the node, exactly-once pushes across kill -9 of the agent and of
a worker sharing it, and a defined refusal for any bytes on its socket.

Known-effect workload where counted: SGD, lr 1, gradient -1 on a table that starts at 0, so
each row ends at the number of times its push was applied.
"""

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import engram_mem
from engram_mem.agent import AgentReader
from engram_mem.agent import protocol as P
from engram_mem.errors import MaybeApplied, RowOutOfRange, Unavailable, UnknownTable
from engram_mem.worker.fetcher import RowFetcher

ROWS, DIM = 1 << 16, 8


@pytest.fixture(scope="module")
def mem(ray_local):
    with engram_mem.connect(shards=2, name="agent-test") as mem:
        mem.create_table("a", rows=ROWS, dim=DIM, seed=4)
        mem.create_table("bf", rows=ROWS, dim=DIM, dtype="bfloat16", seed=5)
        yield mem


@pytest.fixture
def counted(mem):
    """A fresh SGD table that starts at 0: each row counts the pushes applied to it."""
    if "once" in mem.tables():
        mem.drop_table("once")
    mem.create_table("once", rows=ROWS, dim=4, optimizer={"name": "sgd"}, init_std=0.0)
    return "once"


def _agent_pid(reader):
    import ray

    return ray.get(reader.handle.pid.remote(), timeout=60)


@pytest.mark.parametrize("table", ["a", "bf"])
@pytest.mark.parametrize("node_local", [True, False])
def test_rows_through_the_agent_equal_the_in_process_path(mem, table, node_local):
    ids = np.random.default_rng(1).integers(0, ROWS, (4, 700))  # duplicates inside
    reader = AgentReader(mem, node_local=node_local)
    fetcher = RowFetcher(mem, node_local=node_local)
    try:
        before = reader.summary()  # the node's counters: every worker's
        fut = reader.fetch_async(table, ids)
        uniq, rows, inverse = fut.result()
        u2, r2, i2 = fetcher.fetch(table, ids)
        assert np.array_equal(uniq, u2) and np.array_equal(inverse, i2)
        assert rows.dtype == r2.dtype and np.array_equal(rows.view(np.uint8), r2.view(np.uint8))
        assert np.array_equal(uniq[inverse], ids.reshape(-1))
        fut.release()
        s = reader.summary()
        assert (s["node_local_rows"] > before["node_local_rows"]) == node_local
        assert s["agent_fetches"] == before["agent_fetches"] + 1
        # a bad request is the agent's typed refusal, and the reader goes on
        with pytest.raises(RowOutOfRange):
            reader.fetch_async(table, np.array([ROWS])).result()
        with pytest.raises(UnknownTable):
            reader.fetch_async("no-such-table", np.array([1]))
        assert np.array_equal(reader.fetch(table, ids[0])[1], fetcher.fetch(table, ids[0])[1])
    finally:
        reader.close()
        fetcher.close()


def test_one_cache_for_the_node_and_a_push_from_any_worker_invalidates_it(mem, counted):
    ids = np.arange(0, 2000, 3)
    w1 = AgentReader(mem, cache_bytes={counted: 4 << 20}, node_local=False)
    w2 = AgentReader(mem, cache_bytes={counted: 4 << 20}, node_local=False)
    try:
        assert w1.agent_pid == w2.agent_pid  # one agent for the node
        for _ in range(3):  # frequent enough to be admitted
            w1.fetch(counted, ids)
        before = w2.summary()
        w2.fetch(counted, ids)  # the other worker's first read of these rows: served by the node's cache
        after = w2.summary()
        assert after["cache_hits"] - before["cache_hits"] == ids.size
        assert after["remote_rows"] == before["remote_rows"]
        w1.push_async(counted, ids[:100], -np.ones((100, 4), np.float32), lr=1.0).result()
        uniq, rows, _ = w2.fetch(counted, ids)
        assert np.array_equal(rows, mem.gather(counted, uniq))
        assert np.all(rows[:100] == 1.0) and np.all(rows[100:] == 0.0)
        assert counted in w2.summary()["node_cache_bytes_by_table"]
        mem.drop_table(counted)  # the agent forgets a dropped table's cache
        deadline = time.monotonic() + 60
        while counted in w2.summary()["node_cache_bytes_by_table"]:
            assert time.monotonic() < deadline, "the dropped table's cache is still held"
            time.sleep(0.5)
    finally:
        w1.close()
        w2.close()


def test_kill9_of_the_agent_mid_training_loses_nothing_and_applies_nothing_twice(mem, counted):
    reader = AgentReader(mem, node_local=False)
    n, window = 240, 8
    old_pid = _agent_pid(reader)
    pending, acked = [], 0
    try:
        for i in range(n):
            ids = np.array([2 * i, 2 * i + 1, ROWS - 1])  # its own two rows and one every push adds to
            pending.append(reader.push_async(counted, ids, -np.ones((3, 4), np.float32), lr=1.0, step=i))
            if i == n // 3:
                os.kill(old_pid, signal.SIGKILL)  # with pushes in flight
            if len(pending) >= window:
                assert pending.pop(0).result(timeout=120) == 3  # no failed step
                acked += 1
            if i % 20 == 0:  # reads in between, through the same (possibly restarting) agent
                uniq, rows, _ = reader.fetch(counted, ids)
                assert np.array_equal(rows, mem.gather(counted, uniq))
        for p in pending:
            assert p.result(timeout=120) == 3
            acked += 1
        new_pid = _agent_pid(reader)
    finally:
        reader.close()
    assert acked == n and new_pid != old_pid and reader.stats["reconnects"] >= 1
    got = mem.gather(counted, np.arange(2 * n))[:, 0]
    lost, twice = int((got == 0).sum()), int((got > 1).sum())
    assert (lost, twice) == (0, 0) and np.all(got == 1.0)
    assert mem.gather(counted, np.array([ROWS - 1]))[0, 0] == n


_WORKER = r"""
import sys, numpy as np, engram_mem
from engram_mem.agent import AgentReader
mem = engram_mem.connect(address=sys.argv[1], name=sys.argv[2])
reader = AgentReader(mem, node_local=False)
print("ready", reader.agent_pid, flush=True)
base = int(sys.argv[3])
for i in range(100000):
    ids = np.array([base + i])
    reader.push_async("once", ids, -np.ones((1, 4), np.float32), lr=1.0).result()
    print("acked", i, flush=True)
"""


def test_kill9_of_one_of_two_workers_leaves_the_agent_serving_the_other(mem, counted, tmp_path):
    import ray

    address = ray.get_runtime_context().gcs_address
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    theirs = 1 << 15
    p = subprocess.Popen([sys.executable, str(script), address, "agent-test", str(theirs)], stdout=subprocess.PIPE,
                         text=True, env=dict(os.environ))
    reader = AgentReader(mem, node_local=False)
    ours, their_acked = 0, -1
    try:
        line = p.stdout.readline().split()
        assert line[:1] == ["ready"] and int(line[1]) == reader.agent_pid  # the same agent
        while their_acked < 30:
            their_acked = int(p.stdout.readline().split()[1])
        p.send_signal(signal.SIGKILL)  # mid-push, most likely
        p.wait()
        for i in range(60):  # the surviving worker: every push acknowledged, no error
            assert reader.push_async(counted, np.array([i]), -np.ones((1, 4), np.float32), lr=1.0).result(60) == 1
            ours += 1
        for line in p.stdout.read().split("\n"):  # what the killed worker was told before it died
            if line.startswith("acked"):
                their_acked = int(line.split()[1])
        assert reader.summary()["agent_workers"] >= 1 and reader.agent_pid == _agent_pid(reader)
    finally:
        reader.close()
        if p.poll() is None:
            p.kill()
    mine = mem.gather(counted, np.arange(60))[:, 0]
    assert ours == 60 and np.all(mine == 1.0)
    theirs_rows = mem.gather(counted, np.arange(theirs, theirs + their_acked + 3))[:, 0]
    assert np.all(theirs_rows[:their_acked + 1] == 1.0)  # lost 0: every acknowledged push is there
    assert np.all(theirs_rows <= 1.0)                     # twice 0 (the one in flight: 0 or 1)


def _raw(reader):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(30)
    s.connect("\0" + reader.address)
    return s


def _answer(s):
    raw = s.recv(P.MAX_MESSAGE)
    if not raw:
        return None, None
    op, _, meta = P.unpack(raw, P.REPLY_OPS)
    return op, meta


def test_any_bytes_on_the_agents_socket_get_a_defined_refusal_and_it_keeps_serving(mem):
    reader = AgentReader(mem)
    try:
        # before HELLO: refused and closed
        s = _raw(reader)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        op, meta = _answer(s)
        assert op == P.ERROR and meta.startswith(b"InvalidArgument") and b"magic" in meta
        s.sendall(P.pack(P.FETCH, 1, {"table": "a", "slot": 0, "n": 1}))
        op, meta = _answer(s)
        assert op == P.ERROR and meta.startswith(b"Unauthenticated") and _answer(s) == (None, None)
        s.close()
        s = _raw(reader)
        s.sendall(P.pack(P.HELLO, 1, {"credential": "not-the-credential"}))
        op, meta = _answer(s)
        assert op == P.ERROR and meta.startswith(b"Unauthenticated") and _answer(s) == (None, None)
        s.close()
        # after HELLO: every bad message is answered and the connection goes on
        s = _raw(reader)
        s.sendall(P.pack(P.HELLO, 1, {"credential": mem.security.credential}))
        assert _answer(s)[0] == P.OK
        bad = [
            b"\x00" * 3,
            b"EMag" + bytes([9]) + b"\x00" * 15,                                   # version
            P.HEADER.pack(P.MAGIC, P.VERSION, 99, 0, 2, 0),                        # op
            P.HEADER.pack(P.MAGIC, P.VERSION, P.FETCH, 0, 3, 50) + b"{}",           # meta length
            P.HEADER.pack(P.MAGIC, P.VERSION, P.FETCH, 0, 4, 5) + b"{nope",        # JSON
            P.pack(P.FETCH, 5, {"table": "a", "slot": 0}),                         # missing field
            P.pack(P.FETCH, 6, {"table": "a", "slot": "0", "n": 1}),               # wrong type
            P.pack(P.FETCH, 7, {"table": "a", "slot": 0, "n": -1}),                # negative
            P.pack(P.FETCH, 8, {"table": "a", "slot": 200, "n": 1}),               # slot never sent
            P.pack(P.FETCH, 9, {"table": "zzz", "slot": 0, "n": 1}),               # table
            P.pack(P.SLOT, 10, {"slot": 0, "bytes": 4096}),                        # no descriptor
            P.pack(P.PUSH, 11, {"table": "a", "slot": 0, "n": 1, "step": 0, "key": ["x"]}),
            b"EMag" + os.urandom(200),
            os.urandom(P.MAX_MESSAGE + 100),                                        # over the size: cut
        ]
        rng = np.random.default_rng(0)
        bad += [rng.bytes(int(rng.integers(1, 300))) for _ in range(100)]
        for msg in bad:
            s.sendall(msg)
            op, meta = _answer(s)
            assert op == P.ERROR and meta, msg[:40]
        # descriptors that are not sealed memory files, or smaller than they claim
        r, w = os.pipe()
        socket.send_fds(s, [P.pack(P.SLOT, 0, {"slot": 1, "bytes": 4096})], [r])
        assert b"not a sealable memory file" in _answer(s)[1]
        os.close(r), os.close(w)
        fd = os.memfd_create("unsealed", os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, 4096)
        socket.send_fds(s, [P.pack(P.SLOT, 0, {"slot": 1, "bytes": 4096})], [fd])
        assert b"not sealed" in _answer(s)[1]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        socket.send_fds(s, [P.pack(P.SLOT, 0, {"slot": 1, "bytes": 1 << 20})], [fd])
        assert b"holds 4096 bytes" in _answer(s)[1]
        socket.send_fds(s, [P.pack(P.SLOT, 0, {"slot": 1, "bytes": 4096})], [fd])  # a good one: no answer
        s.sendall(P.pack(P.FETCH, 12, {"table": "a", "slot": 1, "n": 1000}))  # too many ids for it
        assert b"slot 1 holds 4096" in _answer(s)[1]
        os.pwrite(fd, np.array([5, 7], np.int64).tobytes(), 0)
        s.sendall(P.pack(P.FETCH, 13, {"table": "a", "slot": 1, "n": 2}))
        op, meta = _answer(s)
        assert op == P.OK and P.FETCH_REPLY.unpack(meta) == (2,)
        os.close(fd)
        s.close()
        # the agent still serves a proper worker, and counted the refusals
        uniq, rows, _ = reader.fetch("a", np.arange(10))
        assert np.array_equal(rows, mem.gather("a", np.arange(10)))
        assert reader.summary()["agent_refused"] >= len(bad)
    finally:
        reader.close()


def test_a_reader_that_cannot_reach_its_agent_ends_requests_with_typed_errors(mem, counted):
    reader = AgentReader(mem, node_local=False)
    try:
        reader.retry_timeout = 2.0
        fut = reader.push_async(counted, np.array([7]), -np.ones((1, 4), np.float32), lr=1.0)  # sent ...
        os.kill(_agent_pid(reader), signal.SIGKILL)                                            # ... agent gone
        reader.address = "engram-mem-agent-nobody"  # as if it never came back
        with pytest.raises(MaybeApplied) as e:
            fut.result(timeout=60)
        assert e.value.key == fut.key and e.value.table == counted
        with pytest.raises(Unavailable, match="nothing of it was sent"):  # and one never sent
            reader.push_async(counted, np.array([8]), -np.ones((1, 4), np.float32), lr=1.0).result(timeout=60)
    finally:
        reader._closed = True
        for slot in reader._slots:
            slot.close()
    # the retry through another path, with its key, applies it once, whether or not the agent had
    mem.push(counted, np.array([7]), -np.ones((1, 4), np.float32), lr=1.0, key=e.value.key)
    assert mem.gather(counted, np.array([7, 8]))[:, 0].tolist() == [1.0, 0.0]
    other = AgentReader(mem)  # the restarted agent serves new readers
    try:
        assert other.fetch(counted, np.array([7]))[1][0, 0] == 1.0
    finally:
        other.close()


def test_agent_and_shards_run_on_the_cores_the_cluster_names(ray_local):
    """agent_cpus / shard_cpus pin every thread of the node's agent and of each shard (threads
    started after the pin included), agent_nice / shard_nice set their priority (5 here: raising
    it needs CAP_SYS_NICE), and the rows read through the pinned agent are the table's."""
    from engram_mem.affinity import thread_affinities, thread_nices

    core = max(os.sched_getaffinity(0))
    with engram_mem.connect(shards=2, name="agent-pinned", agent_cpus=[core], shard_cpus=str(core),
                            agent_nice=5, shard_nice="5") as pinned:
        pinned.create_table("p", rows=ROWS, dim=DIM, seed=6)
        reader = AgentReader(pinned, node_local=False)
        try:
            ids = np.arange(0, ROWS, 97, dtype=np.int64)
            uniq, rows, inverse = reader.fetch("p", ids)          # the agent's fetch threads exist from here on
            np.testing.assert_array_equal(rows[inverse], pinned.gather("p", ids))
            assert reader.summary()["agent_cpus"] == [core]
            pids = {"agent": _agent_pid(reader)}
            pids.update({f"shard {s}": pinned.view.shards[s]["pid"] for s in pinned.view.shard_ids})
            for what, pid in pids.items():
                threads = thread_affinities(pid)
                assert len(threads) > 1, what
                assert all(cpus == {core} for cpus in threads.values()), (what, threads)
                assert set(thread_nices(pid).values()) == {5}, (what, thread_nices(pid))
            assert reader.summary()["agent_nice"] == 5
        finally:
            reader.close()
    # Without a nice value the data path runs at the driver's priority, not Ray's worker nice 15.
    with engram_mem.connect(shards=1, name="agent-level") as level:
        pid = level.view.shards[level.view.shard_ids[0]]["pid"]
        assert set(thread_nices(pid).values()) == {os.getpriority(os.PRIO_PROCESS, 0)} == {0}

