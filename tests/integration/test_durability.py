"""Nothing acknowledged is lost or applied twice: real processes killed with kill -9, real lmdb and
log files damaged on disk, counted with a known-effect workload.

The workload: SGD with lr 1 and gradient -1, so every acknowledged push adds exactly 1.0 to each
of its rows. After the failure, every row must equal its initial value plus the number of pushes
acknowledged for it: lost and twice-applied are both 0.
"""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import engram_mem
from engram_mem.errors import CorruptData, InvalidArgument, NonFiniteGradient, NonFiniteUpdate

ROWS, DIM = 4096, 8
SPREAD = np.arange(0, ROWS, 64)  # 64 rows over every slot range: each push reaches every shard


def _pusher(mem, table, n, acked, errors, ids=SPREAD, pause=0.0, stop=None):
    g = -np.ones((ids.size, DIM), np.float32)
    for _ in range(n):
        if stop is not None and stop.is_set():
            break
        try:
            mem.push(table, ids, g, lr=1.0)
            acked.append(1)
        except Exception as e:  # noqa: BLE001 - counted, and the test fails on any
            errors.append(repr(e))
        if pause:
            time.sleep(pause)


def _reader(mem, table, stop, gathered, errors):
    """Gather continuously until stop is set; count successes and errors."""
    while not stop.is_set():
        try:
            mem.gather(table, SPREAD)
            gathered.append(1)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))


def _check_exact(mem, table, base, expect_adds):
    """Tables start at 0 (init_std=0), so each row holds exactly the count of pushes applied to it."""
    got = mem.gather(table, SPREAD)
    assert not base.any()
    assert np.array_equal(got, np.full_like(got, float(expect_adds))), (
        f"expected every row at {expect_adds}: lost {expect_adds - got.min():.0f}, "
        f"applied twice {got.max() - expect_adds:.0f}")


def _kill_shard(mem, rank):
    pid = mem.view.shards[mem.view.shard_ids[rank]]["pid"]
    os.kill(pid, signal.SIGKILL)
    return pid


@pytest.mark.slow
@pytest.mark.parametrize("durability", ["process", "fsync"])
def test_kill9_shard_during_pushes_from_two_clients_loses_nothing(ray_local, tmp_path, durability):
    name = f"kill-{durability}"
    with engram_mem.connect(shards=2, name=name, data_dir=str(tmp_path), durability=durability,
                            snapshot_interval_s=1.0) as mem:
        mem.create_table("k", rows=ROWS, dim=DIM, optimizer={"name": "sgd"}, init_std=0.0)
        base = mem.gather("k", SPREAD)
        other = engram_mem.connect(name=name)
        acked, errors = [], []
        threads = [threading.Thread(target=_pusher, args=(c, "k", 150, acked, errors), kwargs={"pause": 0.005})
                   for c in (mem, other)]
        [t.start() for t in threads]
        while len(acked) < 60:
            time.sleep(0.01)
        old = _kill_shard(mem, 1)  # mid-way, with snapshots running in the background
        [t.join() for t in threads]
        other.close()
        assert errors == []
        assert mem.view.shards[mem.view.shard_ids[1]]["pid"] != old
        _check_exact(mem, "k", base, len(acked))
        assert len(acked) == 300


@pytest.mark.slow
def test_kill9_controller_during_gathers_and_pushes(ray_local, tmp_path):
    import ray

    with engram_mem.connect(shards=2, name="kill-ctl", data_dir=str(tmp_path)) as mem:
        mem.create_table("c", rows=ROWS, dim=DIM, optimizer={"name": "sgd"}, init_std=0.0)
        base = mem.gather("c", SPREAD)
        ctl_pid = ray.get(mem.controller.__ray_call__.remote(lambda self: os.getpid()))
        acked, errors, gathered = [], [], []
        stop = threading.Event()
        t_push = threading.Thread(target=_pusher, args=(mem, "c", 200, acked, errors), kwargs={"pause": 0.01})
        t_read = threading.Thread(target=_reader, args=(mem, "c", stop, gathered, errors))
        t_push.start()
        t_read.start()
        while len(acked) < 30:
            time.sleep(0.01)
        os.kill(ctl_pid, signal.SIGKILL)
        t_push.join()
        stop.set()
        t_read.join()
        assert errors == [] and len(gathered) > 0
        _check_exact(mem, "c", base, len(acked))
        # the controller is back (a new process) with the same tables, and status works
        new_pid = ray.get(mem.controller.__ray_call__.remote(lambda self: os.getpid()), timeout=120)
        assert new_pid != ctl_pid
        d = mem.describe()
        assert "c" in d["tables"] and len(d["shards"]) == 2
        assert all(h["status"] == "SERVING" for h in mem.health())


