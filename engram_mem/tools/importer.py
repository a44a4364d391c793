"""`engram-mem import`: load tables from safetensors files into a running memory cluster.

    engram-mem import MODEL_DIR/                        # a checkpoint as published; --sha256 SUMS; --journal F
    engram-mem import --mapping my.json 'ckpt/*.safetensors'     # files named by a mapping
    import_tables(mem, None, ["MODEL_DIR"])            # the same from Python; replace=True for --replace

How it works (files may be many, and larger than any one process's memory):
  1. Check everything before writing anything: every file's header (mapping.read_header), every
     mapped tensor's presence, dtype, shape and row count (mapping.resolve), for a checkpoint
     directory its index and the geometry its config.json gives (layout.py), optionally each file's
     sha256, that an existing table has the mapped rows, dim and dtype (else it is created), and
     that it was not imported from other tensors (its recorded identity; else `replace`).
  2. Plan: each shard's owned slots, in batches of about `batch_bytes` of rows.
  3. Each shard reads its own slots' byte ranges itself (ranged `pread`s at offsets from the
     header; nothing goes through this process), digests each slot's rows (refusing one whose
     digest differs from the table's recorded one) and writes them into its ShardStore
     (ShardStore.import_rows). Every shard has one batch in flight, so the shards read in parallel.
  4. A journal (JSON lines) records each finished batch; an import that is killed and run again
     with the same mapping, files and cluster skips what the journal lists. At the end each shard
     snapshots (ShardActor.snapshot), so the rows are durable where the cluster persists, and the
     table records its identity: source tensors, slot digests, the table digest (verify.py checks them).

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
from engram_mem.tools.layout import EngramLayout, read_config
from engram_mem.tools.mapping import Piece, index_directory, index_files, is_checkpoint_dir, load_mapping, resolve

DIGEST_BYTES = 16       # sha256 cut to 128 bits, per slot of stored rows (sha256: CPUs hash it in hardware)
DEFAULT_MAPPING = "v41-flash"


# ---- the shard side ---------------------------------------------------------------------------
def digest_rows(rows: np.ndarray) -> str:
    """The digest of stored rows (uint8 [n, row bytes]) that identity records and verify checks."""
    return hashlib.sha256(np.ascontiguousarray(rows).data).hexdigest()[:2 * DIGEST_BYTES]


def assemble_rows(item: dict, row_bytes: int, fds: dict[str, int]) -> tuple[np.ndarray, int]:
    """Stored rows [start, stop) of one plan item, read from its pieces' files: (uint8 [n, row_bytes],
    bytes read). `fds` caches open files (the caller closes them)."""
    a, b = int(item["start"]), int(item["stop"])
    buf = np.empty((b - a, row_bytes), dtype=np.uint8)   # [n, stored row bytes]
    n_bytes = 0
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
    return buf, n_bytes


def read_into_store(store, table: str, plan: list[dict]) -> dict:
    """Runs in a shard: read each planned slot's rows from the files, digest them and import them.
    A slot whose digest differs from the one the plan expects (the table's recorded identity) is
    refused before it is written.

    plan: [{"slot": s, "start": a, "stop": b, "expect": hex or None,
            "pieces": [[file, offset, src_row_bytes, row0, col0, width, kind], ...], "piece_rows": {...}}]"""
    spec = store._table(table).spec
    fds: dict[str, int] = {}
    n_rows = n_bytes = 0
    digests = {}
    try:
        for item in plan:
            buf, got = assemble_rows(item, spec.row_bytes, fds)
            digest = digest_rows(buf)
            if item.get("expect") and item["expect"] != digest:
                files = sorted({p[0] for p in item["pieces"]})
                raise InvalidArgument(f"table {table!r}: rows [{item['start']}, {item['stop']}) (slot {item['slot']}) "
                                      f"of {files} differ from the rows this table was imported with (digest "
                                      f"{digest} != recorded {item['expect']}); import with --replace to replace it")
            store.import_rows(table, int(item["start"]), buf.view(spec.storage_dtype))
            digests[int(item["slot"])] = digest
            n_rows += buf.shape[0]
            n_bytes += got
    finally:
        for fd in fds.values():
            os.close(fd)
    return {"rows": n_rows, "bytes": n_bytes, "digests": digests}


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
    layout: dict | None = None      # layout.LayerTable.to_dict() when a config.json describes the table
    recorded: dict | None = None    # the existing table's identity (an earlier import), if any

    def piece_list(self) -> list[list]:
        """The pieces as plain lists: [file, offset, src row bytes, row0, rows, col0, width, kind]."""
        return [[pc.info.file, pc.info.start, pc.info.row_bytes, pc.row0, pc.rows, pc.col0, pc.width, pc.kind]
                for pc in self.pieces]

    def tensors(self) -> list[dict]:
        """The source tensors (name, file, dtype, shape), each once, in the order the rows use them."""
        seen: dict[str, dict] = {}
        for pc in self.pieces:
            i = pc.info
            seen.setdefault(i.name, {"name": i.name, "file": i.file, "dtype": i.dtype, "shape": list(i.shape)})
        return list(seen.values())


def sha256_file(path: str, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_sha256(files: list[str], sums_path: str) -> dict[str, str]:
    """Every file must be listed in `sums_path` (`sha256sum` format) with a matching digest;
    returns {file name: sha256}."""
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
    return {os.path.basename(f): want[os.path.basename(f)] for f in files}


def open_source(mapping: str | None, paths: list[str]) -> tuple[list, dict, EngramLayout | None]:
    """(mapping entries, tensor index, layout) of what `paths` hold. A checkpoint directory (an index
    and a config.json with Engram fields) needs no mapping: v41-flash, for the config's layers."""
    layout = None
    if len(paths) == 1 and os.path.isfile(os.path.join(paths[0], "config.json")):
        cfg = read_config(paths[0])
        layout = EngramLayout.from_config(cfg) if cfg else None
    if mapping is None:
        if layout is None or not is_checkpoint_dir(paths):
            raise InvalidArgument(f"{paths}: without --mapping, give one checkpoint directory holding "
                                  f"model.safetensors.index.json and a config.json with engram_layer_ids")
        entries = load_mapping(DEFAULT_MAPPING, layers=[t.layer for t in layout.tables])
    else:
        entries = load_mapping(mapping)
    if is_checkpoint_dir(paths):
        index = index_directory(paths[0], [n for e in entries for n in e.names])
    else:
        index = index_files(paths)
    return entries, index, layout


def _check_layout(entry, rows: int, dim: int, pieces: list[Piece], layout: EngramLayout) -> dict:
    """The table against its layer's geometry in config.json; returns the layout to record."""
    t = layout.table(entry.layer)
    v = pieces[0].info
    for what, have, want, field in (("rows", rows, t.rows, "engram_num_embeddings"),
                                    ("values a row", dim, t.head_dim, "engram_head_dim"),
                                    ("values per scale", entry.block or t.block, t.block, "the FP8 block")):
        if have != want:
            raise InvalidArgument(f"table {entry.table!r}: tensor {v.name!r} in {v.file} has {have:,} {what}; "
                                  f"{layout.source} gives layer {t.layer} {want:,} ({field})")
    return t.to_dict()


def check_source(mapping: str | None, paths: list[str], storage: str = "") -> list[TablePlan]:
    """Every mapped table checked against the files and the config's layout (no cluster needed)."""
    entries, index, layout = open_source(mapping, paths)
    plans = []
    for entry in entries:
        rows, dim, pieces = resolve(entry, index)
        lay = None
        if layout is not None and entry.layer in {t.layer for t in layout.tables}:
            lay = _check_layout(entry, rows, dim, pieces, layout)
        plans.append(TablePlan(entry.table, entry.spec(rows, dim, init_std=0.0, storage=storage), pieces, lay))
    return plans


def plan_tables(client, mapping: str | None, paths: list[str], *, create: bool = True, storage: str = "",
                replace: bool = False) -> list[TablePlan]:
    """Check every mapped table against the files, the config's layout and the cluster (its tables'
    geometry and recorded identity); nothing changes here."""
    plans = check_source(mapping, paths, storage)
    have = client.describe()["tables"]
    for p in plans:
        if p.name not in have:
            if not create:
                raise InvalidArgument(f"table {p.name!r} does not exist in the cluster (create=False)")
            continue
        if replace:
            continue
        from engram_mem.table import TableSpec

        t = TableSpec.from_dict(have[p.name]["spec"])
        if (t.rows, t.dim, t.dtype, t.block) != (p.spec.rows, p.spec.dim, p.spec.dtype, p.spec.block):
            raise InvalidArgument(f"table {p.name!r} exists as rows={t.rows} dim={t.dim} {t.dtype} block={t.block}; "
                                  f"the files hold rows={p.spec.rows} dim={p.spec.dim} {p.spec.dtype} "
                                  f"block={p.spec.block}. Drop it first, map to another name, or import with --replace")
        p.recorded = (have[p.name].get("meta") or {}).get("identity")
        differs = _identity_differs(p.recorded, p)
        if differs:
            raise InvalidArgument(f"table {p.name!r} was imported from other tensors: {differs}; "
                                  f"import with --replace to replace it")
    return plans


def _identity_differs(recorded: dict | None, p: TablePlan) -> str:
    """How the plan's source tensors differ from a table's recorded ones ("" if they do not)."""
    if not recorded:
        return ""
    was = [(t["name"], t["dtype"], list(t["shape"])) for t in recorded["tensors"]]
    now = [(t["name"], t["dtype"], t["shape"]) for t in p.tensors()]
    if was != now:
        diff = next(((a, b) for a, b in zip(was, now) if a != b), (was[len(now):] or None, now[len(was):] or None))
        return f"recorded {diff[0]}, the files hold {diff[1]}"
    return ""


def _journal_key(client, mapping: str | None, plans: list[TablePlan]) -> str:
    files = sorted({pc.info.file for p in plans for pc in p.pieces})
    tables = client.describe()["tables"]
    doc = {"cluster": client.describe().get("cluster_id"), "tables": [p.spec.to_dict() for p in plans],
           "uids": [tables[p.name]["uid"] for p in plans],
           "files": [(f, os.path.getsize(f), int(os.path.getmtime(f))) for f in files],
           "pieces": [[(pc.info.name, pc.row0, pc.col0) for pc in p.pieces] for p in plans]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:20]


def default_journal(key: str) -> str:
    root = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return os.path.join(root, "engram-mem", f"import-{key}.jsonl")


def _read_journal(path: str, key: str) -> dict[tuple[str, int], str]:
    """{(table, slot): digest} of the batches a journal lists as finished."""
    done: dict[tuple[str, int], str] = {}
    if not os.path.exists(path):
        return done
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                break  # a line cut by a kill: everything before it holds
            if rec.get("key") not in (None, key):
                return {}  # another import's journal: start over
            for slot in rec.get("slots", ()):
                done[(rec["table"], int(slot))] = (rec.get("digests") or {}).get(str(slot), "")
    return done


def table_digest(spec, digests: dict[int, str]) -> str:
    """One digest of a whole table: sha256 (cut to 128 bits) over its slots' digests in slot order."""
    h = hashlib.sha256()
    for s in range(spec.n_slots):
        h.update(bytes.fromhex(digests[s]))
    return h.hexdigest()[:2 * DIGEST_BYTES]


def _identity(p: TablePlan, sums: dict[str, str], digests: dict[int, str]) -> dict:
    """What a table records of its import: meta["identity"] (in describe) and meta["_digests"]."""
    complete = len(digests) == p.spec.n_slots and all(digests.values())
    ident = {"tensors": p.tensors(), "sha256": {f: d for f, d in sums.items()
                                                if f in {os.path.basename(t["file"]) for t in p.tensors()}},
             "digest": table_digest(p.spec, digests) if complete else None,
             "digest_kind": "sha256[:128 bits] of each slot's stored rows; the table's over the slots' in order",
             "slots_digested": sum(1 for d in digests.values() if d)}
    return {"layout": p.layout, "identity": ident, "_digests": {str(s): d for s, d in sorted(digests.items()) if d},
            "_pieces": p.piece_list()}


def import_tables(client, mapping: str | None, paths: list[str], *, sha256: str | None = None,
                  journal: str | None = None, batch_bytes: int = 64 << 20, max_gbps: float = 0.0,
                  progress: bool = True, storage: str = "", replace: bool = False) -> dict:
    """Import every table of `mapping` (None: a checkpoint directory's own tables) from the
    safetensors files in `paths`. A table imported before from other tensors is refused unless
    `replace` (then it is made again). Returns figures:
    {"rows", "bytes", "seconds", "gbps", "skipped_rows", "tables", "digests", "journal"}."""
    import ray
    from tqdm import tqdm

    plans = plan_tables(client, mapping, paths, storage=storage, replace=replace)
    sums = check_sha256(sorted({pc.info.file for p in plans for pc in p.pieces}), sha256) if sha256 else {}
    for p in plans:
        was = (p.recorded or {}).get("sha256") or {}
        changed = sorted(f for f in set(was) & set(sums) if was[f] != sums[f])
        if changed:
            raise InvalidArgument(f"table {p.name!r} was imported from {changed[0]} with sha256 {was[changed[0]]}; "
                                  f"this one's is {sums[changed[0]]}: import with --replace to replace it")
    expect: dict[str, dict[int, str]] = {}   # digests recorded by an earlier import of the same tensors
    for p in plans:  # all checks passed: only now does anything change in the cluster
        if p.name in client.view.tables and replace:
            client.drop_table(p.name)
        if p.name not in client.refresh().tables:
            client.create_table_spec(p.spec, exist_ok=True)
        else:
            meta = ray.get(client.controller.table_meta.remote(p.name))
            expect[p.name] = {int(s): d for s, d in (meta.get("_digests") or {}).items()}
        if p.recorded is None:  # the identity first: an import killed now still refuses another source later
            ray.get(client.controller.set_table_meta.remote(p.name, _identity(p, sums, expect.get(p.name, {}))))
    view = client.refresh()
    actors = ray.get(client.controller.shard_actors.remote())
    key = _journal_key(client, mapping, plans)
    journal = journal or default_journal(key)
    os.makedirs(os.path.dirname(os.path.abspath(journal)), exist_ok=True)
    done = _read_journal(journal, key)
    digests: dict[str, dict[int, str]] = {p.name: dict(expect.get(p.name, {})) for p in plans}
    for (name, slot), d in done.items():
        if name in digests and d:
            digests[name][slot] = d

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
            plan = _shard_plan(p, slots, expect.get(p.name, {}))
            inflight[actor.import_rows.remote(p.name, plan)] = (rank, p, slots)

    with open(journal, "a") as jf:
        if os.path.getsize(journal) == 0:
            jf.write(json.dumps({"key": key, "mapping": str(mapping)}) + "\n")
        for rank in list(queues):
            submit(rank)
        try:
            while inflight:
                ready, _ = ray.wait(list(inflight), num_returns=1)
                rank, p, slots = inflight.pop(ready[0])
                got = ray.get(ready[0])
                digests[p.name].update({int(s): d for s, d in got["digests"].items()})
                jf.write(json.dumps({"key": key, "table": p.name, "slots": slots,
                                     "digests": {str(s): d for s, d in got["digests"].items()}}) + "\n")
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
        except ray.exceptions.RayTaskError as e:
            ray.wait(list(inflight), num_returns=len(inflight))   # let the other shards' batches finish
            cause = getattr(e, "cause", None)
            raise (cause if isinstance(cause, InvalidArgument) else e) from None
    bar.close()
    seconds = time.perf_counter() - t0
    ray.get([a.snapshot.remote() for a in actors.values()])  # durable where the cluster persists
    ray.get(client.controller.resync_replicas.remote())  # imported rows bypass the log: replicas copy them
    out = {}
    for p in plans:
        meta = _identity(p, sums, digests[p.name])
        ray.get(client.controller.set_table_meta.remote(p.name, meta))
        out[p.name] = meta["identity"]["digest"]
    return {"rows": n_rows, "bytes": n_bytes, "seconds": seconds, "gbps": n_bytes / max(seconds, 1e-9) / 1e9,
            "skipped_rows": skipped, "tables": [p.name for p in plans], "digests": out, "journal": journal}


def _slot_rows(spec, slot: int) -> int:
    a, b = spec.slot_range(slot)
    return b - a


def _shard_plan(p: TablePlan, slots: list[int], expect: dict[int, str] | None = None) -> list[dict]:
    """The row ranges of `slots` with the pieces that cover them (what read_into_store needs)."""
    pieces = p.piece_list()
    return [slot_item(pieces, s, *p.spec.slot_range(s), (expect or {}).get(s)) for s in slots]


def slot_item(pieces: list[list], slot: int, a: int, b: int, expect: str | None = None) -> dict:
    """One plan item: rows [a, b) of `slot` and the pieces (TablePlan.piece_list) that cover them."""
    cover = [pc for pc in pieces if pc[3] < b and pc[3] + pc[4] > a]
    return {"slot": slot, "start": a, "stop": b, "expect": expect,
            "pieces": [[f, off, rb, r0, c0, w, k] for f, off, rb, r0, _, c0, w, k in cover],
            "piece_rows": {f"{pc[0]}:{pc[1]}": pc[4] for pc in cover}}
