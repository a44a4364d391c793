"""What durability costs and how fast a shard comes back, in one run (a benchmark, not a test).

    cd /work/main && .venv/bin/python bench/bench_durability.py [--repeats 3] [--push-s 4]
        [--train-steps 20] [--recovery-push-s 60] [--recovery-rows 4194304] [--parts 1,2,3,4]
        [--scale-push-ids N] [--quick]

One embedded Ray cluster (node 127.0.0.2); data directories in a temporary directory on local
disk (/var/tmp, not /dev/shm), removed at the end. Configurations are interleaved within each
repeat (the mode order rotates), so the machine's load drifts over all of them alike:

  1. push throughput with durability none / process / fsync: a 2-shard cluster per mode, one
     table of --rows x --dim fp32 with Adam, pushes of 8192 distinct random ids from 1 and from 4
     concurrent clients (one client per thread); pushes/s, MB/s of gradient, p50/p99 latency.
  2. training step time of the small model (engram_model/configs/small.json, as in
     bench_train_step.py) against each of the three clusters, --train-steps steps per run;
     % difference of process and fsync vs none.
  3. recovery of a 1 GiB shard (a 1-shard cluster, --recovery-rows x 64 fp32, SGD): checkpoint,
     push for --recovery-push-s seconds with snapshot_interval_s=0 (nothing truncates the log),
     then kill -9 the shard and time until a gather succeeds (and returns the same rows); the
     shard's own restore stats (slots restored, records replayed, seconds). Killed --repeats times
     (each restart replays the same snapshot + log).
  4. gather p50/p99 (8192 random ids, from a second client) while idle, during mem.checkpoint(),
     and during a scale 2->3 (durability process).
  5. migration of that scale (and of the 3->2 back): moved_bytes / seconds, the write pause, and
     what the pause copied again (recopied_bytes: slots changed during the pre-copy) and the
     pre-copy rounds. With --scale-push-ids N a third client pushes N random ids (Adam) back to back
     through both scales (every push touches about min(N, 4096) of the 4096 slots); those runs are
     recorded as parts gather_during_events_pushing / migration_pushing.

Snapshots never run on a timer here (snapshot_interval_s=0): their cost is part 4's, not noise in
parts 1-2. The machine's 2 cores are shared: each part records the load average before and after.
Prints one table per part, appends one JSON line per part to bench/results/durability.jsonl, draws
bench/results/durability.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, append_jsonl, print_table  # noqa: E402

MODES = ("none", "process", "fsync")
BATCH = 8192
SMOKE = {"on": False}


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def med_spread(vals) -> tuple[float, float, float]:
    v = np.asarray(vals, dtype=float)
    return float(np.median(v)), float(v.min()), float(v.max())


def random_batches(rng, rows: int, n: int) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        u = np.unique(rng.integers(0, rows, BATCH + BATCH // 8))
        out.append(np.sort(rng.permutation(u)[:BATCH]))
    return out


def finish(part: str, title: str, rows: list[dict], cols: list[str], before: list[float], extra: dict) -> dict:
    after = loadavg()
    print_table(rows, cols, title=f"\n{title}  (load avg before {before}, after {after})")
    if not SMOKE["on"]:  # a --quick run measures nothing worth keeping
        append_jsonl("durability", {"bench": "durability", "part": part, "load_before": before,
                                    "load_after": after, "results": rows, **extra})
    return {"rows": rows, "load_before": before, "load_after": after, **extra}


# ---- part 1: push throughput ---------------------------------------------------------------------
def push_load(clients, table: str, rows: int, dim: int, seconds: float, seed: int):
    """Each client pushes from its own thread for `seconds`: (pushes, wall seconds, latencies)."""
    lat: list[list[float]] = [[] for _ in clients]
    start = threading.Barrier(len(clients) + 1)
    errors = []

    def run(i, c):
        rng = np.random.default_rng(seed + i)
        batches = random_batches(rng, rows, 8)
        grads = [(0.01 * rng.standard_normal((BATCH, dim))).astype(np.float32) for _ in range(4)]
        try:
            for k in range(2):  # warm-up, untimed
                c.push(table, batches[k], grads[k], lr=1e-3)
        except Exception as e:  # noqa: BLE001 - reported, the part fails
            errors.append(repr(e))
            start.abort()
            return
        try:
            start.wait()
        except threading.BrokenBarrierError:
            return
        end = time.perf_counter() + seconds
        k = 0
        try:
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                c.push(table, batches[k % 8], grads[k % 4], lr=1e-3)
                lat[i].append(time.perf_counter() - t0)
                k += 1
        except Exception as e:  # noqa: BLE001 - reported, the part fails
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(i, c), daemon=True) for i, c in enumerate(clients)]
    [t.start() for t in threads]
    try:
        start.wait()
    except threading.BrokenBarrierError:
        [t.join() for t in threads]
        raise RuntimeError(f"push failed: {errors[0]}") from None
    t0 = time.perf_counter()
    [t.join() for t in threads]
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"push failed: {errors[0]}")
    flat = [x for li in lat for x in li]
    return len(flat), wall, flat


def part_push(args, clusters, workers) -> dict:
    before = loadavg()
    got: dict[tuple, list] = {}
    for r in range(args.repeats):
        order = MODES[r % 3:] + MODES[:r % 3]
        for threads in (1, 4):
            for mode in order:
                cl = [clusters[mode]] + workers[mode][:threads - 1]
                n, wall, lat = push_load(cl, "p", args.rows, args.dim, args.push_s, seed=100 * r + threads)
                got.setdefault((mode, threads), []).append((n / wall, np.percentile(lat, 50), np.percentile(lat, 99)))
                print(f"  repeat {r + 1}: {mode:<7} {threads} thread(s): {n / wall:7.1f} pushes/s, "
                      f"p50 {1e3 * np.percentile(lat, 50):.1f} ms", flush=True)
    mb = BATCH * args.dim * 4 / 1e6
    rows = []
    for threads in (1, 4):
        base = float(np.median([x[0] for x in got[("none", threads)]]))
        for mode in MODES:
            rates = [x[0] for x in got[(mode, threads)]]
            m, lo, hi = med_spread(rates)
            rows.append({"mode": mode, "threads": threads, "pushes_s": round(m, 1),
                         "min_max": f"{lo:.1f}-{hi:.1f}", "MB_s": round(m * mb, 1),
                         "vs_none_pct": round(100 * (m / base - 1), 1),
                         "p50_ms": round(1e3 * float(np.median([x[1] for x in got[(mode, threads)]])), 2),
                         "p99_ms": round(1e3 * float(np.median([x[2] for x in got[(mode, threads)]])), 2),
                         "per_repeat": [round(x, 1) for x in rates]})
    log_bytes = {m: sum(s.get("log_bytes", 0) for s in _infos(clusters[m]).values()) for m in MODES}
    return finish("push", f"1. push throughput: {BATCH} distinct ids x {args.dim} fp32 ({mb:.1f} MB), Adam, "
                  f"2 shards, {args.push_s:.0f} s per run, median of {args.repeats}",
                  rows, ["mode", "threads", "pushes_s", "min_max", "MB_s", "vs_none_pct", "p50_ms", "p99_ms"],
                  before, {"table": [args.rows, args.dim], "log_bytes_after": log_bytes})


def _infos(mem) -> dict:
    import ray

    from engram_mem.config import NAMESPACE

    view = mem.refresh()
    return {sid: ray.get(ray.get_actor(s["actor"], namespace=NAMESPACE).info.remote())
            for sid, s in view.shards.items()}


# ---- part 4 and 5: gathers during a snapshot and a scale, migration ---------------------------
def gathers_around(worker, table: str, batches, idle_s: float, event) -> dict:
    """Gather continuously from `worker`; idle for idle_s, then run event(); latencies of each window."""
    rec: list[tuple[float, float]] = []
    stop = threading.Event()
    errors = []

    def run():
        k = 0
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                worker.gather(table, batches[k % len(batches)])
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))
                return
            rec.append((t0, time.perf_counter() - t0))
            k += 1

    th = threading.Thread(target=run)
    th.start()
    t_idle = time.perf_counter()
    time.sleep(idle_s)
    t_a = time.perf_counter()
    out = {}
    ev = threading.Thread(target=lambda: out.setdefault("result", event()))
    ev.start()
    ev.join()
    t_b = time.perf_counter()
    stop.set()
    th.join()
    if errors:
        raise RuntimeError(f"gather failed: {errors[0]}")
    idle = [d for s, d in rec if t_idle + 0.2 <= s and s + d <= t_a]
    during = [d for s, d in rec if s < t_b and s + d > t_a]
    return {"idle": idle, "during": during, "event_s": t_b - t_a, "result": out.get("result")}


class Pusher:
    """A client pushing `n_ids` random distinct ids (small gradients) back to back on its own thread
    while it runs: the writes a scale's pre-copy has to catch up with. Counts pushes and errors."""

    def __init__(self, client, table: str, rows: int, dim: int, n_ids: int, seed: int):
        rng = np.random.default_rng(seed)
        self.batches = [np.sort(rng.choice(rows, n_ids, replace=False)) for _ in range(8)]
        self.grads = (1e-3 * rng.standard_normal((n_ids, dim))).astype(np.float32)
        self.client, self.table, self.pushes, self.errors = client, table, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        k = 0
        while not self._stop.is_set():
            try:
                self.client.push(self.table, self.batches[k % 8], self.grads, lr=1e-3)
                self.pushes += 1
            except Exception as e:  # noqa: BLE001 - reported, the part fails
                self.errors.append(repr(e))
                return
            k += 1

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        if self.errors:
            raise RuntimeError(f"push during scale failed: {self.errors[0]}")