_KILLED_CLIENT = r"""
import sys, numpy as np, engram_mem
mem = engram_mem.connect(address=sys.argv[1], name=sys.argv[2])
ids = np.arange(0, 4096, 64)
print("sending", flush=True)
mem.push("once", ids, -np.ones((ids.size, 8), np.float32), lr=1.0, key=("dead-client", int(sys.argv[3])))
print("acked", flush=True)
"""


def test_client_killed_mid_push_then_retried_with_its_key_applies_once(ray_local, tmp_path):
    import ray

    with engram_mem.connect(shards=2, name="kill-client", data_dir=str(tmp_path)) as mem:
        mem.create_table("once", rows=ROWS, dim=DIM, optimizer={"name": "sgd"}, init_std=0.0)
        base = mem.gather("once", SPREAD)
        address = ray.get_runtime_context().gcs_address
        script = tmp_path / "client.py"
        script.write_text(_KILLED_CLIENT)
        for seq, delay in ((1, 0.0), (2, 0.05), (3, 0.2), (4, 10.0)):
            p = subprocess.Popen([sys.executable, str(script), address, "kill-client", str(seq)],
                                 stdout=subprocess.PIPE, text=True, env=dict(os.environ))
            assert p.stdout.readline().strip() == "sending"
            try:
                p.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                pass
            p.kill()  # SIGKILL: the push may or may not have reached the shards
            p.wait()
            g = -np.ones((SPREAD.size, DIM), np.float32)
            mem.push("once", SPREAD, g, lr=1.0, key=("dead-client", seq))  # the retry of the dead client
            _check_exact(mem, "once", base, seq)


@pytest.mark.slow
def test_scale_2_4_3_under_gathers_and_pushes(ray_local, tmp_path):
    # Small move batches: the pre-copy takes many round trips, so pushes land between a slot's copy and the freeze.
    with engram_mem.connect(shards=2, name="scale-load", data_dir=str(tmp_path), move_batch_bytes=1024) as mem:
        mem.create_table("s", rows=ROWS, dim=DIM, optimizer={"name": "sgd"}, init_std=0.0)
        base = mem.gather("s", SPREAD)
        acked, errors, gathered = [], [], []
        stop, stop_push = threading.Event(), threading.Event()
        worker = engram_mem.connect(name="scale-load")
        t_push = threading.Thread(target=_pusher, args=(worker, "s", 100_000, acked, errors),
                                  kwargs={"pause": 0.005, "stop": stop_push})
        t_read = threading.Thread(target=_reader, args=(worker, "s", stop, gathered, errors))
        t_push.start()
        t_read.start()
        scales = []
        for n in (4, 3):
            mem.scale(n)
            scales.append(mem.describe()["last_scale"])
        n_acked, deadline = len(acked), time.time() + 60
        while len(acked) < n_acked + 20 and not errors and time.time() < deadline:  # and pushes after the last scale
            time.sleep(0.01)
        stop_push.set()
        t_push.join()
        stop.set()
        t_read.join()
        worker.close()
        assert errors == [] and len(gathered) > 0
        assert len(mem.view.shard_ids) == 3
        _check_exact(mem, "s", base, len(acked))
        for s in scales:  # pre-copied: what the freeze copied again is the part that changed meanwhile
            assert s["precopy_rounds"] >= 1 and 0 <= s["recopied_bytes"] <= s["moved_bytes"]


def _adam_cluster(name, tmp_path, shards):
    return engram_mem.connect(shards=shards, name=name, data_dir=str(tmp_path / "data"), snapshot_interval_s=0)


