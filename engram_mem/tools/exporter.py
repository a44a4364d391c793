"""`engram-mem export`: stream tables from a running cluster back to a safetensors file.

    engram-mem export --mapping v41-flash --out tables.safetensors [--like MODEL_DIR/] [--optimizer-state]
    export_tables(mem, "v41-flash", "tables.safetensors")

The same mapping as the import (mapping.py) names the tensors. Shapes come from the cluster's table
specs; a table that the mapping splits into several heads needs the heads' sizes: pass the
original files with `like` (their headers only are read), or the rows/dim are split evenly.

Streaming: the header is written first (every shape is known up front), then each shard hands
over its slots in batches of about `batch_bytes` (ShardActor.export_slots: rows and optimizer
state), and every batch is written straight to its tensors' byte ranges (positioned writes), so
neither the file nor a table is ever held in memory. With `optimizer_state`, a float table's row
optimizer state is written as "<values tensor>.<state>" (Adam: exp_avg, exp_avg_sq float32 of the
values' shape, step int32 [rows]).
fp8 tables are written as F8_E4M3 values and U8 scales (or the mapping's scale_dtype); importing
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
from engram_mem.tools.mapping import ITEMSIZE, TABLE_TENSOR_DTYPE, Piece, TensorInfo, index_files, load_mapping, resolve


def _layout(entry, spec, like: dict | None) -> list[tuple[str, str, tuple[int, int]]]:
    """(tensor name, dtype, shape) of every tensor a table is written as."""
    n = len(entry.values)
    vdtype = TABLE_TENSOR_DTYPE.get(entry.dtype, "U8")
    sdtype = entry.scale_dtype or "U8"
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


def export_tables(client, mapping: str, out: str, *, like: list[str] | None = None, optimizer_state: bool = False,
                  batch_bytes: int = 64 << 20, progress: bool = True) -> dict:
    import ray
    from tqdm import tqdm

    view = client.refresh()
    like_index = index_files(like) if like else None
    entries = load_mapping(mapping)
    tensors, jobs = [], []
    for e in entries:
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
    head, infos = _header(tensors, out)
    tmp = out + ".partial"
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
    os.replace(tmp, out)  # a half-written export never has the final name
    return {"tensors": len(tensors), "bytes": written, "path": out}


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