def part_events(args, mem, worker, pusher=None) -> tuple[dict, dict]:
    import contextlib

    before = loadavg()
    rng = np.random.default_rng(7)
    batches = random_batches(rng, args.rows, 16)
    got: dict[str, list] = {}
    scales = []
    pushing = args.scale_push_ids > 0
    for r in range(args.repeats):
        snap = gathers_around(worker, "p", batches, args.idle_s, lambda: mem.checkpoint())
        got.setdefault("snapshot", []).append(snap)
        with (Pusher(pusher, "p", args.rows, args.dim, args.scale_push_ids, seed=r) if pushing
              else contextlib.nullcontext()) as pu:
            sc = gathers_around(worker, "p", batches, args.idle_s, lambda: mem.scale(3))
            s23 = mem.describe()["last_scale"]
            mem.scale(2)
            s32 = mem.describe()["last_scale"]
        got.setdefault("scale 2->3", []).append(sc)
        scales += [s23, s32]
        print(f"  repeat {r + 1}: checkpoint {snap['event_s']:.2f} s, gather p99 idle "
              f"{1e3 * np.percentile(snap['idle'], 99):.1f} / during {1e3 * np.percentile(snap['during'], 99):.1f} ms; "
              f"scale 2->3 {s23['seconds']:.2f} s (pause {s23['write_pause_s']:.2f} s, re-copied "
              f"{s23.get('recopied_bytes', float('nan')) / 1e6:.1f} MB), 3->2 pause {s32['write_pause_s']:.2f} s; "
              f"p99 during {1e3 * np.percentile(sc['during'], 99):.1f} ms"
              + (f"; {pu.pushes} pushes of {args.scale_push_ids} ids meanwhile" if pushing else ""), flush=True)
    rows = []
    for event, runs in got.items():
        for window in ("idle", "during"):
            p50 = [1e3 * np.percentile(x[window], 50) for x in runs]
            p99 = [1e3 * np.percentile(x[window], 99) for x in runs]
            m, lo, hi = med_spread(p99)
            rows.append({"event": event, "window": window if window == "idle" else f"during {event}",
                         "gathers": sum(len(x[window]) for x in runs), "p50_ms": round(float(np.median(p50)), 2),
                         "p99_ms": round(m, 2), "p99_min_max": f"{lo:.1f}-{hi:.1f}",
                         "max_ms": round(1e3 * max(max(x[window]) for x in runs), 1),
                         "event_s": round(float(np.median([x["event_s"] for x in runs])), 2)})
    snap_bytes = [x["result"]["bytes_written"] for x in got["snapshot"] if x["result"]]
    suffix = "_pushing" if pushing else ""
    under = f", a third client pushing {args.scale_push_ids} random ids back to back through the scales" if pushing else ""
    p4 = finish("gather_during_events" + suffix, f"4. gather of {BATCH} random ids (second client) idle vs during a "
                f"checkpoint and a scale 2->3 (durability process){under}, median of {args.repeats}",
                rows, ["event", "window", "gathers", "p50_ms", "p99_ms", "p99_min_max", "max_ms", "event_s"],
                before, {"snapshot_bytes": snap_bytes, "scale_push_ids": args.scale_push_ids})
    before = loadavg()
    srows = []
    for direction in ("2->3", "3->2"):
        sel = [s for s in scales if f"{s['from']}->{s['to']}" == direction]
        gbps = [s["moved_bytes"] / s["seconds"] / 1e9 for s in sel]
        m, lo, hi = med_spread(gbps)
        pm, plo, phi = med_spread([s["write_pause_s"] for s in sel])
        srows.append({"scale": direction, "moved_MB": round(float(np.median([s["moved_bytes"] for s in sel])) / 1e6, 1),
                      "seconds": round(float(np.median([s["seconds"] for s in sel])), 2),
                      "GB_s": round(m, 3), "GB_s_min_max": f"{lo:.3f}-{hi:.3f}",
                      "write_pause_s": round(pm, 3), "pause_min_max": f"{plo:.3f}-{phi:.3f}",
                      "recopied_MB": round(float(np.median([s.get("recopied_bytes", np.nan) for s in sel])) / 1e6, 1),
                      "precopy_rounds": float(np.median([s.get("precopy_rounds", np.nan) for s in sel])),
                      "GB_s_over_pause": round(float(np.median([s["moved_bytes"] / s["write_pause_s"] / 1e9
                                                                for s in sel])), 3)})
    p5 = finish("migration" + suffix, f"5. migration during scale (moved_bytes and recopied_MB count rows only, "
                f"not optimizer state){under}, median of {args.repeats}", srows,
                ["scale", "moved_MB", "seconds", "GB_s", "GB_s_min_max", "write_pause_s", "pause_min_max",
                 "recopied_MB", "precopy_rounds", "GB_s_over_pause"], p4["load_after"],
                {"raw": scales, "scale_push_ids": args.scale_push_ids})
    return p4, p5


