"""Failures the chaos run (bench/bench_chaos.py) found, each alone, with the seed and schedule that found it.

Real parts only: a local Ray cluster, real shards, a real size-limited tmpfs.
"""

import os
import shutil
import subprocess
import time

import numpy as np
import pytest

import engram_mem
from engram_mem.errors import MaybeApplied, ResourceExhausted, Unavailable
from tests.unit.storage.test_disk_full import small_disk  # noqa: F401 - a fixture: a 2 MiB tmpfs


def _fill(path):
    """Fill the filesystem at `path` to the last byte."""
    with open(path, "wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                pass


def test_a_push_refused_by_one_full_shard_but_applied_by_another_is_not_reported_refused(ray_local, tmp_path, small_disk):
    """Found by `tests/integration/test_chaos.py` (seed 7, a fault every 5-8 s, one round): during
    `disk-full` 25 rows of 1063 pushes told ResourceExhausted were present. Both shards' logs share
    the data disk; the first shard whose log hits the full disk refuses the next pushes, while the
    other shard still takes its part and acknowledges it once space returns. Here only shard 0's
    directory is on the full disk: a push whose part on shard 0 is refused and whose part on shard 1
    is applied must not end as a refusal ("not applied"), but as MaybeApplied (or acknowledged).
    Fixed in engram_mem/client/writes.py: a part's refusal with another part acknowledged or in
    flight ends MaybeApplied."""
    data = tmp_path / "data"
    with engram_mem.connect(shards=2, data_dir=str(data), name="found-refused") as mem:
        mem.create_table("t", rows=1 << 14, dim=8, optimizer={"name": "sgd"}, init_std=0.0)
    # shard 0's directory moved onto the small disk; the cluster restarts from the data directory
    shutil.copytree(data / "shard-0000", small_disk / "shard-0000", symlinks=True)
    shutil.rmtree(data / "shard-0000")
    (data / "shard-0000").symlink_to(small_disk / "shard-0000", target_is_directory=True)
    with engram_mem.connect(shards=2, data_dir=str(data), name="found-refused") as mem:
        t = mem.view.table("t")
        sid_of = np.asarray(mem.view.shard_ids)[t.placement[np.arange(t.spec.rows) // t.spec.slot_rows]]
        on0, on1 = np.nonzero(sid_of == 0)[0][:512], np.nonzero(sid_of == 1)[0][:512]
        ids = np.concatenate([on0, on1])
        g = -np.ones((ids.size, 8), np.float32)
        mem.push("t", ids, g, lr=1.0)                       # 1: on both disks
        filler = small_disk / "filler"
        _fill(filler)
        first = mem.push_async("t", ids, g, lr=1.0)         # 2: shard 0's log waits for space
        time.sleep(2)
        told, acked = None, 0
        for _ in range(20):                                 # 3: refused by shard 0, applied by shard 1
            try:
                mem.push("t", ids, g, lr=1.0, timeout=30)
                acked += 1
            except ResourceExhausted:
                told = "refused"
                break
            except Unavailable:
                told = "unavailable"
                break
            except MaybeApplied as e:
                told = "maybe"
                key = e.key
                break
        os.unlink(filler)
        first.result(60)
        if told == "maybe":
            mem.push("t", ids, g, lr=1.0, key=key)
        rows = mem.gather("t", ids)[:, 0]
        assert told in ("refused", "unavailable", "maybe"), told
        want = 2 + acked + (told == "maybe")   # refused and Unavailable both say: not applied
        assert np.all(rows[:512] == want), (told, np.unique(rows[:512]))
        assert np.all(rows[512:] == want), (told, "shard 1 applied a push the client reported not applied",
                                            np.unique(rows[512:]))


@pytest.fixture
def disk(tmp_path):
    """An 8 MiB tmpfs for a whole data directory (needs the right to mount, as root has here and in CI)."""
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def _placements(mem):
    return {n: np.asarray(t.placement).copy() for n, t in mem.view.tables.items()}


def test_a_scale_whose_new_shard_cannot_start_on_a_full_disk_is_refused_typed_and_changes_nothing(ray_local, disk):
    """Found by `tests/integration/test_chaos.py` (seed 7, a fault every 5-8 s, one round, on 85aed84):
    `scale` (2 -> 3) ran while `disk-full` filled the data disk (both had waited for `delete-shard-dir`,
    so they started together). Shard 2 could not create its directory (ENOSPC) and the scale failed
    with the base class EngramMemError ("shard 2 could not start: [Errno 28] No space left on
    device"), which names neither the scale nor what to do; and the failed start deleted the
    cluster's whole /dev/shm directory, the row files of the two shards that went on serving (a
    same-node reader could map them no more). Now: ResourceExhausted saying the scale was refused,
    that nothing changed and to free space; the serving shards' files stay; the same scale succeeds
    once space returns (engram_mem/control/supervisor.py, resharding.py)."""
    from engram_mem.errors import ResourceExhausted

    data = disk / "data"
    with engram_mem.connect(shards=2, data_dir=str(data), name="found-scale-full") as mem:
        mem.create_table("t", rows=1 << 12, dim=8, optimizer={"name": "sgd"}, init_std=0.0)
        ids = np.arange(1 << 12)
        g = -np.ones((ids.size, 8), np.float32)
        mem.push("t", ids, g, lr=1.0)
        before, epoch = _placements(mem), mem.view.epoch
        shm = mem.view.shards[0]["shm_dir"]
        files = sorted(os.listdir(shm))
        assert files == ["shard-0", "shard-1"], files
        filler = disk / "filler"
        _fill(filler)
        with pytest.raises(ResourceExhausted) as ei:
            mem.scale(3)
        msg = str(ei.value)
        assert "scale 2 -> 3 refused, nothing changed" in msg and "shard 2 could not start" in msg, msg
        assert "No space left on device" in msg and "free space" in msg and "run the scale again" in msg, msg
        view = mem.refresh(check_shards=True)
        assert view.shard_ids == [0, 1] and view.epoch == epoch
        assert all(np.array_equal(before[n], p) for n, p in _placements(mem).items())
        assert sorted(os.listdir(shm)) == files                  # the serving shards' row files stay
        assert not (data / "shard-0002").exists()                 # nothing half-made left for the next scale
        assert np.all(mem.gather("t", ids) == 1)
        os.unlink(filler)
        mem.push("t", ids, g, lr=1.0)
        mem.scale(3)
        assert mem.view.shard_ids == [0, 1, 2]
        assert (np.asarray(mem.view.tables["t"].placement) == 2).any()
        assert np.all(mem.gather("t", ids) == 2)


def test_a_scale_whose_cluster_file_cannot_be_written_at_the_switch_changes_nothing(ray_local, disk):
    """The same overlap one step later (read in engram_mem/control/resharding.py while looking at the
    seed-7 refusal): the disk fills after the pre-copy, so the switch cannot persist the new placement
    (cluster.json). The controller had already switched it in memory and dropped the removed shard
    from its list (still running, never stopped) when the write failed, and raised a bare OSError:
    clients then routed by a placement no restart would read back. Now the switch is undone before
    writes resume (the old placement and epoch, the copies dropped) and the scale is refused with
    ResourceExhausted. durability="none": no log, so nothing but the cluster file needs the disk."""
    from engram_mem.control.cluster_state import ClusterState
    from engram_mem.errors import ResourceExhausted

    data = disk / "data"
    with engram_mem.connect(shards=3, data_dir=str(data), durability="none", name="found-scale-switch") as mem:
        mem.create_table("t", rows=1 << 12, dim=8, optimizer={"name": "sgd"}, init_std=0.0)
        ids = np.arange(1 << 12)
        g = -np.ones((ids.size, 8), np.float32)
        mem.push("t", ids, g, lr=1.0)
        before, epoch = _placements(mem), mem.view.epoch
        filler = data / "filler"
        _fill(filler)
        with pytest.raises(ResourceExhausted) as ei:
            mem.scale(2)
        msg = str(ei.value)
        assert "scale 3 -> 2 refused, nothing changed" in msg and "cluster file" in msg and "free space" in msg, msg
        view = mem.refresh(check_shards=True)
        assert view.shard_ids == [0, 1, 2] and view.epoch == epoch
        assert all(np.array_equal(before[n], p) for n, p in _placements(mem).items())
        assert ClusterState.load(str(data)).epoch == epoch
        mem.push("t", ids, g, lr=1.0)                            # routed as before, applied once
        assert np.all(mem.gather("t", ids) == 2)
        os.unlink(filler)
        mem.scale(2)
        assert mem.view.shard_ids == [0, 1] and ClusterState.load(str(data)).shards == 2
        mem.push("t", ids, g, lr=1.0)
        assert np.all(mem.gather("t", ids) == 3)
