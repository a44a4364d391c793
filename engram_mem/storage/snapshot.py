"""Snapshot generations of a shard: written completely, checksummed, published by an atomic manifest.

    <data_dir>/shard-0003/MANIFEST.json          which generation is current, its files and sizes
    <data_dir>/shard-0003/gen-00000012/data.mdb  lmdb: one value per (table, slot)
    <data_dir>/shard-0003/wal/                   the write-ahead log (wal.py)

A generation holds every slot the shard owned when it was taken. Each value is
`[crc32c][u32 header length][header JSON][rows][optimizer state...][dedup window]`; the header
names the parts and the log position (lsn) the slot was copied at. Slots are copied one batch at
a time under the shard's update lock (a per-slot cut: pushes wait at most one batch), so each
slot has its own lsn and log replay applies to a slot only the records after it.

Publishing writes MANIFEST.json to a temporary name and renames it over the old one (fsynced
under the `fsync` policy); it carries its own crc32c and the size of data.mdb. A reader trusts
nothing else: a missing, truncated or corrupt manifest, generation or value raises CorruptData
naming the file and what is wrong. Older generations are deleted once a new one is published
(keep `keep` of them); a generation a crash left half-written is never referenced, and removed.

Generation 0 is an empty manifest written when the shard directory is created, so a shard
directory without a manifest is always damage, never a fresh start.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import struct
import time

import crc32c
import lmdb
import numpy as np

from engram_mem.errors import CorruptData
from engram_mem.storage.wal import fsync_path

MANIFEST = "MANIFEST.json"
_MAP_SIZE = 1 << 40  # address space only: lmdb files are sparse, disk use is what is written


def shard_dir(data_dir: str, shard_id: int) -> str:
    return os.path.join(data_dir, f"shard-{shard_id:04d}")


def _key(table: str, slot: int) -> bytes:
    return f"slot/{table}/{slot:08d}".encode()


def _manifest_crc(doc: dict) -> int:
    body = json.dumps({k: v for k, v in doc.items() if k != "crc32c"}, sort_keys=True).encode()
    return crc32c.crc32c(body)


def write_json_atomic(path: str, doc: dict, fsync: bool) -> None:
    """Write doc (with its crc32c added) to path atomically: temp file, rename."""
    doc = dict(doc)
    doc["crc32c"] = _manifest_crc(doc)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        fsync_path(os.path.dirname(path) or ".")


def read_json_checked(path: str, what: str) -> dict:
    """A file written by write_json_atomic, verified; CorruptData naming the file if it is not whole."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise CorruptData(f"{what} {path} is missing") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise CorruptData(f"{what} {path} is not valid JSON ({len(text)} bytes; {e.msg} at "
                          f"character {e.pos}): truncated or damaged") from None
    if not isinstance(doc, dict) or "crc32c" not in doc:
        raise CorruptData(f"{what} {path} has no crc32c field: not written by engram-mem or damaged")
    if _manifest_crc(doc) != doc["crc32c"]:
        raise CorruptData(f"{what} {path} fails its crc32c check: damaged")
    return doc


def pack_slot(lsn: int, parts: list[tuple[str, np.ndarray | bytes]]) -> bytes:
    bufs = [p if isinstance(p, (bytes, bytearray)) else np.ascontiguousarray(p).tobytes() for _, p in parts]
    head = json.dumps({"lsn": lsn, "parts": [[n, len(b)] for (n, _), b in zip(parts, bufs)]}).encode()
    body = struct.pack("<I", len(head)) + head + b"".join(bufs)
    return struct.pack("<I", crc32c.crc32c(body)) + body


def unpack_slot(buf, where: str) -> tuple[int, dict[str, memoryview]]:
    mv = memoryview(buf)
    if mv.nbytes < 8:
        raise CorruptData(f"{where}: value of {mv.nbytes} bytes is truncated")
    (crc,) = struct.unpack_from("<I", mv, 0)
    body = mv[4:]
    if crc32c.crc32c(body) != crc:
        raise CorruptData(f"{where}: crc32c mismatch: the snapshot value is damaged")
    (hl,) = struct.unpack_from("<I", body, 0)
    head = json.loads(bytes(body[4:4 + hl]))
    off, out = 4 + hl, {}
    for name, n in head["parts"]:
        out[name] = body[off:off + n]
        off += n
    return head["lsn"], out