# ---- part 2: training step time --------------------------------------------------------------------
def part_train(args, clusters) -> dict:
    import torch

    from engram_model.cluster_rows import ClusterRows
    from engram_model.config import load_config
    from engram_model.data import Corpus
    from engram_model.rows import table_specs
    from engram_model.train import DEFAULT_RUNS, load_or_train_tokenizer, train

    before = loadavg()
    m, t = load_config("small")
    t = dataclasses.replace(t, steps=args.train_steps, eval_every=0, checkpoint_every=0)
    tok = load_or_train_tokenizer(None, t.tokenizer_vocab, t.val_fraction)
    corpus = Corpus.build(tok, t.val_fraction, cache_dir=DEFAULT_RUNS / "cache")
    specs = table_specs(m.for_tokenizer(tok))
    quiet = dict(tokenizer=tok, corpus=corpus, progress=False, log=lambda *a: None)
    print(f"  small: {args.train_steps} steps x {t.tokens_per_step} tokens, torch threads {torch.get_num_threads()}",
          flush=True)
    for mode in MODES:  # an untimed first run per cluster: one-off start-up costs are nobody's
        rows = ClusterRows(clusters[mode], specs)
        train(m, dataclasses.replace(t, steps=3), rows=rows, **quiet)
        rows.flush()
        rows.close()
    steps: dict[str, list] = {}
    medians: dict[str, list] = {}
    losses: dict[str, list] = {}
    for r in range(args.repeats):
        order = MODES[r % 3:] + MODES[:r % 3]
        for mode in order:
            mem = clusters[mode]
            for spec in specs.values():  # every run starts from the initial rows
                if spec.name in mem.tables():
                    mem.drop_table(spec.name)
            rows = ClusterRows(mem, specs)
            res = train(m, t, rows=rows, **quiet)
            rows.flush()
            rows.close()
            s = np.diff([0.0] + res.history["elapsed"])[args.warmup:]
            steps.setdefault(mode, []).extend(s.tolist())
            medians.setdefault(mode, []).append(float(np.median(s)))
            losses[mode] = res.history["loss"]
            print(f"  repeat {r + 1}: {mode:<7} median step {1e3 * np.median(s):7.1f} ms", flush=True)
    base = float(np.median(steps["none"]))
    rows = []
    for mode in MODES:
        med = float(np.median(steps[mode]))
        _, lo, hi = med_spread(medians[mode])
        rows.append({"mode": mode, "median_step_ms": round(1e3 * med, 1),
                     "repeat_medians_ms": f"{1e3 * lo:.0f}-{1e3 * hi:.0f}",
                     "p90_step_ms": round(1e3 * float(np.percentile(steps[mode], 90)), 1),
                     "vs_none_pct": round(100 * (med / base - 1), 2),
                     "timed_steps": len(steps[mode]),
                     "max_loss_diff_vs_none": float(np.max(np.abs(np.array(losses[mode]) - np.array(losses["none"]))))})
    return finish("train_step", f"2. training step time, small model against a 2-shard cluster, "
                  f"{args.train_steps} steps per run ({args.warmup} warm-up), {args.repeats} repeats",
                  rows, ["mode", "median_step_ms", "repeat_medians_ms", "p90_step_ms", "vs_none_pct", "timed_steps",
                         "max_loss_diff_vs_none"], before, {"steps": args.train_steps, "warmup": args.warmup})


