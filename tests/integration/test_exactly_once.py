"""Every push ends acknowledged (applied once) or with a typed error that says what is known, under
kill -9 of a shard (mid-way, during a scale; with replicas during a rebuild: test_replicas.py),
counted per push with the caller's own record (tests/kill_workload.py); a closed client and a
caller's timeout stop a push's retries."""

import time

import numpy as np
import pytest

import engram_mem
from engram_mem.errors import MaybeApplied, Unavailable
from tests.kill_workload import DIM, kill, three_kills, wait_restarted



@pytest.mark.slow
@pytest.mark.parametrize("durability", ["process", "fsync"])
def test_kill9_three_times_every_push_ends_acked_once_or_typed(ray_local, tmp_path, durability):
    with engram_mem.connect(shards=2, name=f"once-{durability}", data_dir=str(tmp_path), durability=durability,
                            snapshot_interval_s=1.0) as mem:
        report = three_kills(mem, replicas=1)
        # the counted pushes travelled over the data plane (framed TCP), killed mid-transfer three times
        moved = mem.transport_counts()
        assert moved["tcp"]["push"] >= sum(report[k] for k in ("acked", "maybe->acked")), moved
        assert moved["grpc"]["push"] == 0, moved


def test_a_closed_client_stops_its_pushes_and_says_what_is_known(ray_local, tmp_path):
    """Closing a client while a push waits out a dead shard: the push ends Unavailable or
    MaybeApplied (naming its key), close() returns, and nothing is sent after."""
    with engram_mem.connect(shards=2, name="once-close", data_dir=str(tmp_path)) as mem:
        mem.create_table("c", rows=4096, dim=DIM, optimizer={"name": "sgd"}, init_std=0.0)
        other = engram_mem.connect(name="once-close", retry_timeout=600.0)
        ids = np.array([0, 4095])
        g = -np.ones((2, DIM), np.float32)
        other.push("c", ids, g, lr=1.0)
        sid1 = mem.view.shard_ids[1]
        pid = kill(mem, sid1)
        futs = [other.push_async("c", ids, g, lr=1.0) for _ in range(5)]
        time.sleep(0.2)
        t0 = time.monotonic()
        other.close()
        assert time.monotonic() - t0 < 30
        for f in futs:
            assert f.done()
            e = f.exception()
            assert e is None or isinstance(e, (Unavailable, MaybeApplied)), repr(e)
            if e is not None:
                assert e.key is not None and e.key[0] == other.client_id and "'c'" in str(e)
        with pytest.raises(Unavailable, match="client is closed"):
            other.push_async("c", ids, g, lr=1.0)
        wait_restarted(mem, sid1, pid)
        n_ok = sum(f.exception() is None for f in futs)
        n_maybe = [f.exception() for f in futs if isinstance(f.exception(), MaybeApplied)]
        for e in n_maybe:  # the safe retry from the caller's side, with the dead client's key
            mem.push("c", ids, g, lr=1.0, key=e.key)
        got = mem.gather("c", ids)
        assert np.all(got == 1 + n_ok + len(n_maybe)), (got[:, 0], n_ok, len(n_maybe))


def test_a_push_past_its_timeout_stops_retrying(ray_local, tmp_path):
    """push(timeout=) against a shard that stays down: the typed error comes at the timeout, and
    the shard, back, never sees the push."""
    with engram_mem.connect(shards=2, name="once-timeout", data_dir=str(tmp_path)) as mem:
        mem.create_table("t", rows=4096, dim=DIM, optimizer={"name": "sgd"}, init_std=0.0)
        ids = np.array([0, 4095])
        g = -np.ones((2, DIM), np.float32)
        mem.push("t", ids, g, lr=1.0)
        sid1 = mem.view.shard_ids[1]
        pid = kill(mem, sid1)
        t0 = time.monotonic()
        err = None
        try:
            mem.push("t", ids, g, lr=1.0, timeout=0.05)
            outcome = "acked"
        except (Unavailable, MaybeApplied) as e:
            outcome, err = type(e).__name__, e
            assert "timeout of 0.05s" in str(e) and e.key is not None
        assert time.monotonic() - t0 < 10
        wait_restarted(mem, sid1, pid)
        time.sleep(0.5)
        got = mem.gather("t", ids)[:, 0]
        if outcome == "Unavailable":   # it reached no shard; nothing of it may land later
            assert list(got) == [1.0, 1.0]
        elif outcome == "acked":
            assert list(got) == [2.0, 2.0]
        else:                          # part of it may be there; the key completes it exactly once
            mem.push("t", ids, g, lr=1.0, key=err.key)
            assert list(mem.gather("t", ids)[:, 0]) == [2.0, 2.0]
