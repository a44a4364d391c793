"""A disk that fills under the write-ahead log, on a real size-limited tmpfs: updates are refused
with ResourceExhausted naming the log directory before anything is applied, reads go on,
updates accepted before the disk filled wait (never dropped), and everything comes back once
space is freed; a restart from disk then holds exactly the accepted updates."""

import os
import subprocess

import numpy as np
import pytest

from engram_mem.errors import ResourceExhausted
from engram_mem.optim import OptimizerSpec
from engram_mem.storage.recovery import TablePlan, restore_tables, wal_dir
from engram_mem.storage.snapshot import create_empty
from engram_mem.storage.store import ShardStore
from engram_mem.storage.wal import WriteAheadLog
from engram_mem.table import TableSpec

SPEC = TableSpec("t", rows=4096, dim=64, num_slots=16, init_std=0.0)
SGD = OptimizerSpec("sgd")


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs mounted for the test (needs the right to mount, as root has here and in CI)."""
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def _open(data):
    create_empty(str(data), 0)
    s = ShardStore(0)
    restore_tables(s, str(data), [TablePlan(SPEC, SGD, "u1", np.arange(SPEC.n_slots),
                                            np.zeros(SPEC.n_slots, dtype=np.int32))])
    wal = WriteAheadLog(wal_dir(str(data), 0), policy="fsync")
    wal.start(s.lsn + 1)
    s.log = wal
    return s, wal


def test_a_full_disk_refuses_updates_naming_the_log_keeps_reads_and_recovers(small_disk):
    data = small_disk / "data"
    store, wal = _open(data)
    filler = small_disk / "filler"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    with open(filler, "wb") as f:  # leave room for a few records only
        f.write(b"\0" * max(0, free - 200_000))
    ids = np.arange(0, 4096, 4)                              # 1024 rows x 64 floats: ~270 KB a record
    g = -np.ones((ids.size, SPEC.dim), np.float32)
    accepted, refused = 0, None
    for _ in range(400):
        try:
            store.push("t", ids, g, lr=1.0, client="c", seq=accepted + 1)
            accepted += 1
        except ResourceExhausted as e:
            refused = e
            break
        if accepted > 3:
            import time
            time.sleep(0.02)  # let the committer meet the full disk
    assert refused is not None, "the log never reported the full disk"
    assert wal_dir(str(data), 0) in str(refused) and "disk is full" in str(refused)
    rows = store.gather("t", ids)                            # reads go on, and show exactly what was accepted
    assert np.all(rows == float(accepted))
    assert wal.written_lsn < store.lsn                       # accepted but not yet written: waiting, not dropped
    with pytest.raises(ResourceExhausted):                   # refused again, nothing applied
        store.push("t", ids, g, lr=1.0, client="c", seq=accepted + 1)
    assert np.all(store.gather("t", ids) == float(accepted))

    os.unlink(filler)                                        # space comes back
    wal.flush(timeout=30)
    assert wal.written_lsn == store.lsn
    store.push("t", ids, g, lr=1.0, client="c", seq=accepted + 1)
    accepted += 1
    wal.flush(timeout=30)
    wal.close()

    again, wal2 = _open(data)                                # a restart: the log replayed from disk
    assert np.all(again.gather("t", ids) == float(accepted))
    wal2.close()
