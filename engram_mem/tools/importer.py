"""`engram-mem import`: load tables from safetensors files into a running memory cluster.

    engram-mem import --mapping v41-flash MODEL_DIR/          # or files / globs; --sha256 SUMS; --journal F
    import_tables(mem, "v41-flash", ["MODEL_DIR"])            # the same from Python

How it works (files may be many, and larger than any one process's memory):
  1. Check everything before writing anything: every file's header (mapping.read_header), every
     mapped tensor's presence, dtype, shape and row count (mapping.resolve), optionally each file's
     sha256, and that an existing table has the mapped rows, dim and dtype (else it is created).
  2. Plan: each shard's owned slots, in batches of about `batch_bytes` of rows.
  3. Each shard reads its own slots' byte ranges itself (ranged `pread`s at offsets from the
     header; nothing goes through this process) and writes them into its ShardStore
     (ShardStore.import_rows). Every shard has one batch in flight, so the shards read in parallel.
  4. A journal (JSON lines) records each finished batch; an import that is killed and run again
     with the same mapping, files and cluster skips what the journal lists. At the end each shard
     snapshots (ShardActor.snapshot), so the rows are durable where the cluster persists.

Progress: a tqdm bar with rows and GB/s. `max_gbps` caps the rate (for a cluster that is serving).
Slot moves (`engram-mem scale`) during an import are not supported: run them before or after.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass

import numpy as np

from engram_mem.errors import InvalidArgument
from engram_mem.tools.mapping import Piece, index_files, load_mapping, resolve


# ---- the shard side ---------------------------------------------------------------------------
def read_into_store(store, table: str, plan: list[dict]) -> dict:
    """Runs in a shard: read each planned row range from the files and import it.

    plan: [{"start": a, "stop": b, "pieces": [[file, offset, src_row_bytes, row0, col0, width, kind], ...]}]"""
    ts = store._table(table)
    spec = ts.spec
    fds: dict[str, int] = {}
    n_rows = n_bytes = 0
    try:
        for item in plan:
            a, b = int(item["start"]), int(item["stop"])
            buf = np.empty((b - a, spec.row_bytes), dtype=np.uint8)   # [n, stored row bytes]
            for file, offset, src_bytes, row0, col0, width, kind in item["pieces"]:
                lo, hi = max(a, row0), min(b, row0 + _piece_rows(item, file, offset))
                if hi <= lo:
                    continue
                fd = fds.get(file)
                if fd is None:
                    fd = fds[file] = os.open(file, os.O_RDONLY)
                want = (hi - lo) * src_bytes
                data = os.pread(fd, want, offset + (lo - row0) * src_bytes)
                if len(data) != want:
                    raise InvalidArgument(f"{file}: short read at byte {offset + (lo - row0) * src_bytes} "
                                          f"({len(data)} of {want}); was the file changed during the import?")
                src = np.frombuffer(data, dtype=np.uint8).reshape(hi - lo, src_bytes)
                if kind == "f32_scale":
                    src = f32_to_ue8m0(src.view("<f4"), file)
                buf[lo - a:hi - a, col0:col0 + width] = src
                n_bytes += want
            store.import_rows(table, a, buf.view(spec.storage_dtype))
            n_rows += b - a
    finally:
        for fd in fds.values():
            os.close(fd)
    return {"rows": n_rows, "bytes": n_bytes}


def _piece_rows(item: dict, file: str, offset: int) -> int:
    return item["piece_rows"][f"{file}:{offset}"]


def f32_to_ue8m0(scales: np.ndarray, where: str) -> np.ndarray:
    """F32 power-of-two scales [n, k] -> ue8m0 exponent bytes [n, k] (exact; anything else is refused)."""
    bits = np.ascontiguousarray(scales).view("<u4")
    if np.any(bits & 0x807FFFFF):
        raise InvalidArgument(f"{where}: F32 scales must be positive powers of two (ue8m0) to import exactly")
    return ((bits >> 23) & 0xFF).astype(np.uint8)


def ue8m0_to_f32(exp: np.ndarray) -> np.ndarray:
    return (exp.astype("<u4") << 23).view("<f4")


# ---- the driver side --------------------------------------------------------------------------
@dataclass
class TablePlan:
    name: str
    spec: object
    pieces: list[Piece]


def sha256_file(path: str, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_sha256(files: list[str], sums_path: str) -> None:
    """Every file must be listed in `sums_path` (`sha256sum` format) with a matching digest."""
    want = {}
    for line in open(sums_path):
        parts = line.strip().split()
        if len(parts) >= 2:
            want[os.path.basename(parts[-1].lstrip("*"))] = parts[0].lower()
    for f in files:
        name = os.path.basename(f)
        if name not in want:
            raise InvalidArgument(f"{sums_path}: no sha256 listed for {name}")
        got = sha256_file(f)
        if got != want[name]:
            raise InvalidArgument(f"{f}: sha256 {got} does not match {want[name]} in {sums_path}; "
                                  f"the file is corrupt or not the one the sums describe")


def plan_tables(client, mapping: str, paths: list[str], *, create: bool = True, storage: str = "") -> list[TablePlan]:
    """Check every mapped table against the files and the cluster (creating missing tables)."""
    index = index_files(paths)
    plans = []
    for entry in load_mapping(mapping):
        rows, dim, pieces = resolve(entry, index)
        plans.append(TablePlan(entry.table, entry.spec(rows, dim, init_std=0.0, storage=storage), pieces))
    have = client.tables()
    for p in plans:
        t = have.get(p.name)
        if t is not None and (t.rows, t.dim, t.dtype, t.block) != (p.spec.rows, p.spec.dim, p.spec.dtype, p.spec.block):
            raise InvalidArgument(f"table {p.name!r} exists as rows={t.rows} dim={t.dim} {t.dtype} block={t.block}; "
                                  f"the files hold rows={p.spec.rows} dim={p.spec.dim} {p.spec.dtype} "
                                  f"block={p.spec.block}. Drop it first or map to another name")
        if t is None and not create:
            raise InvalidArgument(f"table {p.name!r} does not exist in the cluster (create=False)")
    return plans


def _journal_key(client, mapping: str, plans: list[TablePlan]) -> str:
    files = sorted({pc.info.file for p in plans for pc in p.pieces})
    doc = {"cluster": client.describe().get("cluster_id"), "tables": [p.spec.to_dict() for p in plans],
           "files": [(f, os.path.getsize(f), int(os.path.getmtime(f))) for f in files],
           "pieces": [[(pc.info.name, pc.row0, pc.col0) for pc in p.pieces] for p in plans]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:20]


def default_journal(key: str) -> str:
    root = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return os.path.join(root, "engram-mem", f"import-{key}.jsonl")


def _read_journal(path: str, key: str) -> set[tuple[str, int]]:
    done: set[tuple[str, int]] = set()
    if not os.path.exists(path):
        return done
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                break  # a line cut by a kill: everything before it holds
            if rec.get("key") not in (None, key):
                return set()  # another import's journal: start over
            for slot in rec.get("slots", ()):
                done.add((rec["table"], int(slot)))
    return done


def import_tables(client, mapping: str, paths: list[str], *, sha256: str | None = None, journal: str | None = None,
                  batch_bytes: int = 64 << 20, max_gbps: float = 0.0, progress: bool = True,
                  storage: str = "") -> dict:
    """Import every table of `mapping` from the safetensors files in `paths`. Returns figures:
    {"rows", "bytes", "seconds", "gbps", "skipped_rows", "tables"}."""
    import ray
    from tqdm import tqdm

    plans = plan_tables(client, mapping, paths, storage=storage)
    if sha256:
        check_sha256(sorted({pc.info.file for p in plans for pc in p.pieces}), sha256)
    for p in plans:  # all checks passed: only now does anything change in the cluster
        if p.name not in client.view.tables:
            client.create_table_spec(p.spec, exist_ok=True)
    view = client.refresh()
    actors = ray.get(client.controller.shard_actors.remote())
    key = _journal_key(client, mapping, plans)
    journal = journal or default_journal(key)
    os.makedirs(os.path.dirname(os.path.abspath(journal)), exist_ok=True)
    done = _read_journal(journal, key)

    # Work: per shard rank, batches of its slots not yet done.
    queues: dict[int, list[tuple[TablePlan, list[int]]]] = {}
    total = skipped = 0
    for p in plans:
        t = view.table(p.name)
        per_batch = max(1, batch_bytes // max(1, p.spec.slot_rows * p.spec.row_bytes))
        for rank in range(len(view.shard_ids)):
            slots = [int(s) for s in np.nonzero(t.placement == rank)[0]]
            todo = [s for s in slots if (p.name, s) not in done]
            skipped += sum(_slot_rows(p.spec, s) for s in slots if (p.name, s) in done)
            total += sum(_slot_rows(p.spec, s) for s in todo)
            for i in range(0, len(todo), per_batch):
                queues.setdefault(rank, []).append((p, todo[i:i + per_batch]))

    t0 = time.perf_counter()
    n_rows = n_bytes = 0
    bar = tqdm(total=total, unit="row", unit_scale=True, desc="import", disable=not progress, smoothing=0.1)
    inflight: dict = {}  # ref -> (rank, plan, slots)

    def submit(rank: int) -> None:
        if queues.get(rank):
            p, slots = queues[rank].pop(0)
            actor = actors[view.shard_ids[rank]]
            inflight[actor.import_rows.remote(p.name, _shard_plan(p, slots))] = (rank, p, slots)

    with open(journal, "a") as jf:
        if os.path.getsize(journal) == 0:
            jf.write(json.dumps({"key": key, "mapping": str(mapping)}) + "\n")
        for rank in list(queues):
            submit(rank)
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            rank, p, slots = inflight.pop(ready[0])
            got = ray.get(ready[0])
            jf.write(json.dumps({"key": key, "table": p.name, "slots": slots}) + "\n")
            jf.flush()
            os.fsync(jf.fileno())
            n_rows += got["rows"]
            n_bytes += got["bytes"]
            el = time.perf_counter() - t0
            bar.update(got["rows"])
            bar.set_postfix_str(f"{n_bytes / max(el, 1e-9) / 1e9:.2f} GB/s")
            if max_gbps > 0:  # throttle: wait until the average rate is under the cap
                time.sleep(max(0.0, n_bytes / (max_gbps * 1e9) - el))
            submit(rank)
    bar.close()
    seconds = time.perf_counter() - t0
    ray.get([a.snapshot.remote() for a in actors.values()])  # durable where the cluster persists
    ray.get(client.controller.resync_replicas.remote())  # imported rows bypass the log: replicas copy them
    return {"rows": n_rows, "bytes": n_bytes, "seconds": seconds, "gbps": n_bytes / max(seconds, 1e-9) / 1e9,
            "skipped_rows": skipped, "tables": [p.name for p in plans], "journal": journal}


def _slot_rows(spec, slot: int) -> int:
    a, b = spec.slot_range(slot)
    return b - a


def _shard_plan(p: TablePlan, slots: list[int]) -> list[dict]:
    """The row ranges of `slots` with the pieces that cover them (what read_into_store needs)."""
    out = []
    for s in slots:
        a, b = p.spec.slot_range(s)
        pieces = [pc for pc in p.pieces if pc.row0 < b and pc.row0 + pc.rows > a]
        out.append({"start": a, "stop": b,
                    "pieces": [[pc.info.file, pc.info.start, pc.info.row_bytes, pc.row0, pc.col0, pc.width, pc.kind]
                               for pc in pieces],
                    "piece_rows": {f"{pc.info.file}:{pc.info.start}": pc.rows for pc in pieces}})
    return out
