"""Replicas: how far they trail, what a killed member costs readers, how fast it is rebuilt (a benchmark).

    cd /work/main && .venv/bin/python bench/bench_replicas.py [--rows 1048576] [--dim 64] [--repeats 3]

Two Ray nodes on this machine (127.0.0.2 and 127.0.0.3, one process tree, the same 2 cores), a
memory cluster of 2 shards x 2 members (primary + replica, on different nodes), durability
`process` with a data directory in /var/tmp, one --rows x --dim fp32 table with SGD.

  1. replica lag under load: one writer pushes 8192 distinct random ids as fast as it can for
     --push-s seconds while the primaries' lag (age of the oldest change a replica has not
     applied, replication.py) is sampled every 0.1 s: p50 / p99 / max.
  2. failover: a read-only client (it spreads gathers over both members) gathers 8192 random ids
     in a loop while the writer pushes; kill -9 the replica of shard 1, later its primary,
     --repeats times each. Per kill: failed gathers, the longest gap between two completed
     gathers around the kill ("read stall") next to the median gather time, the time until the
     killed member serves again (rebuilt: a replica copies its primary; a primary restores its
     snapshot + log and its replica then re-copies), and the copy's GB/s.

Prints a table per part, appends one JSON line per part to bench/results/replicas.jsonl, draws
bench/results/replicas.png. The 2 cores are shared by everything: the load average is recorded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_jsonl, print_table, save_figure  # noqa: E402

BATCH = 8192


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def batches(rng, rows: int, n: int) -> list[np.ndarray]:
    return [np.sort(rng.choice(rows, BATCH, replace=False)) for _ in range(n)]


class Writer(threading.Thread):
    def __init__(self, mem, rows: int, dim: int):
        super().__init__(daemon=True)
        self.mem, self.stop, self.acked, self.errors = mem, threading.Event(), 0, []
        rng = np.random.default_rng(1)
        self.ids = batches(rng, rows, 8)
        self.g = (0.01 * rng.standard_normal((BATCH, dim))).astype(np.float32)

    def run(self):
        k = 0
        while not self.stop.is_set():
            try:
                self.mem.push("t", self.ids[k % len(self.ids)], self.g, lr=0.1)
                self.acked += 1
            except Exception as e:  # noqa: BLE001 - counted
                self.errors.append(repr(e))
            k += 1


class Reader(threading.Thread):
    def __init__(self, mem, rows: int):
        super().__init__(daemon=True)
        self.mem, self.stop, self.done, self.errors = mem, threading.Event(), [], []
        self.ids = batches(np.random.default_rng(2), rows, 8)

    def run(self):
        k = 0
        while not self.stop.is_set():
            t0 = time.perf_counter()
            try:
                self.mem.gather("t", self.ids[k % len(self.ids)])
                self.done.append((t0, time.perf_counter()))
            except Exception as e:  # noqa: BLE001 - counted
                self.errors.append((time.perf_counter(), repr(e)))
            k += 1


def sample_lag(handles, stop, out):
    import ray

    while not stop.is_set():
        infos = ray.get([h.info.remote() for h in handles])
        out.append(max((f["lag_s"] for i in infos for f in i["replication"].values()), default=0.0))
        time.sleep(0.1)


def wait_member_ready(mem, rank: int, member: int, old_pid: int, timeout: float = 300) -> dict:
    import ray

    from engram_mem.config import NAMESPACE

    name = mem.view.members(rank)[member]["actor"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            h = ray.get_actor(name, namespace=NAMESPACE)
            info = ray.get(h.info.remote(), timeout=10)
            if info["pid"] != old_pid and info["ready"]:
                reps = [ray.get(ray.get_actor(r["actor"], namespace=NAMESPACE).info.remote(), timeout=10)
                        for r in mem.view.members(rank)[1:]]
                if all(r["ready"] for r in reps):
                    return {"member": info, "replicas": reps}
        except Exception:  # noqa: BLE001 - restarting
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{name} not back within {timeout}s")


def kill_once(mem, reader, member: int) -> dict:
    view = mem.refresh(check_shards=True)
    pid = view.members(1)[member]["pid"]
    n0 = len(reader.done)
    time.sleep(1.0)
    t_kill = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    back = wait_member_ready(mem, 1, member, pid)
    t_back = time.perf_counter() - t_kill
    time.sleep(1.0)
    done = reader.done[n0:]
    ends = [b for _a, b in done]
    gaps = np.diff(ends) if len(ends) > 1 else np.array([0.0])
    around = [g for e, g in zip(ends[1:], gaps) if t_kill - 0.5 <= e <= t_kill + 5.0]
    rebuilt = back["replicas"][0]["restore"]  # the replica's newest full copy (it re-copies after either kill)
    return {"killed": "replica" if member == 1 else "primary",
            "failed_gathers": sum(1 for t, _e in reader.errors if t >= t_kill),
            "gather_p50_ms": round(1e3 * float(np.median([b - a for a, b in done])), 1),
            "read_stall_ms": round(1e3 * float(max(around, default=0.0)), 1),
            "back_s": round(t_back, 2),
            "copy_s": round(rebuilt.get("seconds", float("nan")), 2),
            "copy_GB_s": round(rebuilt.get("bytes", 0) / max(rebuilt.get("seconds", 1e-9), 1e-9) / 1e9, 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1 << 20)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--push-s", type=float, default=10.0)
    p.add_argument("--quick", action="store_true", help="a small smoke run; records nothing")
    args = p.parse_args()
    if args.quick:
        args.rows, args.repeats, args.push_s = 1 << 14, 1, 2.0

    import ray
    from ray.cluster_utils import Cluster

    import engram_mem

    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=4, node_ip_address="127.0.0.2", include_dashboard=False, object_store_memory=1 << 30))
    cluster.add_node(num_cpus=4, node_ip_address="127.0.0.3", object_store_memory=1 << 30)
    ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
    data = tempfile.mkdtemp(prefix="engram-bench-replicas-", dir="/var/tmp")
    parts = {}
    try:
        with engram_mem.connect(shards=2, name="bench-rep", replicas=2, cpus_per_shard=0.5, data_dir=data,
                                snapshot_interval_s=0) as mem:
            mem.create_table("t", rows=args.rows, dim=args.dim, optimizer={"name": "sgd"}, seed=1)
            table_mb = args.rows * args.dim * 4 / 1e6
            print(f"table {table_mb:.0f} MB over 2 shards x 2 members; nodes 127.0.0.2 and 127.0.0.3")

            # 1. lag under a push load
            before = loadavg()
            handles = list(ray.get(mem.controller.shard_actors.remote()).values())
            w = Writer(mem, args.rows, args.dim)
            stop, lags = threading.Event(), []
            sampler = threading.Thread(target=sample_lag, args=(handles, stop, lags), daemon=True)
            t0 = time.perf_counter()
            w.start()
            sampler.start()
            time.sleep(args.push_s)
            w.stop.set()
            w.join()
            el = time.perf_counter() - t0
            stop.set()
            sampler.join()
            lag = np.asarray(lags)
            rows1 = [{"pushes_s": round(w.acked / el, 1), "push_MB_s": round(w.acked * BATCH * args.dim * 4 / el / 1e6, 1),
                      "lag_p50_ms": round(1e3 * float(np.percentile(lag, 50)), 1),
                      "lag_p99_ms": round(1e3 * float(np.percentile(lag, 99)), 1),
                      "lag_max_ms": round(1e3 * float(lag.max()), 1), "samples": int(lag.size),
                      "push_errors": len(w.errors)}]
            after = loadavg()
            print_table(rows1, list(rows1[0]), title=f"\n1. replica lag while one writer pushes {BATCH} ids "
                                                     f"(load avg before {before}, after {after})")
            parts["lag"] = {"rows": rows1, "load_before": before, "load_after": after}

            # 2. failover
            before = loadavg()
            reader_client = engram_mem.connect(name="bench-rep", read_only=True)
            reader = Reader(reader_client, args.rows)
            w = Writer(mem, args.rows, args.dim)
            reader.start()
            w.start()
            kills = []
            try:
                for _ in range(args.repeats):
                    for member in (1, 0):
                        kills.append(kill_once(mem, reader, member))
                        print("  ", kills[-1])
            finally:
                reader.stop.set()
                w.stop.set()
                reader.join()
                w.join()
                reader_client.close()
            after = loadavg()
            rows2 = []
            for kind in ("replica", "primary"):
                sel = [k for k in kills if k["killed"] == kind]
                med = {c: float(np.median([k[c] for k in sel])) for c in
                       ("failed_gathers", "gather_p50_ms", "read_stall_ms", "back_s", "copy_s", "copy_GB_s")}
                rows2.append({"killed": kind, "kills": len(sel), "failed_gathers": int(sum(k["failed_gathers"] for k in sel)),
                              "gather_p50_ms": med["gather_p50_ms"], "read_stall_ms": med["read_stall_ms"],
                              "stall_min_max": f"{min(k['read_stall_ms'] for k in sel):.0f}-{max(k['read_stall_ms'] for k in sel):.0f}",
                              "back_s": round(med["back_s"], 2),
                              "back_min_max": f"{min(k['back_s'] for k in sel):.1f}-{max(k['back_s'] for k in sel):.1f}",
                              "replica_copy_GB_s": round(med["copy_GB_s"], 3)})
            rows2[0]["push_errors"] = rows2[1]["push_errors"] = len(w.errors)
            print_table(rows2, list(rows2[0]), title=f"\n2. kill -9 during gathers (read-only client) and pushes, "
                                                     f"median of {args.repeats} (load avg before {before}, after {after})")
            parts["failover"] = {"rows": rows2, "raw": kills, "load_before": before, "load_after": after}
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(data, ignore_errors=True)
    if not args.quick:
        for part, d in parts.items():
            append_jsonl("replicas", {"bench": "replicas", "part": part, "table": [args.rows, args.dim], **d})
    plot(parts, args)
    return 0


def plot(parts: dict, args) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    r = parts["failover"]["rows"]
    x = np.arange(len(r))
    axes[0].bar(x - 0.2, [k["gather_p50_ms"] for k in r], 0.4, label="gather p50 (ms)")
    axes[0].bar(x + 0.2, [k["read_stall_ms"] for k in r], 0.4, label="longest gap around the kill (ms)")
    axes[0].set_xticks(x, [f"kill -9 {k['killed']}" for k in r])
    axes[0].set_title("reads during a kill (read-only client)", fontsize=10)
    axes[0].legend(fontsize=8)
    axes[1].bar(x, [k["back_s"] for k in r], 0.5)
    axes[1].set_xticks(x, [f"{k['killed']} back (s)" for k in r])
    lag = parts["lag"]["rows"][0]
    axes[1].set_title(f"until the killed member serves again; replica lag p99 {lag['lag_p99_ms']} ms "
                      f"at {lag['pushes_s']} pushes/s", fontsize=9)
    fig.suptitle(f"replicas: 2 shards x 2 members, {args.rows:,} x {args.dim} fp32, 2 cores shared", fontsize=10)
    return save_figure(fig, "replicas", args.quick)


if __name__ == "__main__":
    sys.exit(main())
