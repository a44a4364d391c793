import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from engram_mem.errors import (InvalidArgument, NonFiniteGradient, NotReady, RequestTooLarge, RowOutOfRange,
                               StaleEpoch, TableExists, UnknownTable)
from engram_mem.storage.store import ShardStore
from engram_mem.table import TableSpec, to_float32


@pytest.fixture
def shm_dir():
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        yield d


def _store(shm_dir, slots=None, dtype="float32", optimizer=None, shard_id=0):
    spec = TableSpec("t", rows=10_000, dim=16, seed=5, num_slots=64, dtype=dtype)
    s = ShardStore(shard_id, shm_dir=shm_dir)
    s.add_table(spec, range(64) if slots is None else slots, optimizer=optimizer, epoch=3)
    return s, spec


def test_gather_returns_initial_rows_in_request_order(shm_dir):
    s, spec = _store(shm_dir, slots=range(0, 64, 2))
    ids = np.array([0, 156, 314, 0, 9999 - 9999 % 157 - 157])  # slots 0, 0, 2, 0, 62
    assert np.array_equal(s.gather("t", ids), spec.init_rows(ids))
    assert s.gather("t", np.zeros(0, np.int64)).shape == (0, 16)
    with pytest.raises(InvalidArgument, match="slot 1, which shard 0 does not own"):
        s.gather("t", [157])
    s.close()


def test_rows_live_in_one_shared_memory_file(shm_dir):
    s, spec = _store(shm_dir)
    path = s.tables["t"].buffer.path
    assert path.startswith(shm_dir) and os.path.getsize(path) == 64 * spec.slot_rows * spec.row_bytes
    # Another process mapping the file sees the shard's rows (the same-node tier).
    mapped = np.memmap(path, dtype=np.float32, mode="r").reshape(-1, 16)
    local = s._local_rows(s.tables["t"], np.array([42]))
    assert np.array_equal(mapped[local], s.gather("t", [42]))
    s.close()
    assert not os.path.exists(path)


def test_write_and_push(shm_dir):
    s, spec = _store(shm_dir, optimizer={"name": "sgd", "lr": 0.5})
    s.write("t", [7, 8, 7], np.stack([np.zeros(16), np.ones(16), np.full(16, 2.0)]).astype(np.float32))
    assert np.all(s.gather("t", [7]) == 2.0) and np.all(s.gather("t", [8]) == 1.0)  # last of duplicates wins
    before = s.gather("t", [1, 2])
    n, _ = s.push("t", [1, 2, 1], np.ones((3, 16), np.float32))  # default lr 0.5, duplicates summed
    assert n == 2
    after = s.gather("t", [1, 2])
    assert np.allclose(before - after, [[1.0] * 16, [0.5] * 16])
    assert s.tables["t"].dirty[0]
    s.close()


def test_bfloat16_table(shm_dir):
    s, spec = _store(shm_dir, dtype="bfloat16")
    s.write("t", [3], np.full((1, 16), 1.5, np.float32))
    assert np.all(to_float32(s.gather("t", [3]), "bfloat16") == 1.5)
    s.push("t", [3], np.ones((1, 16), np.float32), lr=0.5)
    assert np.all(to_float32(s.gather("t", [3]), "bfloat16") == 1.0)
    s.close()


def test_bad_input_is_rejected_and_nothing_is_applied(shm_dir):
    s, spec = _store(shm_dir)
    before = s.gather("t", np.arange(10))
    cases = [
        (lambda: s.gather("nope", [1]), UnknownTable, "'nope'"),
        (lambda: s.gather("t", [-1]), RowOutOfRange, "row id -1"),
        (lambda: s.gather("t", [10_000]), RowOutOfRange, "row id 10000"),
        (lambda: s.gather("t", b"1234567"), InvalidArgument, "7 bytes, not a multiple of 8"),
        (lambda: s.push("t", [1], np.ones((1, 15), np.float32)), InvalidArgument, r"shape \(1, 15\)"),
        (lambda: s.push("t", [1], np.ones(16 * 4, np.float16).tobytes(), dtype="float16"), InvalidArgument, "dtype 'float16'"),
        (lambda: s.push("t", [1, 2], np.ones(16 * 4, np.float32).tobytes()), InvalidArgument, "256 bytes"),
        (lambda: s.push("t", [1, 2], np.stack([np.ones(16), np.full(16, np.inf)]).astype(np.float32)), NonFiniteGradient, "row id 2"),
        (lambda: s.push("t", [1], np.full((1, 16), np.nan, np.float32)), NonFiniteGradient, "NaN or Inf"),
        (lambda: s.write("t", [1], np.ones((2, 16), np.float32)), InvalidArgument, "shape"),
        (lambda: s.gather("t", [1], epoch=2), StaleEpoch, "epoch 2"),
    ]
    for call, exc, words in cases:
        with pytest.raises(exc, match=words):
            call()
    assert np.array_equal(s.gather("t", np.arange(10)), before)
    s.max_request_bytes = 1 << 10
    with pytest.raises(RequestTooLarge, match="request limit"):
        s.gather("t", np.zeros(200, np.int64).tobytes())
    s.set_ready(False, "restoring")
    with pytest.raises(NotReady, match="restoring"):
        s.gather("t", [1])
    s.set_ready(True)
    s.freeze_writes(True)
    with pytest.raises(NotReady, match="read-only"):
        s.push("t", [1], np.ones((1, 16), np.float32))
    with pytest.raises(TableExists):
        s.add_table(spec, [])
    s.close()