class SnapshotWriter:
    """Writes one new generation of a shard; publish() makes it the current one."""

    def __init__(self, data_dir: str, shard_id: int, fsync: bool = False):
        self.dir = shard_dir(data_dir, shard_id)
        self.shard_id, self.fsync = shard_id, fsync
        current = read_manifest(data_dir, shard_id, missing_ok=True)
        self.generation = (current["generation"] if current else 0) + 1
        self.gen_dir = os.path.join(self.dir, f"gen-{self.generation:08d}")
        shutil.rmtree(self.gen_dir, ignore_errors=True)  # a half-written one from a crash
        os.makedirs(self.gen_dir)
        self.env = lmdb.open(self.gen_dir, map_size=_MAP_SIZE, subdir=True, sync=False, metasync=False,
                             lock=False)
        self.tables: dict[str, dict] = {}
        self.min_lsn: int | None = None
        self.bytes = 0

    def put(self, table: str, slot: int, lsn: int, parts: list[tuple[str, np.ndarray | bytes]]) -> None:
        val = pack_slot(lsn, parts)
        with self.env.begin(write=True) as txn:
            txn.put(_key(table, slot), val)
        self.bytes += len(val)
        self.tables.setdefault(table, {"slots": 0})["slots"] += 1
        self.min_lsn = lsn if self.min_lsn is None else min(self.min_lsn, lsn)

    def publish(self, last_lsn: int, tables: dict[str, dict], keep: int = 2, logged: bool = False) -> dict:
        """tables: {name: {"spec": ..., "optimizer": ...}} the shard holds; logged: the shard's log
        holds every change after this generation (so a restore that finds no log knows it is lost).
        Returns the manifest."""
        self.env.sync(True)
        self.env.close()
        size = os.path.getsize(os.path.join(self.gen_dir, "data.mdb"))
        for name, meta in tables.items():
            self.tables.setdefault(name, {"slots": 0}).update(meta)
        doc = {"version": 1, "shard_id": self.shard_id, "generation": self.generation,
               "dir": os.path.basename(self.gen_dir), "data_bytes": size, "created": time.time(),
               "base_lsn": self.min_lsn if self.min_lsn is not None else last_lsn, "last_lsn": last_lsn,
               "log": bool(logged), "tables": self.tables}
        if self.fsync:
            fsync_path(os.path.join(self.gen_dir, "data.mdb"))
        write_json_atomic(os.path.join(self.dir, MANIFEST), doc, self.fsync)
        prune(self.dir, self.generation, keep)
        return doc

    def abort(self) -> None:
        try:
            self.env.close()
        finally:
            shutil.rmtree(self.gen_dir, ignore_errors=True)


def create_empty(data_dir: str, shard_id: int, fsync: bool = False) -> dict:
    """Generation 0 of a new shard directory (no slots, log from lsn 1)."""
    d = shard_dir(data_dir, shard_id)
    os.makedirs(d, exist_ok=True)
    doc = {"version": 1, "shard_id": shard_id, "generation": 0, "dir": "", "data_bytes": 0,
           "created": time.time(), "base_lsn": 0, "last_lsn": 0, "tables": {}}
    write_json_atomic(os.path.join(d, MANIFEST), doc, fsync)
    return doc


def prune(d: str, current: int, keep: int) -> None:
    for p in glob.glob(os.path.join(d, "gen-*")):
        g = int(os.path.basename(p)[4:])
        if g > current or g <= current - max(1, keep):
            shutil.rmtree(p, ignore_errors=True)


def read_manifest(data_dir: str, shard_id: int, missing_ok: bool = False) -> dict | None:
    path = os.path.join(shard_dir(data_dir, shard_id), MANIFEST)
    if missing_ok and not os.path.exists(path):
        return None
    return read_json_checked(path, f"shard {shard_id} snapshot manifest")


class SnapshotReader:
    """The current generation of a shard, verified before anything is read."""

    def __init__(self, data_dir: str, shard_id: int):
        self.manifest = read_manifest(data_dir, shard_id)
        self.dir = shard_dir(data_dir, shard_id)
        self.env = None
        if self.manifest["generation"] > 0:
            gen_dir = os.path.join(self.dir, self.manifest["dir"])
            path = os.path.join(gen_dir, "data.mdb")
            if not os.path.exists(path):
                raise CorruptData(f"snapshot file {path} is missing (its manifest "
                                  f"{os.path.join(self.dir, MANIFEST)} names it)")
            size = os.path.getsize(path)
            if size != self.manifest["data_bytes"]:
                raise CorruptData(f"snapshot file {path} is {size} bytes; its manifest says "
                                  f"{self.manifest['data_bytes']}: truncated or damaged")
            self.path = path
            try:
                self.env = lmdb.open(gen_dir, readonly=True, lock=False, subdir=True, map_size=_MAP_SIZE)
            except lmdb.Error as e:
                raise CorruptData(f"snapshot file {path} cannot be opened: lmdb says {e}") from None

    @property
    def base_lsn(self) -> int:
        return int(self.manifest["base_lsn"])

    @property
    def last_lsn(self) -> int:
        return int(self.manifest["last_lsn"])

    def get(self, table: str, slot: int) -> tuple[int, dict[str, memoryview]] | None:
        """(lsn, parts) of a slot, or None if this generation does not hold it."""
        if self.env is None:
            return None
        where = f"snapshot file {self.path} (table {table!r} slot {slot})"
        try:
            txn = self.env.begin(buffers=True)
            try:
                buf = txn.get(_key(table, slot))
                if buf is None:
                    return None
                buf = bytes(buf)
            finally:
                txn.abort()
        except lmdb.Error as e:  # a damaged page: lmdb's words alone would not say which file
            raise CorruptData(f"{where} is damaged: lmdb says {e}") from None
        return unpack_slot(buf, where)

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None
