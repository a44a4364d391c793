"""What `replica_ack=all` costs a push, and what it buys when a primary's disk is lost (a benchmark).

    cd /work/main && .venv/bin/python bench/bench_replica_ack.py [--repeats 3] [--pushes 200]

Two Ray nodes on this machine (127.0.0.2 and 127.0.0.3; one process tree, the same 2 cores), one
shard, durability `process` with a data directory in /var/tmp, SGD tables. Configurations, run in
turn (interleaved) --repeats times each, a fresh memory cluster every time:
  - 1 member         (no replica)
  - 2, ack none      (a replica follows asynchronously; the default)
  - 2, ack all       (a push is acknowledged once the replica applied it too)

  1. push latency: --pushes sequential pushes of 256 ids and of 8192 ids (x 64 fp32), p50 / p99 ms
     over all repeats, and the spread of the per-repeat p50s.
  2. lost disk: a writer pushes the known-effect workload (SGD lr 1, gradient -1 on 64 rows: each
     acknowledged push adds exactly 1.0) with no pause; after 100 acknowledged pushes the primary's
     shard directory is deleted and the primary killed -9; the writer goes on to 300. Then
     lost = acknowledged - applied (max over rows) and applied twice; the replicated
     configurations only (one member with its disk gone has nothing to restore from: it refuses
     to start, which the suite tests).

Prints a table per part, appends one JSON line per part to bench/results/replica_ack.jsonl, draws
bench/results/replica_ack.png. The load average is recorded.
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

CONFIGS = [("1 member", 1, "none"), ("2, ack none", 2, "none"), ("2, ack all", 2, "all")]
ROWS, DIM = 1 << 16, 64
SPREAD = np.arange(0, ROWS, ROWS // 64)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cluster_for(name: str, replicas: int, ack: str, data: str):
    import engram_mem

    mem = engram_mem.connect(shards=1, name=name, replicas=replicas, replica_ack=ack, cpus_per_shard=0.5,
                             data_dir=data, snapshot_interval_s=0)
    mem.create_table("t", rows=ROWS, dim=DIM, optimizer={"name": "sgd"}, init_std=0.0)
    return mem


def wait_in_sync(name: str, replicas: int, timeout: float = 120) -> None:
    """Every replica copied and following (so it counts for acks from the first push)."""
    import ray

    from engram_mem.config import member_name
    from engram_mem.config import NAMESPACE

    if replicas == 1:
        return
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = ray.get(ray.get_actor(member_name(name, 0, 0), namespace=NAMESPACE).info.remote(), timeout=30)
        f = info["replication"]
        if len(f) == replicas - 1 and all(v["in_sync"] for v in f.values()):
            return
        time.sleep(0.1)
    raise TimeoutError("replicas did not join")


def push_latency(mem, n: int, batch: int) -> list[float]:
    rng = np.random.default_rng(batch)
    ids = [np.sort(rng.choice(ROWS, batch, replace=False)) for _ in range(8)]
    g = (0.01 * rng.standard_normal((batch, DIM))).astype(np.float32)
    for k in range(5):
        mem.push("t", ids[k % 8], g, lr=0.1)
    out = []
    for k in range(n):
        t0 = time.perf_counter()
        mem.push("t", ids[k % 8], g, lr=0.1)
        out.append(time.perf_counter() - t0)
    return out


def lost_disk(mem, data: str, total: int = 300, kill_at: int = 100) -> dict:
    from engram_mem.storage.snapshot import shard_dir

    before = mem.gather("t", SPREAD)
    g = -np.ones((SPREAD.size, DIM), np.float32)
    acked, errors = [0], []

    def writer():
        for _ in range(total):
            try:
                mem.push("t", SPREAD, g, lr=1.0)
                acked[0] += 1
            except Exception as e:  # noqa: BLE001 - counted
                errors.append(repr(e))

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    while acked[0] < kill_at and t.is_alive():
        time.sleep(0.002)
    pid = mem.refresh(check_shards=True).members(0)[0]["pid"]
    shutil.rmtree(shard_dir(data, 0))
    os.kill(pid, signal.SIGKILL)
    t0 = time.perf_counter()
    t.join()
    rows = mem.gather("t", SPREAD) - before
    view = mem.refresh(check_shards=True)
    info = view.shards[view.shard_ids[0]]
    return {"acked": acked[0], "errors": len(errors), "lost": int(max(0.0, acked[0] - rows.min())),
            "twice": int(max(0.0, rows.max() - acked[0])), "source": info["restore"].get("source", "disk"),
            "restore_s": round(info["restore"].get("seconds", float("nan")), 2),
            "writer_after_kill_s": round(time.perf_counter() - t0, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pushes", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="a small smoke run; records nothing")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.pushes = 1, 20

    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=4, node_ip_address="127.0.0.2", include_dashboard=False, object_store_memory=512 << 20))
    cluster.add_node(num_cpus=4, node_ip_address="127.0.0.3", object_store_memory=512 << 20)
    ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
    lat = {(c[0], b): [] for c in CONFIGS for b in (256, 8192)}
    kills = {c[0]: [] for c in CONFIGS if c[1] > 1}
    before = loadavg()
    try:
        for rep in range(args.repeats):
            for label, replicas, ack in CONFIGS:
                data = tempfile.mkdtemp(prefix="engram-bench-ack-", dir="/var/tmp")
                try:
                    name = f"ack-{rep}-{replicas}-{ack}"
                    with cluster_for(name, replicas, ack, data) as mem:
                        wait_in_sync(name, replicas)
                        for b in (256, 8192):
                            lat[(label, b)].append(push_latency(mem, args.pushes, b))
                        if replicas > 1:
                            kills[label].append(lost_disk(mem, data))
                            print(f"  {label}: {kills[label][-1]}", flush=True)
                finally:
                    shutil.rmtree(data, ignore_errors=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    after = loadavg()
    rows1 = []
    for label, _r, _a in CONFIGS:
        row = {"config": label}
        for b in (256, 8192):
            runs = [np.asarray(x) * 1e3 for x in lat[(label, b)]]
            p50s = [float(np.percentile(x, 50)) for x in runs]
            row[f"{b} ids p50 ms"] = round(float(np.percentile(np.concatenate(runs), 50)), 2)
            row[f"{b} ids p50 per run"] = f"{min(p50s):.2f}-{max(p50s):.2f}"
            row[f"{b} ids p99 ms"] = round(float(np.percentile(np.concatenate(runs), 99)), 2)
        rows1.append(row)
    print_table(rows1, list(rows1[0]), title=f"\n1. push latency, {args.repeats} x {args.pushes} sequential pushes "
                                             f"each (load avg before {before}, after {after})")
    rows2 = [{"config": label, "kills": len(k), "acked": sum(x["acked"] for x in k), "lost": sum(x["lost"] for x in k),
              "applied twice": sum(x["twice"] for x in k), "push errors": sum(x["errors"] for x in k),
              "restored from": ", ".join(sorted({x["source"] for x in k})),
              "restore s (median)": float(np.median([x["restore_s"] for x in k]))}
             for label, k in kills.items()]
    print_table(rows2, list(rows2[0]), title="\n2. shard directory deleted + primary kill -9 at push 100 of 300 "
                                             "(SGD lr 1, grad -1; lost/twice summed over the kills)")
    if not args.quick:
        append_jsonl("replica_ack", {"bench": "replica_ack", "part": "latency", "rows": rows1,
                                     "load_before": before, "load_after": after})
        append_jsonl("replica_ack", {"bench": "replica_ack", "part": "lost_disk", "rows": rows2,
                                     "raw": kills, "load_before": before, "load_after": after})
    plot(rows1, rows2, args)
    return 0


def plot(rows1, rows2, args) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(rows1))
    for i, b in enumerate((256, 8192)):
        axes[0].bar(x + (i - 0.5) * 0.4, [r[f"{b} ids p50 ms"] for r in rows1], 0.4, label=f"{b} ids, p50")
    axes[0].set_xticks(x, [r["config"] for r in rows1])
    axes[0].set_ylabel("push latency (ms)")
    axes[0].legend(fontsize=8)
    axes[0].set_title("push latency, one shard", fontsize=10)
    x2 = np.arange(len(rows2))
    axes[1].bar(x2, [r["lost"] for r in rows2], 0.5, color="tab:red")
    axes[1].set_xticks(x2, [r["config"] for r in rows2])
    axes[1].set_ylabel("acknowledged pushes lost")
    axes[1].set_title(f"primary's disk deleted + kill -9, {rows2[0]['kills']} kills each", fontsize=10)
    fig.suptitle("replica_ack: what waiting for the replica costs and buys (2 local Ray nodes, 2 cores shared)",
                 fontsize=10)
    return save_figure(fig, "replica_ack", args.quick)


if __name__ == "__main__":
    sys.exit(main())