# ---- part 3: recovery ----------------------------------------------------------------------------------
def part_recovery(args, root: str) -> dict:
    import engram_mem

    before = loadavg()
    rows_n, dim = args.recovery_rows, 64
    mem = engram_mem.connect(shards=1, name="dur-recover", data_dir=os.path.join(root, "recover"),
                             durability="process", snapshot_interval_s=0, retry_timeout=1800)
    workers = [engram_mem.connect(name="dur-recover") for _ in range(3)]
    try:
        mem.create_table("r", rows=rows_n, dim=dim, optimizer={"name": "sgd"}, seed=3)
        [w.refresh() for w in workers]
        t0 = time.perf_counter()
        ck = mem.checkpoint()
        ck_s = time.perf_counter() - t0
        print(f"  table {rows_n * dim * 4 / 2**30:.2f} GiB; checkpoint {ck['bytes_written'] / 1e9:.2f} GB in "
              f"{ck_s:.1f} s; pushing for {args.recovery_push_s:.0f} s", flush=True)
        n, wall, lat = push_load([mem] + workers, "r", rows_n, dim, args.recovery_push_s, seed=5)
        mem.flush()
        info = list(_infos(mem).values())[0]
        log_bytes = info["log_bytes"]
        print(f"  {n} pushes in {wall:.1f} s ({n / wall:.1f}/s); log {log_bytes / 1e9:.2f} GB, lsn {info['lsn']}",
              flush=True)
        rng = np.random.default_rng(11)
        sample = np.unique(np.concatenate([random_batches(rng, rows_n, 1)[0], random_batches(np.random.default_rng(5), rows_n, 1)[0]]))
        want = mem.gather("r", sample)
        runs = []
        for k in range(args.repeats):
            info = list(_infos(mem).values())[0]
            pid = info["pid"]
            t0 = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            got = mem.gather("r", sample)  # retried by the client until the restarted shard serves
            back = time.perf_counter() - t0
            new = list(_infos(mem).values())[0]
            same = bool(np.array_equal(got, want))
            runs.append({"kill_to_gather_s": back, "restore": new["restore"], "new_pid": new["pid"] != pid,
                         "rows_equal": same})
            print(f"  kill {k + 1}: gather ok after {back:.1f} s; restore {new['restore']}; rows equal: {same}",
                  flush=True)
    finally:
        for w in workers:
            w.close()
        mem.close()
    m, lo, hi = med_spread([x["kill_to_gather_s"] for x in runs])
    rm, rlo, rhi = med_spread([x["restore"].get("seconds", float("nan")) for x in runs])
    rows = [{"table_GiB": round(rows_n * dim * 4 / 2**30, 2), "log_GB": round(log_bytes / 1e9, 2),
             "push_s": round(wall, 1), "pushes": n, "kill_to_gather_s": round(m, 2), "min_max": f"{lo:.1f}-{hi:.1f}",
             "restore_s": round(rm, 2), "restore_min_max": f"{rlo:.1f}-{rhi:.1f}",
             "records_replayed": runs[-1]["restore"].get("records_replayed"),
             "slots_restored": runs[-1]["restore"].get("slots_restored"),
             "replay_GB_s": round(log_bytes / 1e9 / rm, 3) if rm == rm and rm > 0 else None,
             "rows_equal": all(x["rows_equal"] for x in runs)}]
    return finish("recovery", f"3. recovery of a 1-shard cluster after kill -9: snapshot + {wall:.0f} s of log "
                  f"(durability process), {args.repeats} kills", rows,
                  ["table_GiB", "log_GB", "push_s", "pushes", "kill_to_gather_s", "min_max", "restore_s",
                   "restore_min_max", "records_replayed", "slots_restored", "replay_GB_s", "rows_equal"], before,
                  {"checkpoint_s": ck_s, "checkpoint_bytes": ck["bytes_written"], "push_rate": n / wall,
                   "push_p50_ms": 1e3 * float(np.percentile(lat, 50)), "runs": runs})