def test_slots_move_with_their_rows_and_optimizer_state(shm_dir):
    a, spec = _store(shm_dir, slots=range(0, 32), optimizer={"name": "adam"})
    b = ShardStore(1, shm_dir=shm_dir)
    b.add_table(spec, range(32, 64), optimizer={"name": "adam"})
    ids = np.array([5, 200, 4000])
    a.push("t", ids, np.ones((3, 16), np.float32), lr=0.1)
    want = a.gather("t", ids)
    moved = a.export_slots("t", [0, 1])
    b.add_slots("t", moved)
    a.remove_slots("t", [0, 1])
    assert np.array_equal(b.gather("t", [5, 200]), want[:2])
    # The Adam step counts moved too: a second push continues the same trajectory on either shard.
    b.push("t", [5], np.ones((1, 16), np.float32), lr=0.1)
    a.push("t", [4000], np.ones((1, 16), np.float32), lr=0.1)
    assert np.allclose(want[0] - b.gather("t", [5])[0], want[2] - a.gather("t", [4000])[0])
    # Freed frames are reused before the buffer grows.
    frames = a.tables["t"].buffer.frames
    a.add_slots("t", b.export_slots("t", [40]))
    assert a.tables["t"].buffer.frames == frames
    a.close(), b.close()


def test_resident_memory_stays_near_table_bytes(shm_dir):
    """A 512 MB table costs the shard process at most 1.1x its bytes plus a fixed overhead."""
    code = r"""
import os, sys, numpy as np
from engram_mem.storage.store import ShardStore
from engram_mem.table import TableSpec
def rss():
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
base = rss()
spec = TableSpec("t", rows=(512 << 20) // 1024, dim=256, seed=1)
s = ShardStore(0, shm_dir=sys.argv[1])
s.add_table(spec, range(spec.n_slots))
for _ in range(3):
    s.gather("t", np.random.randint(0, spec.rows, 65536))
s.push("t", np.arange(1000), np.ones((1000, 256), np.float32))
print(rss() - base, spec.nbytes)
s.close()
"""
    out = subprocess.run([sys.executable, "-c", code, shm_dir], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    grew, nbytes = map(int, out.stdout.split())
    overhead = 200 << 20  # gather outputs, torch/numpy arenas, one partly used slot
    assert grew <= 1.1 * nbytes + overhead, f"resident memory grew {grew / 2**20:.0f} MiB for a {nbytes / 2**20:.0f} MiB table"


def test_huge_pages_names_the_tmpfs_option_of_the_mount_holding_the_rows():
    from engram_mem.storage.frames import huge_pages

    mounts = ("tmpfs /dev/shm tmpfs rw,relatime,size=24683784k 0 0\n"
              "tmpfs /dev/shm/big tmpfs rw,relatime,huge=within_size 0 0\n"
              "/dev/vda / ext4 rw,relatime 0 0\n"
              "tmpfs /dev/shmx tmpfs rw,huge=always 0 0\n")
    assert huge_pages("/dev/shm/engram-mem/c", mounts) == "never"  # no huge= option: the kernel's default
    assert huge_pages("/dev/shm/big/engram-mem/c", mounts) == "within_size"  # the deepest mount wins
    assert huge_pages("/dev/shmfoo/x", mounts) == ""  # a prefix of a name is not a parent: the root (ext4)
    assert huge_pages("/data/x", mounts) == ""  # on disk
    assert huge_pages(None, mounts) == ""
