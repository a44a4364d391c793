"""`engram-mem plan --calibrate`: measure this machine's tiers and compute, fit the planner's parameters.

    engram-mem plan --calibrate --out bench/results/tiers-here.json [--quick] [--disk-dir /var/tmp]
    engram-mem plan --tiers-file bench/results/tiers-here.json --tier here-grpc --device here-cpu ...

Runs the project's own read paths on this machine, at three batch sizes each, and fits
time = latency + bytes / bandwidth to each (least squares; the batch sizes are 256..16k distinct
rows of 256 B, the row size of the serving benchmarks):
  - here-in-process: LocalRows' read (torch.unique, index, expand) of an in-process table
  - here-same-node:  RowFetcher over the same-node tier (the shard's shared memory, read in place)
  - here-grpc:       RowFetcher to a shard on a second local Ray node (127.0.0.3), gRPC on loopback
  - here-tcp:        the same over the framed-TCP data plane (transport/), the default path; a
                     remote preset's per-client rate is capped at it in plans (tiers.driven_by)
  - here-cache:      RowCache.lookup, all hits
  - here-disk:       ShardStore.gather of a disk-backed table (storage.py; a 256 MB file under
                     --disk-dir, default /var/tmp, deleted at the end), COLD: the file is dropped from
                     the mapping and the page cache before every call, as bench/bench_disk.py does
                     (here outside the timed call). A page-granular device reads a whole 4 KiB page
                     per row, and the planner charges rows x max(row bytes, min_read_bytes) (tiers.py):
                     so each batch puts its rows on distinct pages, no two adjacent (adjacent pages
                     would be read as one request), and the fit is over page bytes, 4096 per row: its
                     bandwidth is of pages, not rows. CPU: this process's time (the gather's page
                     faults and madvise calls are its own). It is the disk's part of a read; a worker
                     reading through gRPC or the same-node tier pays that tier's costs besides.
and the read path's CPU per fetch and per row (this process's CPU time over the timed calls; the
shard's own CPU, in another process, counts too) from "interference" runs: a model step alone
and beside a fetch, in turns, with torch on one thread; a large fetch that
outlasts the step gives the fetch's slowdown beside compute (`stretch`). Compute: the benchmark
models' forwards (engram_model/configs/serving.json at prefill and decode shapes; the `small` model's
bf16 training step), the fastest of the repeats (on a shared machine the median swings with other
jobs), fit a fixed cost per block and an effective FLOP/s. Everything runs torch on ONE thread:
with other jobs on the 2 cores, two OpenMP threads made the same forward 2-6x slower and erratic
(measured while building this), and the 1-thread fit reproduces the benchmarks' own in-process
times (which ran with 2 threads at quieter moments) better than the 2-thread one.
The tier measurements run 3 times (a Ray cluster each, shut down in `finally`) and each fitted
field is the median of the runs: on this shared machine one run's fit moves by up to +-100%.
Writes the tiers and devices (with the load average before and after) to --out as JSON. Takes
about 3-7 minutes here, depending on the load (--quick: one run, fewer repeats, ~1-2 minutes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time

import numpy as np

from engram_mem.plan.compute_probe import measure_compute
from engram_mem.plan.tiers import GiB, Tier, save_tiers
from engram_mem.plan.timing import time_calls


ROWS, DIM = 1_000_000, 64                       # 256 MiB fp32 table, 256 B rows
SIZES = (256, 2048, 16384)


def fit_latency_bandwidth(nbytes: list[float], seconds: list[float]) -> tuple[float, float]:
    """Least-squares t = a + bytes / bw over the points; a >= 0. Returns (a seconds, bw GB/s)."""
    x, y = np.asarray(nbytes, float), np.asarray(seconds, float)
    slope, a = np.polyfit(x, y, 1, w=1 / y)   # relative error: small batches count as much as large ones
    if a < 0:   # through the origin
        a, slope = 0.0, float(np.sum(x * y) / np.sum(x * x))
    slope = max(slope, 1e-15)
    return float(a), float(1 / slope / 1e9)


def _measure(name: str, fn, rng, reps: int) -> dict:
    pts = []
    for n in SIZES:
        batches = [np.sort(rng.choice(ROWS, n, replace=False)) for _ in range(reps + 2)]
        wall, cpu = time_calls(fn, batches)
        pts.append({"rows": n, "bytes": n * DIM * 4, "wall_s": wall, "cpu_s": cpu})
        print(f"  {name:<16} {n:>6} rows: {wall * 1e3:8.3f} ms  ({n * DIM * 4 / wall / 1e9:.3f} GB/s, "
              f"cpu {cpu * 1e3:.3f} ms)", flush=True)
    return {"name": name, "points": pts}


def _tier_from(m: dict, kind: str, source: str, cpu: bool = True, interference: dict | None = None,
               suffix: str = "") -> Tier:
    """Latency/bandwidth from the timed reads; the read path's CPU cost from the interference runs
    (how much longer the model's compute took with the fetch running beside it), else from this
    process's CPU time."""
    pts = m["points"]
    lat, bw = fit_latency_bandwidth([p["bytes"] for p in pts], [p["wall_s"] for p in pts])
    c_fetch, c_row, stretch = 0.0, 0.0, 1.0
    if interference:
        ip = interference["points"]
        (n0, e0), (n1, e1) = (ip[0]["rows"], ip[0]["extra_s"]), (ip[-1]["rows"], ip[-1]["extra_s"])
        c_row = max(0.0, (e1 - e0) / (n1 - n0))
        c_fetch = max(0.0, e0 - c_row * n0)
        # Stretch: the large fetch outlasts the step; while they overlapped, it did (alone - exposed)
        # of its alone-time work: stretch = overlap / (alone - exposed).
        big = ip[-1]
        alone_fetch = next(p["wall_s"] for p in pts if p["rows"] == big["rows"]) if any(
            p["rows"] == big["rows"] for p in pts) else None
        if alone_fetch and alone_fetch - big["exposed_s"] > 1e-4 and big["exposed_s"] > 0:
            stretch = max(1.0, big["overlap_s"] / (alone_fetch - big["exposed_s"]))
    elif cpu:
        c_lat, c_bw = fit_latency_bandwidth([p["rows"] for p in pts], [p["cpu_s"] for p in pts])
        c_fetch, c_row = c_lat, 1 / (c_bw * 1e9)
    return Tier(name=m["name"] + suffix, kind=kind, latency_s=lat, link_gbps=bw, aggregate_gbps=bw,
                capacity_bytes=24 * GiB, cpu_s_per_row=c_row, cpu_s_per_fetch=c_fetch, stretch=min(stretch, 20.0),
                measured=True, source=source)


def _drop(store, name: str) -> None:
    """Cold start, as bench/bench_disk.py's drop(): the whole file leaves the mapping and the page cache."""
    budget = store.budgets[name]
    budget.counts[:] = 0
    budget.trim(store.tables[name].buffer)


def _isolated_page_ids(ts, n: int, rng) -> np.ndarray:
    """n row ids of table shard `ts`, each alone on its 4 KiB page of the file and no two pages
    adjacent (pages 2 apart or more: the kernel reads a run of adjacent pages as one request, while
    the planner charges every row a page of its own, as in a table far larger than a batch)."""
    from engram_mem.storage.disk import PAGE

    spec, buf = ts.spec, ts.buffer
    row_bytes = buf.dim * buf.dtype.itemsize
    if PAGE % row_bytes:
        raise ValueError(f"disk calibration needs rows that divide a {PAGE} B page, got {row_bytes} B")
    per_page = PAGE // row_bytes
    even = np.arange(0, buf.frames * buf.frame_bytes // PAGE, 2)
    if n > even.size:
        raise ValueError(f"disk calibration: {n} isolated pages need a table of at least {2 * n * PAGE >> 20} MiB")
    slot_of_frame = np.full(buf.frames, -1, np.int64)
    owned = np.nonzero(ts.frame_of >= 0)[0]
    slot_of_frame[ts.frame_of[owned]] = owned
    pages = rng.permutation(even)
    local = pages * per_page + rng.integers(0, per_page, pages.size)       # buffer rows, one per page
    slot, off = slot_of_frame[local // spec.slot_rows], local % spec.slot_rows
    ok = (slot >= 0) & (slot * spec.slot_rows + off < spec.rows)            # a row the table holds
    ids = (slot * spec.slot_rows + off)[ok][:n]
    assert ids.size == n, f"only {ids.size} of {n} isolated rows found"
    return np.sort(ids)


def measure_disk(directory: str, reps: int, rows: int = ROWS, sizes=SIZES, seed: int = 0) -> tuple[Tier, dict]:
    """The here-disk tier: cold gathers of a disk-backed ShardStore table of `rows` x 256 B in a
    temporary directory under `directory` (removed in `finally`), one isolated page per row; fit
    time = latency + pages x 4096 / bandwidth. Returns (tier, raw points)."""
    from engram_mem.storage.store import ShardStore
    from engram_mem.storage.disk import PAGE, resident_bytes
    from engram_mem.table import TableSpec

    rng = np.random.default_rng(seed)
    work = tempfile.mkdtemp(prefix="engram-calib-disk-", dir=directory)
    store = None
    try:
        store = ShardStore(0, storage=f"disk:{work}")
        spec = TableSpec("calib", rows, DIM, seed=1)
        store.add_table(spec, range(spec.n_slots))   # written to the file, then dropped from memory
        ts = store.tables["calib"]
        pts = []
        for n in sizes:
            batches = [_isolated_page_ids(ts, n, rng) for _ in range(reps + 2)]
            wall, cpu = time_calls(lambda ids: store.gather("calib", ids), batches,
                              before=lambda _: _drop(store, "calib"))
            pts.append({"rows": n, "pages": n, "bytes": n * PAGE, "wall_s": wall, "cpu_s": cpu})
            print(f"  {'here-disk':<16} {n:>6} rows: {wall * 1e3:8.3f} ms  ({n * PAGE / wall / 1e9:.3f} GB/s of "
                  f"4 KiB pages, cpu {cpu * 1e3:.3f} ms)", flush=True)
        # A check that calls were cold: the last gather's pages are in the page cache, and a drop empties it.
        read_bytes = resident_bytes(ts.buffer.path)
        _drop(store, "calib")
        cold_bytes = resident_bytes(ts.buffer.path)
        free = shutil.disk_usage(work).free
    finally:
        if store is not None:
            store.close()
        shutil.rmtree(work, ignore_errors=True)
    m = {"name": "here-disk", "points": pts, "dir": directory, "table_bytes": spec.nbytes,
         "resident_bytes_after_gather": read_bytes, "resident_bytes_after_drop": cold_bytes}
    t = _tier_from(m, "disk", f"measured here: ShardStore.gather of a {spec.nbytes / 1e6:.0f} MB disk-backed table "
                   f"under {directory}, cold (file dropped from the page cache before every call), "
                   f"one 4 KiB page per row")
    return dataclasses.replace(t, min_read_bytes=PAGE, capacity_bytes=float(free)), m


def _interference(fetch_async, step, rng, iters: int, threads: int) -> dict:
    """The model's step alone, and with a fetch of n rows started before it and awaited after, in
    turns (so drifting machine load hits both alike): extra = (with - alone) - the wait after the
    step = what the read path took from the compute; overlap = the time the two ran together."""
    import torch

    torch.set_num_threads(threads)
    sizes = (256, 16384)   # the large fetch outlasts the step, so its stretch shows
    alone, tot, exposed = [], {n: [] for n in sizes}, {n: [] for n in sizes}
    for i in range(iters + 2):
        t0 = time.perf_counter()
        step()
        alone.append(time.perf_counter() - t0)
        for n in sizes:
            ids = np.sort(rng.choice(ROWS, n, replace=False))
            t0 = time.perf_counter()
            fut = fetch_async(ids)
            step()
            t1 = time.perf_counter()
            fut.result()
            t2 = time.perf_counter()
            tot[n].append(t2 - t0)
            exposed[n].append(t2 - t1)
    a = float(np.median(alone[2:]))
    pts = []
    for n in sizes:
        e, t = float(np.median(exposed[n][2:])), float(np.median(tot[n][2:]))
        # Paired per turn (the step beside the fetch minus the step alone just before it), so load
        # drifting between turns cancels; the median of the pairs.
        paired = np.array(tot[n][2:]) - np.array(exposed[n][2:]) - np.array(alone[2:])
        pts.append({"rows": n, "extra_s": float(np.median(paired)), "alone_s": a, "exposed_s": e, "overlap_s": t - e})
        print(f"    interference, {threads} thread(s), {n:>5} rows: compute {a * 1e3:.2f} ms alone, "
              f"{(t - e) * 1e3:.2f} ms beside the fetch (then waited {e * 1e3:.2f} ms)", flush=True)
    return {"points": pts}


def measure_tiers(reps: int, disk_dir: str = "/var/tmp") -> tuple[list[Tier], dict]:
    import ray
    import torch
    from ray.cluster_utils import Cluster

    import engram_mem
    from engram_mem.worker.cache import RowCache
    from engram_mem.worker.fetcher import RowFetcher
    from engram_mem.table import TableSpec

    from engram_model.config import ModelConfig
    from engram_model.model import EngramModel

    from engram_model.config import CONFIG_DIR

    with open(CONFIG_DIR / "serving.json") as f:
        mcfg = ModelConfig.from_dict({**json.load(f)["model"], "engram": None})
    torch.manual_seed(0)
    model = EngramModel(mcfg, rows=None).eval()
    xs = torch.randint(0, mcfg.vocab_size, (8, 16))

    def step():
        with torch.inference_mode():
            model(xs)

    default_threads = torch.get_num_threads()
    rng = np.random.default_rng(0)
    spec = TableSpec("calib", ROWS, DIM, seed=1)
    table = torch.from_numpy(spec.init_range(0, ROWS))

    def in_process(ids):   # what LocalRows.get does with a batch
        t = torch.from_numpy(ids)
        uniq, inv = torch.unique(t, return_inverse=True)
        return table[uniq].float()[inv]

    # One torch thread: unique/index of <= 16k ids gains nothing from a second, and under load
    # OpenMP's barrier makes two threads erratic (the decode benchmark runs torch on one thread too).
    torch.set_num_threads(1)
    raw = [_measure("here-in-process", in_process, rng, reps)]
    torch.set_num_threads(default_threads)
    inter: dict = {}
    push_inter: dict = {}
    push_wall: dict = {}
    cache = RowCache(SIZES[-1] * DIM * 4 * 3, DIM, np.float32)
    hot = np.sort(rng.choice(ROWS, SIZES[-1], replace=False))
    cache.record(hot)
    cache.admit(hot, table.numpy()[hot])
    raw.append(_measure("here-cache", lambda ids: cache.lookup(hot[:ids.size]), rng, reps))
    disk_tier, disk_raw = measure_disk(disk_dir, reps)
    raw.append(disk_raw)

    from engram_mem.control.local import level_worker_niceness

    level_worker_niceness()
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=4, node_ip_address="127.0.0.2", include_dashboard=False, resources={"node_a": 100},
        object_store_memory=512 << 20))
    try:
        cluster.add_node(num_cpus=4, node_ip_address="127.0.0.3", resources={"node_b": 100},
                         object_store_memory=512 << 20)
        ray.init(address=cluster.address, log_to_driver=False)
        for node, name, plane in (("a", "here-same-node", "tcp"), ("b", "here-grpc", "grpc"), ("b", "here-tcp", "tcp")):
            mem = engram_mem.connect(shards=1, name=f"calib-{name}-{os.getpid()}", shard_resources={f"node_{node}": 1},
                                     data_plane=plane)
            try:
                mem.create_table_spec(spec)
                f = RowFetcher(mem, node_local=True)
                raw.append(_measure(name, lambda ids: f.fetch("calib", ids), rng, reps))
                for threads in (1,):
                    inter[(name, threads)] = _interference(lambda ids: f.fetch_async("calib", ids), step, rng,
                                                           5 * reps, threads)
                # Gradient pushes (over the tier's transport, then the shard's Adam), as the training benchmark's model
                # sends them: bf16 rows of 24, fp32 gradients.
                pspec = TableSpec("calibp", ROWS, 24, dtype="bfloat16", seed=2)
                mem.create_table_spec(pspec, optimizer="adam")
                grads = {n: np.ones((n, 24), np.float32) * 1e-3 for n in (256, 2048, 16384)}
                pw = []
                for n in (256, 2048, 16384):   # a push's wall time alone: round trip + bytes + the shard's Adam
                    batches = [np.sort(rng.choice(ROWS, n, replace=False)) for _ in range(reps + 2)]
                    wall, _ = time_calls(lambda ids: f.push_async("calibp", ids, grads[ids.size], lr=1e-3, step=1).result(),
                                    batches)
                    pw.append((n, wall))
                    print(f"  {name + ' push':<16} {n:>6} rows: {wall * 1e3:8.3f} ms", flush=True)
                push_wall[name] = pw
                push_inter[name] = _interference(
                    lambda ids: f.push_async("calibp", ids, grads[ids.size], lr=1e-3, step=1), step, rng,
                    3 * reps, 1)
                torch.set_num_threads(default_threads)
                f.close()
            finally:
                mem.close()
    finally:
        ray.shutdown()
        cluster.shutdown()
    by = {m["name"]: m for m in raw}
    tiers = [_tier_from(by["here-in-process"], "host_dram", "measured here: LocalRows-style unique+index of an in-process table"),
             _tier_from(by["here-cache"], "cache", "measured here: RowCache.lookup, all hits", cpu=False),
    ]
    for threads, suffix in ((1, ""),):
        tiers += [_tier_from(by["here-same-node"], "same_node", "measured here: RowFetcher, same-node shared-memory "
                             f"tier; CPU taken from a model step at {threads} torch thread(s)",
                             interference=inter[("here-same-node", threads)], suffix=suffix),
                  _tier_from(by["here-grpc"], "remote", "measured here: RowFetcher, gRPC to a shard on another local "
                             f"Ray node; CPU taken from a model step at {threads} torch thread(s)",
                             interference=inter[("here-grpc", threads)], suffix=suffix),
                  _tier_from(by["here-tcp"], "remote", "measured here: RowFetcher, the framed-TCP data plane to a "
                             f"shard on another local Ray node; CPU taken from a model step at {threads} torch "
                             f"thread(s)", interference=inter[("here-tcp", threads)], suffix=suffix)]
    for i, t in enumerate(tiers):
        if t.name in push_inter:
            ip = push_inter[t.name]["points"]
            per_row = max(0.0, (ip[-1]["extra_s"] - ip[0]["extra_s"]) / (ip[-1]["rows"] - ip[0]["rows"]))
            tiers[i] = dataclasses.replace(t, push_cpu_s_per_row=per_row,
                                           push_cpu_s_per_call=max(0.0, ip[0]["extra_s"] - per_row * ip[0]["rows"]))
            lat, rows_per_s = fit_latency_bandwidth([n for n, _ in push_wall[t.name]], [w for _, w in push_wall[t.name]])
            beyond = max(0.0, 1 / (rows_per_s * 1e9) - 96 / (tiers[i].link_gbps * 1e9))   # 96 B: 24 fp32 grads
            tiers[i] = dataclasses.replace(tiers[i], push_latency_s=lat, push_s_per_row=beyond)
    tiers.append(disk_tier)
    return tiers, {"tier_points": raw, "interference": {f"{k[0]}@{k[1]}t": v for k, v in inter.items()},
                   "push_interference": push_inter, "push_wall": push_wall}


def _median_tier(ts: list[Tier]) -> Tier:
    """Each numeric field's median over the runs' fits of one tier."""
    out = {}
    for f in dataclasses.fields(Tier):
        vals = [getattr(t, f.name) for t in ts]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out[f.name] = type(vals[0])(np.median(vals))
        else:
            out[f.name] = vals[0]
    src = ts[0].source + (f" (median of {len(ts)} runs)" if len(ts) > 1 else "")
    return dataclasses.replace(ts[0], **{**out, "source": src})


def calibrate(out: str, quick: bool = False, runs: int = 3, disk_dir: str = "/var/tmp") -> dict:
    t0 = time.time()
    load0 = os.getloadavg()
    reps = 5 if quick else 12
    runs = 1 if quick else runs
    print(f"calibrating (load average {load0[0]:.2f}); tiers first", flush=True)
    # The tier fits move a lot with other jobs' load: measure `runs` times, keep each field's median.
    fits, raws = [], []
    for i in range(runs):
        print(f" run {i + 1}/{runs} (load average {os.getloadavg()[0]:.2f})", flush=True)
        t, r = measure_tiers(reps, disk_dir)
        fits.append(t)
        raws.append(r)
    tiers = [_median_tier([f[i] for f in fits]) for i in range(len(fits[0]))]
    raw_t = {"runs": raws}
    print("compute", flush=True)
    devices, raw_c = measure_compute(3 if quick else 5)
    load1 = os.getloadavg()
    extra = {"machine": {"cpus": os.cpu_count(), "loadavg_before": load0, "loadavg_after": load1,
                         "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": time.time() - t0},
             "devices": [dataclasses.asdict(d) for d in devices], "raw": {**raw_t, "compute": raw_c}}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_tiers(out, tiers, extra)
    for t in tiers:
        print(f"  {t.name:<16} latency {t.latency_s * 1e3:7.3f} ms  {t.link_gbps:6.3f} GB/s  cpu/fetch "
              f"{t.cpu_s_per_fetch * 1e3:.3f} ms  cpu/row {t.cpu_s_per_row * 1e9:.1f} ns  stretch {t.stretch:.1f}"
              + (f"  push cpu/call {t.push_cpu_s_per_call * 1e3:.3f} ms, /row {t.push_cpu_s_per_row * 1e9:.1f} ns"
                 if t.push_cpu_s_per_row is not None else ""))
    for d in devices:
        print(f"  {d.name:<16} {d.peak_flops / 1e9:7.1f} GFLOP/s effective, {d.block_fixed_s * 1e3:.3f} ms fixed per block")
    print(f"saved {out} in {time.time() - t0:.0f}s (load average {load0[0]:.2f} -> {load1[0]:.2f})", flush=True)
    return extra