# ---- plot ---------------------------------------------------------------------------------------------
def with_recorded(parts: dict) -> dict:
    """parts, plus the newest recorded line of each part this run did not measure (for the plot)."""
    out = {}
    path = os.path.join(RESULTS, "durability.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("bench") == "durability":
                    out[rec["part"]] = {**rec, "rows": rec["results"]}
    return {**out, **parts}


def plot(parts: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    if "push" in parts:
        ax = axes[0, 0]
        for j, threads in enumerate((1, 4)):
            sel = [r for r in parts["push"]["rows"] if r["threads"] == threads]
            vals = [r["MB_s"] for r in sel]
            lo = [r["MB_s"] - float(r["min_max"].split("-")[0]) * r["MB_s"] / r["pushes_s"] for r in sel]
            hi = [float(r["min_max"].split("-")[1]) * r["MB_s"] / r["pushes_s"] - r["MB_s"] for r in sel]
            b = ax.bar(np.arange(3) + 0.4 * j, vals, 0.4, yerr=[lo, hi], capsize=3, label=f"{threads} client(s)")
            ax.bar_label(b, fmt="%.0f", fontsize=8)
        ax.set_xticks(np.arange(3) + 0.2, MODES)
        ax.set_ylabel("MB/s of gradient pushed")
        ax.set_title("1. push throughput (2 shards, 8k ids x 64, Adam)", fontsize=10)
        ax.legend(fontsize=8)
    if "train_step" in parts:
        ax = axes[0, 1]
        rows = parts["train_step"]["rows"]
        b = ax.bar(range(3), [r["median_step_ms"] for r in rows], color="#4477aa")
        ax.bar_label(b, labels=[f"{r['median_step_ms']:.0f} ({r['vs_none_pct']:+.1f}%)" for r in rows], fontsize=8)
        ax.set_xticks(range(3), [r["mode"] for r in rows])
        ax.set_ylabel("median step (ms)")
        ax.set_title("2. training step time, small model", fontsize=10)
    else:
        axes[0, 1].text(0.5, 0.5, "2. training step time: not measured in the recorded runs", ha="center",
                        fontsize=9)
        axes[0, 1].set_axis_off()
    if "gather_during_events" in parts:
        ax = axes[1, 0]
        rows = parts["gather_during_events"]["rows"]
        b = ax.bar(range(len(rows)), [r["p99_ms"] for r in rows],
                   color=["#999999" if r["window"] == "idle" else "#cc6677" for r in rows])
        ax.bar_label(b, fmt="%.1f", fontsize=8)
        ax.set_xticks(range(len(rows)), [f"{r['event']}\n{r['window'].replace('during ', 'during')}"[:28]
                                         for r in rows], fontsize=7)
        ax.set_ylabel("gather p99 (ms)")
        ax.set_title("4. gather p99, idle vs during checkpoint / scale 2->3", fontsize=10)
    ax = axes[1, 1]
    labels, vals = [], []
    if "recovery" in parts:
        r = parts["recovery"]["rows"][0]
        labels += ["kill -9 -> gather ok (s)", "shard restore (s)"]
        vals += [r["kill_to_gather_s"], r["restore_s"]]
    if "migration" in parts:
        for r in parts["migration"]["rows"]:
            labels += [f"scale {r['scale']} total (s)", f"scale {r['scale']} write pause (s)"]
            vals += [r["seconds"], r["write_pause_s"]]
    if labels:
        b = ax.barh(range(len(vals)), vals, color="#117733")
        ax.bar_label(b, fmt="%.2f", fontsize=8)
        ax.set_yticks(range(len(vals)), labels, fontsize=8)
        title = "3./5. recovery and scaling"
        if "recovery" in parts:
            r = parts["recovery"]["rows"][0]
            title += f" (recovery: {r['table_GiB']} GiB table + {r['log_GB']} GB log)"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("seconds")
    fig.suptitle("engram-mem durability (2 shared cores; load averages in durability.jsonl)", fontsize=11)
    fig.tight_layout()
    path = os.path.join(RESULTS, "durability-quick.png" if SMOKE["on"] else "durability.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rows", type=int, default=1 << 20)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--push-s", type=float, default=4.0)
    p.add_argument("--idle-s", type=float, default=3.0)
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--recovery-rows", type=int, default=4 << 20)
    p.add_argument("--recovery-push-s", type=float, default=60.0)
    p.add_argument("--parts", default="1,2,3,4", help="which parts to run (4 includes 5)")
    p.add_argument("--scale-push-ids", type=int, default=0,
                   help="parts 4/5: a third client pushes this many random ids back to back through the scales")
    p.add_argument("--plot-only", action="store_true", help="redraw the plot from durability.jsonl")
    p.add_argument("--quick", action="store_true", help="a smoke run: small tables, short runs, 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.rows, args.push_s, args.idle_s = 1, 1 << 16, 1.0, 1.0
        args.train_steps, args.warmup, args.recovery_rows, args.recovery_push_s = 6, 2, 1 << 18, 3.0
        SMOKE["on"] = True
    want = set(args.parts.split(","))
    if args.plot_only:
        print(f"plot {plot(with_recorded({}))}")
        return 0

    import ray

    import engram_mem
    from engram_mem.control.local import init_embedded_ray

    root = tempfile.mkdtemp(prefix="engram-durability-", dir="/var/tmp")
    print(f"data directories under {root}; load average {loadavg()}", flush=True)
    init_embedded_ray(shards=2, num_cpus=16, object_store_bytes=2 << 30)
    parts: dict[str, dict] = {}
    clusters, workers = {}, {}
    t_run = time.perf_counter()
    try:
        if want & {"1", "2", "4"}:
            for mode in MODES:
                clusters[mode] = engram_mem.connect(shards=2, name=f"dur-{mode}", durability=mode,
                                                    data_dir=os.path.join(root, mode), snapshot_interval_s=0)
                workers[mode] = [engram_mem.connect(name=f"dur-{mode}") for _ in range(3)]
                if want & {"1", "4"}:
                    clusters[mode].create_table("p", rows=args.rows, dim=args.dim, optimizer={"name": "adam"}, seed=1)
                    [w.refresh() for w in workers[mode]]
        if "1" in want:
            parts["push"] = part_push(args, clusters, workers)
        if "4" in want:
            p4, p5 = part_events(args, clusters["process"], workers["process"][0], workers["process"][1])
            suffix = "_pushing" if args.scale_push_ids else ""
            parts["gather_during_events" + suffix], parts["migration" + suffix] = p4, p5
        for mode in clusters:
            if "p" in clusters[mode].tables():
                clusters[mode].drop_table("p")
        if "2" in want:
            parts["train_step"] = part_train(args, clusters)
        for mode in list(clusters):
            for w in workers[mode]:
                w.close()
            clusters.pop(mode).close()
        if "3" in want:
            parts["recovery"] = part_recovery(args, root)
    finally:
        for mode, mem in clusters.items():
            for w in workers.get(mode, []):
                w.close()
            mem.close()
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nwhole run {time.perf_counter() - t_run:.0f} s; plot {plot(parts if SMOKE['on'] else with_recorded(parts))}; "
          f"appended {os.path.join(RESULTS, 'durability.jsonl')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
