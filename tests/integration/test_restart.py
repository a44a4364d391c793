"""A shard process killed with SIGKILL is restarted by the controller from its last lmdb snapshot."""

import os
import signal
import time

import numpy as np

import engram_mem


def test_killed_shard_restarts_from_its_snapshot(ray_local, tmp_path):
    data_dir = str(tmp_path / "data")
    with engram_mem.connect(shards=2, name="restart", data_dir=data_dir, snapshot_interval_s=0) as mem:
        spec = mem.create_table("r", rows=40_000, dim=16, seed=3, optimizer={"name": "adam"})
        ids = np.arange(0, 40_000, 7)
        mem.push("r", ids, np.ones((ids.size, 16), np.float32), lr=0.05)
        saved = mem.gather("r", ids)
        assert mem.checkpoint()["bytes_written"] > 0
        assert os.path.exists(os.path.join(data_dir, "cluster.json"))
        # An update after the snapshot: lost when the shard dies (documented), rows roll back to the snapshot.
        mem.push("r", ids[:5], np.ones((5, 16), np.float32), lr=0.05)

        victim = mem.view.shards[mem.view.shard_ids[1]]
        os.kill(victim["pid"], signal.SIGKILL)
        t0 = time.time()
        got = mem.gather("r", ids)  # the client finds the shard gone, the controller restarts it
        assert time.time() - t0 < 120
        new = mem.view.shards[mem.view.shard_ids[1]]
        assert new["pid"] != victim["pid"] and new["restarts"] == 1
        on_victim = mem.view.tables["r"].placement[ids // spec.slot_rows] == 1
        assert on_victim.any()
        assert np.array_equal(got[on_victim], saved[on_victim])
        untouched = ~on_victim
        untouched[:5] = False
        assert np.array_equal(got[untouched], saved[untouched])
        # Adam state came back with the rows: the next step continues (per-row step 2, not 1).
        before = mem.gather("r", ids[on_victim][-1:])
        mem.push("r", ids[on_victim][-1:], np.ones((1, 16), np.float32), lr=0.05)
        delta = before - mem.gather("r", ids[on_victim][-1:])
        assert np.allclose(delta, 0.05, atol=1e-4)  # Adam with a constant gradient moves lr per step


def test_cluster_restarts_with_tables_from_its_data_dir(ray_local, tmp_path):
    data_dir = str(tmp_path / "data")
    with engram_mem.connect(shards=2, name="persist-a", data_dir=data_dir) as mem:
        mem.create_table("k", rows=1000, dim=4, seed=1)
        mem.write("k", [3, 999], np.full((2, 4), 7.0, np.float32))
    # A new cluster (three shards this time) over the same data_dir comes back with the table and rows.
    with engram_mem.connect(shards=3, name="persist-b", data_dir=data_dir) as mem:
        assert "k" in mem.tables()
        assert np.all(mem.gather("k", [3, 999]) == 7.0)
        assert np.array_equal(mem.gather("k", [4]), mem.tables()["k"].init_rows([4]))