def test_down_up_and_checkpoint_restore_across_shard_counts_are_bit_exact(ray_local, tmp_path):
    rng = np.random.default_rng(0)
    ids = np.unique(rng.integers(0, 20_000, 3000))
    grads = [rng.standard_normal((ids.size, DIM)).astype(np.float32) for _ in range(6)]
    # the reference: one in-process table, six Adam pushes, then one more
    from engram_mem.optim import make_optimizer
    from engram_mem.table import TableSpec
    import torch

    spec = TableSpec("a", rows=20_000, dim=DIM, seed=5)
    w = torch.from_numpy(spec.init_range(0, spec.rows))
    opt = make_optimizer({"name": "adam"})
    st = opt.init_state(spec.rows, DIM)
    for g in grads:
        opt.apply(w, st, torch.from_numpy(ids), torch.from_numpy(g), 0.01)
    want6 = w.numpy()[ids].copy()
    opt.apply(w, st, torch.from_numpy(ids), torch.from_numpy(grads[0]), 0.01)
    want7 = w.numpy()[ids].copy()

    ckpt = str(tmp_path / "ckpt")
    with _adam_cluster("bx-a", tmp_path, 3) as mem:
        mem.create_table("a", rows=20_000, dim=DIM, seed=5, optimizer={"name": "adam"})
        for g in grads[:3]:
            mem.push("a", ids, g, lr=0.01)
        mem.scale(2)
        for g in grads[3:]:
            mem.push("a", ids, g, lr=0.01)
        assert np.array_equal(mem.gather("a", ids), want6)
        mem.checkpoint(ckpt)
        mem.push("a", ids, grads[5], lr=0.01)  # after the checkpoint: undone by the restore below
    # down, then up again with another shard count: rows and Adam state exact (the next step too)
    with _adam_cluster("bx-b", tmp_path, 2) as mem:
        assert not np.array_equal(mem.gather("a", ids), want6)
        mem.restore(ckpt)
        assert np.array_equal(mem.gather("a", ids), want6)
        mem.scale(3)
        mem.push("a", ids, grads[0], lr=0.01)
        assert np.array_equal(mem.gather("a", ids), want7)
    with _adam_cluster("bx-c", tmp_path, 4) as mem:  # from the data directory, into 4 shards
        assert len(mem.view.shard_ids) == 4
        assert np.array_equal(mem.gather("a", ids), want7)


