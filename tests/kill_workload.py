"""The counted kill -9 workload shared by the exactly-once tests (test_exactly_once.py, test_replicas.py).

Push i adds exactly 1.0 (SGD, lr 1, gradient -1) to its own two rows, one on each of two shards,
so afterwards each row says how often its push was applied: 0, 1 or 2. The caller's record of
what it was told is kept per push: acknowledged, MaybeApplied (then retried with its key, which
must be acknowledged), Unavailable (must be absent), or anything else (a failure of the test).
"""

import os
import signal
import threading
import time

import numpy as np

from engram_mem.errors import MaybeApplied, ResourceExhausted, Unavailable

ROWS, DIM = 1 << 17, 4


BALLAST = 4096  # rows on shard rank 0 in every push: its part there takes longer than a failing one


def rows_of_push(view, name, n, rows=ROWS):
    """For push i: one row on shard rank 0 and one on rank 1 (under the placement at start); and
    the ballast rows (on rank 0) that every push also adds to."""
    t = view.table(name)
    rank = t.placement[np.arange(rows) // t.spec.slot_rows]
    a, b = np.nonzero(rank == 0)[0], np.nonzero(rank == 1)[0]
    ballast, a = a[:BALLAST], a[BALLAST:]
    n = min(n, a.size, b.size)
    return np.stack([a[:n], b[:n]], axis=1), ballast


class Pusher(threading.Thread):
    """Back-to-back pushes; per push what the caller was told: acked, maybe->acked, unavailable,
    refused (ResourceExhausted: a full disk, nothing applied), or other. A MaybeApplied push is
    retried with its key until acknowledged (for up to `retry_s`); acked_at: when each push ended."""

    def __init__(self, mem, name, rows, ballast, retry_s: float = 300.0):
        super().__init__(daemon=True)
        self.mem, self.name, self.rows, self.ballast, self.retry_s = mem, name, rows, ballast, retry_s
        self.told: list[str] = []
        self.ended_at: list[float] = []
        self.other: list[str] = []
        self.slow = 0
        self.stop = threading.Event()

    def _retry(self, ids, g, key):
        """The same push under its key until acknowledged: whichever attempt applied it, once."""
        end = time.monotonic() + self.retry_s
        while True:
            try:
                return self.mem.push(self.name, ids, g, lr=1.0, key=key)
            except (MaybeApplied, Unavailable, ResourceExhausted):
                if time.monotonic() > end:
                    raise
                time.sleep(0.2)

    def run(self):
        g = -np.ones((2 + self.ballast.size, DIM), np.float32)
        for pair in self.rows:
            ids = np.concatenate([pair, self.ballast])
            if self.stop.is_set():
                break
            t0 = time.monotonic()
            try:
                self.mem.push(self.name, ids, g, lr=1.0)
                self.told.append("acked")
            except MaybeApplied as e:
                assert e.key is not None and e.table == self.name
                try:
                    self._retry(ids, g, e.key)  # the safe retry: applied once
                    self.told.append("maybe->acked")
                except BaseException as e2:  # noqa: BLE001 - counted: the test fails on any
                    self.told.append("other")
                    self.other.append(f"retry of {e.key}: {type(e2).__module__}.{type(e2).__name__}: {e2}")
            except Unavailable:
                self.told.append("unavailable")
            except ResourceExhausted:
                self.told.append("refused")
            except BaseException as e:  # noqa: BLE001 - counted: the test fails on any
                self.told.append("other")
                self.other.append(f"{type(e).__module__}.{type(e).__name__}: {e}")
            self.ended_at.append(time.monotonic())
            if time.monotonic() - t0 > 2.0:
                self.slow += 1

    def wait_for(self, n, timeout=120):
        end = time.monotonic() + timeout
        while len(self.told) < n:
            assert time.monotonic() < end and self.is_alive(), f"pushes stalled at {len(self.told)}"
            time.sleep(0.01)


def kill(mem, sid, member=0):
    """kill -9 the process that describe() names for shard sid's member; return its pid."""
    s = mem.describe()["shards"][sid]
    pid = s["pid"] if member == 0 else s["replicas"][member - 1]["pid"]
    os.kill(pid, signal.SIGKILL)
    return pid


def wait_restarted(mem, sid, old_pid, timeout=120):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s = mem.describe()["shards"][sid]
        if s["pid"] != old_pid and s.get("ready"):
            return s
        time.sleep(0.1)
    raise AssertionError(f"shard {sid}: describe() still names pid {old_pid} after {timeout}s")


def three_kills(mem, replicas: int) -> dict:
    """kill -9 shard 1 mid-way, during a scale 2 -> 3, and (with replicas) while a replica rebuilds;
    return the counts, and assert that nothing acknowledged is missing or anything applied twice."""
    mem.create_table("k", rows=ROWS, dim=DIM, optimizer={"name": "sgd"}, init_std=0.0)
    rows, ballast = rows_of_push(mem.view, "k", 60_000)
    sid1 = mem.view.shard_ids[1]
    p = Pusher(mem, "k", rows, ballast)
    p.start()
    pids = []

    # 1: mid-way, back-to-back pushes, snapshots running.
    p.wait_for(100)
    pids.append(kill(mem, sid1))
    wait_restarted(mem, sid1, pids[-1])

    # 2: during a scale 2 -> 3 (slots moving off shard 1 while it dies).
    p.wait_for(len(p.told) + 100)
    scaler = threading.Thread(target=mem.scale, args=(3,), daemon=True)
    scaler.start()
    time.sleep(0.3)
    pids.append(kill(mem, sid1))
    scaler.join(timeout=300)
    assert not scaler.is_alive(), "scale did not finish after the kill"
    wait_restarted(mem, sid1, pids[-1])

    # 3: with replicas, while a replica rebuilds (the restarted primary told them to); else again.
    p.wait_for(len(p.told) + 100)
    if replicas > 1:
        pids.append(kill(mem, sid1, member=1))
        time.sleep(0.5)
    pids.append(kill(mem, sid1))
    s = wait_restarted(mem, sid1, pids[-1])
    p.wait_for(len(p.told) + 100)
    p.stop.set()
    p.join(timeout=120)

    assert s["restarts"] == 3, s
    got = mem.gather("k", rows[:len(p.told)].reshape(-1)).reshape(len(p.told), 2, DIM)
    applied = got[:, :, 0]
    assert np.all(got == got[:, :, :1]), "a row's columns disagree"
    told = np.array(p.told)
    counts = {k: int((told == k).sum()) for k in ("acked", "maybe->acked", "unavailable", "other")}
    ok = (told == "acked") | (told == "maybe->acked")
    report = dict(counts, slow_over_2s=p.slow, pids=pids,
                  acked_missing=int((applied[ok] < 1).sum()), applied_twice=int((applied > 1).sum()),
                  failed_present=int((applied[told == "unavailable"] > 0).sum()))
    print("exactly-once:", report)
    assert p.other == [], p.other[:5]
    assert report["acked_missing"] == 0 and report["applied_twice"] == 0 and report["failed_present"] == 0, report
    assert np.all(applied[ok] == 1) and np.all(applied[~ok] == 0), report
    assert np.all(mem.gather("k", ballast) == ok.sum()), "a ballast row was not applied once per acknowledged push"
    return report
