"""`engram-mem export`: stream tables from a running cluster back to safetensors.

    engram-mem export --mapping v41-flash --out OUT_DIR/ [--like MODEL_DIR/] [--optimizer-state]
    export_tables(mem, "v41-flash", "tables.safetensors")     # one file, no index
    export_tables(mem, None, "out/")                          # the imported tables' own layers

A directory `out` (an existing one, or a name without .safetensors) gets the published layout:
model.safetensors, model.safetensors.index.json (tensor -> file) and a config.json (the --like
checkpoint's, else the Engram fields of the tables' recorded layout), so `engram-mem import out/`
loads it as it loads the original. Names follow the --like files' spelling, else the mapping's first.

The same mapping as the import (mapping.py) names the tensors. Shapes come from the cluster's table
specs; a table that the mapping splits into several heads needs the heads' sizes: pass the
original files with `like` (their headers only are read), or the rows/dim are split evenly.

Streaming: the header is written first (every shape is known up front), then each shard hands
over its slots in batches of about `batch_bytes` (ShardActor.export_slots: rows and optimizer
state), and every batch is written straight to its tensors' byte ranges (positioned writes), so
neither the file nor a table is ever held in memory. With `optimizer_state`, a float table's row
optimizer state is written as "<values tensor>.<state>" (Adam: exp_avg, exp_avg_sq float32 of the
values' shape, step int32 [rows]).
fp8 tables are written as F8_E4M3 values and the mapping's first scale_dtype (else U8) scales; importing
the file again gives the same bytes, and exporting an imported file reproduces every tensor's
bytes (tested).
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import torch

from engram_mem.errors import InvalidArgument
from engram_mem.tools.importer import ue8m0_to_f32
from engram_mem.tools.layout import config_fields
from engram_mem.tools.mapping import (INDEX_FILE, ITEMSIZE, TABLE_TENSOR_DTYPE, Piece, TensorInfo, index_directory,
                                      index_files, is_checkpoint_dir, load_mapping, resolve, spelling)


def _layout(entry, spec, like: dict | None) -> list[tuple[str, str, tuple[int, int]]]:
    """(tensor name, dtype, shape) of every tensor a table is written as."""
    n = len(entry.values)
    vdtype = TABLE_TENSOR_DTYPE.get(entry.dtype, "U8")
    sdtype = entry.scale_dtype[0] if entry.scale_dtype else "U8"
    shapes = []
    for i, name in enumerate(entry.values):
        if like is not None and name in like:
            shapes.append(tuple(like[name].shape))
            continue
        if entry.concat == "rows":
            if n > 1:
                raise InvalidArgument(f"table {entry.table!r}: {n} head tensors stacked along rows; pass the original "
                                      f"files with --like so their row counts are known")
            shapes.append((spec.rows, spec.dim))
        else:
            if spec.dim % n:
                raise InvalidArgument(f"table {entry.table!r}: dim {spec.dim} does not split into {n} heads; use --like")
            shapes.append((spec.rows, spec.dim // n))
    if like is not None and entry.values[0] in like:
        vdtype = like[entry.values[0]].dtype
    out = [(name, vdtype, shape) for name, shape in zip(entry.values, shapes)]
    for name, (r, d) in zip(entry.scales, shapes):
        dt = like[name].dtype if like is not None and name in like else sdtype
        out.append((name, dt, (r, d // entry.block)))
    return out


def _header(tensors: list[tuple[str, str, tuple[int, ...]]], path: str) -> tuple[bytes, dict[str, TensorInfo]]:
    header, offset, infos = {}, 0, {}
    for name, dtype, shape in tensors:
        nbytes = int(np.prod(shape)) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    base = 8 + len(raw)
    for name, dtype, shape in tensors:
        a, b = header[name]["data_offsets"]
        infos[name] = TensorInfo(name, path, dtype, tuple(shape), base + a, base + b)
    return struct.pack("<Q", len(raw)) + raw, infos


def export_tables(client, mapping: str | None, out: str, *, like: list[str] | None = None,
                  optimizer_state: bool = False, batch_bytes: int = 64 << 20, progress: bool = True) -> dict:
    import ray
    from tqdm import tqdm

    view = client.refresh()
    layouts = {n: t["meta"]["layout"] for n, t in view.raw["tables"].items() if (t.get("meta") or {}).get("layout")}
    if mapping is None:  # the tables a checkpoint directory's import made: their own layers
        if not layouts:
            raise InvalidArgument("no --mapping, and no table in the cluster was imported from a checkpoint directory")
        entries = load_mapping("v41-flash", layers=sorted(t["layer"] for t in layouts.values()))
    else:
        entries = load_mapping(mapping)
    names = [n for e in entries for n in e.names]
    like_index = (index_directory(like[0], names) if is_checkpoint_dir(like) else index_files(like)) if like else None
    directory = os.path.isdir(out) or not out.endswith(".safetensors")
    path = os.path.join(out, "model.safetensors") if directory else out
    tensors, jobs = [], []
    for e in entries:
        e = spelling(e, like_index) if like_index is not None else e
        spec = view.table(e.table).spec
        if spec.dtype != e.dtype:
            raise InvalidArgument(f"table {e.table!r} is {spec.dtype}; the mapping says {e.dtype}")
        lay = _layout(e, spec, like_index)
        tensors += lay
        state = {}  # state name -> (safetensors dtype, numpy dtype, per-row shape)
        if optimizer_state and not spec.is_bytes:
            from engram_mem.optim import make_optimizer

            for k, v in make_optimizer(view.table(e.table).optimizer).init_state(1, spec.dim).items():
                state[k] = (_ST_DTYPE[v.dtype], v.numpy().dtype, tuple(v.shape[1:]))
            for name, _, (r, d) in lay[:len(e.values)]:
                tensors += [(f"{name}.{k}", st, (r, d) if shp else (r,)) for k, (st, _, shp) in state.items()]
        jobs.append((e, spec, state))
    if directory:
        os.makedirs(out, exist_ok=True)
    head, infos = _header(tensors, path)
    tmp = path + ".partial"
    total = sum(spec.rows for _, spec, _ in jobs)
    bar = tqdm(total=total, unit="row", unit_scale=True, desc="export", disable=not progress)
    actors = ray.get(client.controller.shard_actors.remote())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    written = 0
    try:
        os.write(fd, head)
        os.ftruncate(fd, len(head) + sum(i.end - i.start for i in infos.values()))
        for e, spec, state in jobs:
            _, _, pieces = resolve(e, infos)
            state_pieces = {k: _state_pieces(e, k, infos) for k in state}
            t = view.table(e.table)
            per_batch = max(1, batch_bytes // max(1, spec.slot_rows * spec.row_bytes))
            for rank, sid in enumerate(view.shard_ids):
                slots = [int(s) for s in np.nonzero(t.placement == rank)[0]]
                for i in range(0, len(slots), per_batch):
                    got = ray.get(actors[sid].export_slots.remote(e.table, slots[i:i + per_batch]))
                    for slot, d in got.items():
                        a, b = spec.slot_range(slot)
                        rows = np.ascontiguousarray(d.rows).view(np.uint8).reshape(b - a, spec.row_bytes)
                        written += _write_rows(fd, pieces, a, b, rows)
                        for k, sp in state_pieces.items():
                            _, dt, shp = state[k]
                            st = d.state.get(k)
                            if st is None:  # no push yet: the optimizer state is still zeros
                                st = np.zeros((b - a, *shp), dt)
                            st = np.ascontiguousarray(st, dt).view(np.uint8).reshape(b - a, -1)
                            written += _write_rows(fd, sp, a, b, st)
                        bar.update(b - a)
        os.fsync(fd)
    finally:
        os.close(fd)
        bar.close()
    os.replace(tmp, path)  # a half-written export never has the final name
    if directory:
        _write_index(out, [name for name, _, _ in tensors], entries, layouts, like)
    return {"tensors": len(tensors), "bytes": written, "path": path}


def _write_index(out: str, names: list[str], entries, layouts: dict, like: list[str] | None) -> None:
    """model.safetensors.index.json and config.json beside an exported directory's model.safetensors."""
    with open(os.path.join(out, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": os.path.getsize(os.path.join(out, "model.safetensors"))},
                   "weight_map": {n: "model.safetensors" for n in names}}, f, indent=1)
    src = os.path.join(like[0], "config.json") if like and len(like) == 1 and os.path.isdir(like[0]) else None
    if src and os.path.exists(src):
        with open(src) as f, open(os.path.join(out, "config.json"), "w") as g:
            g.write(f.read())
    elif all(e.table in layouts for e in entries):
        with open(os.path.join(out, "config.json"), "w") as g:
            json.dump(config_fields([layouts[e.table] for e in entries]), g, indent=1)