@pytest.fixture(scope="module")
def checkpointed(ray_local, tmp_path_factory):
    """A stopped cluster's data directory (a row written, pushes, a checkpoint) and the shard owning
    row 77,777: made once, copied for each kind of damage."""
    data = tmp_path_factory.mktemp("checkpointed") / "data"
    with engram_mem.connect(shards=2, name="dmg-template", data_dir=str(data), snapshot_interval_s=0) as mem:
        mem.create_table("d", rows=100_000, dim=DIM, optimizer={"name": "sgd"})
        mem.write("d", [77_777], np.full((1, DIM), 77777.0, np.float32))
        mem.push("d", SPREAD, -np.ones((SPREAD.size, DIM), np.float32), lr=1.0)
        owner = int(mem.view.tables["d"].placement[77_777 // mem.view.tables["d"].spec.slot_rows])
        mem.checkpoint()
    return data, owner


def _gen_file(data, shard):
    import glob

    return sorted(glob.glob(str(data / f"shard-{shard:04d}" / "gen-*" / "data.mdb")))[-1]


DAMAGE = {
    "data.mdb truncated to 0": (lambda d, s: open(_gen_file(d, s), "r+b").truncate(0), "data.mdb"),
    "data.mdb truncated to half": (lambda d, s: open(_gen_file(d, s), "r+b").truncate(os.path.getsize(_gen_file(d, s)) // 2), "data.mdb"),
    "data.mdb deleted": (lambda d, s: os.unlink(_gen_file(d, s)), "data.mdb"),
    "shard dir deleted": (lambda d, s: shutil.rmtree(d / f"shard-{s:04d}"), "shard-000"),
    "log directory deleted": (lambda d, s: shutil.rmtree(d / f"shard-{s:04d}" / "wal"), "wal"),
    "manifest truncated": (lambda d, s: open(d / f"shard-{s:04d}" / "MANIFEST.json", "r+b").truncate(20), "MANIFEST.json"),
    "cluster.json deleted": (lambda d, s: os.unlink(d / "cluster.json"), "cluster.json"),
    "cluster.json truncated": (lambda d, s: open(d / "cluster.json", "r+b").truncate(os.path.getsize(d / "cluster.json") // 2), "cluster.json"),
    "a bit flipped in a row": (lambda d, s: _flip_row_bit(_gen_file(d, s)), "data.mdb"),
}


def _flip_row_bit(path):
    raw = bytearray(open(path, "rb").read())
    at = raw.find(np.full(DIM, 77777.0, np.float32).tobytes())
    assert at >= 0
    raw[at + 2] ^= 0x10
    open(path, "wb").write(bytes(raw))


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_snapshot_or_cluster_file_refuses_to_start_naming_the_file(ray_local, checkpointed, tmp_path, kind):
    data, owner = tmp_path / "data", checkpointed[1]
    shutil.copytree(checkpointed[0], data)
    damage, names = DAMAGE[kind]
    damage(data, owner)
    with pytest.raises(CorruptData, match=names.replace(".", r"\.")):
        engram_mem.connect(shards=2, name="dmg2-" + kind.replace(" ", "-").replace(".", ""),
                           data_dir=str(data)).close()
    # starting anyway from initial values takes an explicit flag
    if "cluster.json" not in kind:
        with engram_mem.connect(shards=2, name="dmg3-" + kind.replace(" ", "-").replace(".", ""),
                                data_dir=str(data), reinit_missing=True) as mem:
            assert mem.gather("d", [77_777]).shape == (1, DIM)  # starts and serves (rows may have been lost)
            assert all(h["status"] == "SERVING" for h in mem.health())


def test_values_a_table_can_never_take_are_refused_and_rows_stay(ray_local):
    with engram_mem.connect(shards=2, name="values") as mem:
        mem.create_table("v", rows=1000, dim=4, optimizer={"name": "adam"})
        mem.create_table("h", rows=1000, dim=4, dtype="float16", optimizer={"name": "sgd"})
        before, before_h = mem.gather("v", np.arange(1000)), mem.gather("h", np.arange(1000))
        for bad in (np.nan, np.inf, -np.inf):
            with pytest.raises(NonFiniteUpdate, match="nothing from this write"):
                mem.write("v", [1, 999], np.array([[0, 0, 0, 0], [0, bad, 0, 0]], np.float32))
        with pytest.raises(NonFiniteUpdate, match="float16"):  # finite in fp32, not in the table's dtype
            mem.write("h", [3], np.full((1, 4), 1e6, np.float32))
        with pytest.raises(InvalidArgument, match="'lr' is 1e\\+30"):
            mem.push("v", [1], np.ones((1, 4), np.float32), lr=1e30)
        with pytest.raises(NonFiniteGradient, match="above the limit"):
            mem.push("v", [1, 2], np.array([[1e20] * 4, [1] * 4], np.float32))
        with pytest.raises(NonFiniteUpdate, match="non-finite"):
            mem.push("h", [5, 6], np.array([[1.0] * 4, [-1e5] * 4], np.float32), lr=1.0)
        assert np.array_equal(mem.gather("v", np.arange(1000)), before)
        assert np.array_equal(mem.gather("h", np.arange(1000)), before_h)
        for _ in range(3):  # the rows still train normally
            mem.push("v", [1], np.ones((1, 4), np.float32), lr=0.1)
        assert np.allclose(before[1] - mem.gather("v", [1])[0], 0.3, atol=1e-4)


def test_a_snapshot_never_recreates_a_shard_directory_that_vanished(ray_local, tmp_path):
    """The directory deleted under a running shard: a snapshot refuses (naming it) instead of writing a
    generation whose log is gone, so a restart reports the loss rather than restoring short."""
    with engram_mem.connect(shards=1, name="vanished", data_dir=str(tmp_path), snapshot_interval_s=0) as mem:
        mem.create_table("v", rows=1000, dim=DIM, optimizer={"name": "sgd"})
        mem.push("v", [1, 2], -np.ones((2, DIM), np.float32), lr=1.0)
        shutil.rmtree(tmp_path / "shard-0000")
        with pytest.raises(Exception, match="vanished while shard 0 ran"):
            mem.checkpoint()
        assert not (tmp_path / "shard-0000").exists()
        with pytest.raises(Exception, match="vanished"):   # the final snapshot of a shutdown refuses too
            ray_local.get(mem.controller.shutdown.remote(), timeout=120)
        ray_local.get(mem.controller.shutdown.remote(snapshot=False), timeout=120)   # stop it knowingly
        assert not (tmp_path / "shard-0000").exists()