_ST_DTYPE = {torch.float32: "F32", torch.int32: "I32", torch.int64: "I64"}


def _state_pieces(e, k: str, infos: dict) -> list[Piece]:
    """Where optimizer state `k` of each head goes: rows [R, d] (per value) or [R] (per row)."""
    out, r, c = [], 0, 0
    for name in e.values:
        t, v = infos[f"{name}.{k}"], infos[name]
        width = t.row_bytes
        out.append(Piece(t, r if e.concat == "rows" else 0, t.shape[0], c if len(t.shape) == 2 else 0, width))
        if e.concat == "rows":
            r += v.shape[0]
        elif len(t.shape) == 2:
            c += width
    return out


def _write_rows(fd: int, pieces, a: int, b: int, rows: np.ndarray) -> int:
    """Write stored rows [a, b) (as bytes [n, row_bytes]) into the tensors' byte ranges."""
    n = 0
    for pc in pieces:
        lo, hi = max(a, pc.row0), min(b, pc.row0 + pc.rows)
        if hi <= lo:
            continue
        part = rows[lo - a:hi - a, pc.col0:pc.col0 + pc.width]
        if pc.kind == "f32_scale":
            part = ue8m0_to_f32(part)
        data = np.ascontiguousarray(part).tobytes()
        os.pwrite(fd, data, pc.info.start + (lo - pc.row0) * pc.info.row_bytes)
        n += len(data)
    return n
