"""ShardStore: one shard's rows of every table, in host DRAM. No Ray, no gRPC.

A shard owns a set of slots (contiguous row ranges, see table.py) of each table. A table's rows on
a shard live in one contiguous buffer of *frames*, one frame per owned slot, `slot_rows x dim` each:

    frame_of[slot] -> frame index (-1 if the slot is not owned)
    local row of global row r = frame_of[r // slot_rows] * slot_rows + r % slot_rows

The buffer is a file in shared memory (/dev/shm by default) mapped into the shard process, so a
worker on the same node can map it too and read rows without a request (the same-node tier: a
model of CXL load/store). Slots that leave free their frame (the pages are released with
MADV_REMOVE) and the frame is reused by the next slot that arrives; the buffer grows only when no
frame is free. Resident memory is the table bytes plus at most one partly used slot per table.

Thread safety: gathers read without locks (a row being pushed concurrently may be read half
updated: each value is either old or new). Every change (write, push, slot install or drop) takes
the store's `order` lock, gets the next log sequence number (lsn), is applied, and is appended to
the write-ahead log (wal.py) in that order; a snapshot copies slots under the same lock, so each
copied slot is exact as of one lsn. The server runs on one thread; the Ray actor thread only
moves slots and takes snapshots.

Moving slots (a re-shard) is a pre-copy: the source copies slots with the lsn of the cut
(`copy_slots`) while it goes on taking writes, the destination installs them (`add_slots`, which
overwrites slots it already holds), and once writes are frozen only the slots changed since their
cut (`changed_since`, from the per-slot lsn of the last change, `mod_lsn`) are copied again.

Exactly once: a write or push may carry an idempotency key (client id, sequence number). Rows in
slots that already applied the key are skipped (dedup.py), so a retry is answered as applied
without applying anything twice; the key travels in the log record, so replay rebuilds it.

    store = ShardStore(shard_id=0, shm_dir="/dev/shm/engram-mem/demo")
    store.add_table(TableSpec("t", rows=1000, dim=8), slots=range(4096), epoch=1)
    rows = store.gather("t", np.array([3, 5, 3]))        # [3, 8]
"""

from __future__ import annotations

import mmap
import os
import shutil
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from engram_mem.storage import dedup as dedup_codec
from engram_mem.storage.dedup import DedupWindow
from engram_mem.errors import (InvalidArgument, NonFiniteUpdate, NotReady, ReadOnlyTable, RequestTooLarge, StaleEpoch,
                               TableExists, UnknownTable)
from engram_mem.optim import MAX_GRAD_ABS, MAX_LR, OptimizerSpec, RowOptimizer, make_optimizer
from engram_mem.table import TableSpec, as_torch, from_float32, np_dtype, to_float32
from engram_mem.validate import check_grads, check_ids, check_lr, check_rows_finite
from engram_mem.storage.wal import KIND_DROP, KIND_INSTALL, KIND_PUSH, KIND_WRITE, Record

_PAGE = mmap.PAGESIZE


def member_dir(shard_id: int, member: int = 0) -> str:
    """A shard member's directory name for its row files: the primary's, or replica k's."""
    return f"shard-{shard_id}" if member == 0 else f"shard-{shard_id}-r{member}"


def rows_path(shm_dir: str | None, shard_id: int, spec: TableSpec, storage: str, member: int = 0) -> str | None:
    """Where a table's rows file lives: in shm_dir (shared memory), or in the table's or the
    cluster's disk directory ("disk:/path")."""
    where = spec.storage or storage or "shm"
    if where.startswith("disk:"):
        cluster = os.path.basename(shm_dir.rstrip("/")) if shm_dir else "local"
        return os.path.join(where[5:], cluster, member_dir(shard_id, member), f"{spec.name}.rows")
    return os.path.join(shm_dir, member_dir(shard_id, member), f"{spec.name}.rows") if shm_dir else None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _Buffer:
    """A growable `[frames * slot_rows, dim]` array backed by a file (shared memory) or anonymous."""

    def __init__(self, path: str | None, frame_rows: int, dim: int, dtype: np.dtype):
        self.path, self.frame_rows, self.dim, self.dtype = path, frame_rows, dim, dtype
        self.frame_bytes = frame_rows * dim * dtype.itemsize
        self.frames = 0
        self.array = np.empty((0, dim), dtype=dtype)
        self._mm: mmap.mmap | None = None
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _unlink(path)  # a new inode: a reader still mapping an old file must never see it shrink
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)

    def grow(self, frames: int) -> None:
        """Make room for `frames` frames. Old arrays stay valid (they keep their own mapping)."""
        if frames <= self.frames:
            return
        nbytes = frames * self.frame_bytes
        if self.path:
            os.ftruncate(self._fd, nbytes)
            mm = mmap.mmap(self._fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            arr = np.frombuffer(mm, dtype=self.dtype).reshape(-1, self.dim)
        else:
            arr = np.empty((frames * self.frame_rows, self.dim), dtype=self.dtype)
            arr[: self.frames * self.frame_rows] = self.array
        self._mm, self.array, self.frames = (mm if self.path else None), arr, frames

    def release(self, frame: int) -> None:
        """Give a frame's memory back to the OS (its contents become zeros)."""
        if self._mm is None:
            return
        start = frame * self.frame_bytes
        lo = -(-start // _PAGE) * _PAGE
        hi = ((start + self.frame_bytes) // _PAGE) * _PAGE
        if hi > lo:
            self._mm.madvise(mmap.MADV_REMOVE, lo, hi - lo)

    def close(self) -> None:
        if self.path:
            os.close(self._fd)
            _unlink(self.path)
        self.array = np.empty((0, self.dim), dtype=self.dtype)
        self._mm = None  # the mapping closes when the last array viewing it is collected


class _Layout:
    """A seqlock over the frame layout, in shared memory so same-node readers can check it.

    The version is odd while frames move (slots added or removed, epoch changing) and even
    otherwise. A reader notes the version, reads rows, and trusts them only if the version is
    unchanged, even, and the one its copy of the layout was taken at."""

    def __init__(self, path: str | None):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _unlink(path)
            with open(path, "xb") as f:
                f.write(bytes(8))
            self.word = np.memmap(path, dtype="<u8", mode="r+", shape=(1,))
        else:
            self.word = np.zeros(1, dtype="<u8")

    @property
    def version(self) -> int:
        return int(self.word[0])

    def __enter__(self):
        self.word[0] += 1  # odd: changing
        return self

    def __exit__(self, *exc):
        self.word[0] += 1  # even: stable again


@dataclass
class TableShard:
    spec: TableSpec
    optimizer_spec: OptimizerSpec
    optimizer: RowOptimizer
    buffer: _Buffer
    frame_of: np.ndarray                     # int32 [n_slots]: frame of each slot, -1 if not owned
    free_frames: list[int] = field(default_factory=list)
    dirty: np.ndarray | None = None          # bool [n_slots]: changed since the last snapshot
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # optimizer state, [frames*slot_rows, ...]
    lock: threading.Lock = field(default_factory=threading.Lock)
    uid: str = ""                            # this incarnation of the table (a re-created one gets another)
    dedup: DedupWindow | None = None
    slot_lsn: np.ndarray | None = None       # int64 [n_slots]: lsn a restored slot was snapshotted at
    mod_lsn: np.ndarray | None = None        # int64 [n_slots]: lsn of the last change to the slot (a move's cut)

    @property
    def rows(self) -> np.ndarray:
        return self.buffer.array

    def owned_slots(self) -> np.ndarray:
        return np.nonzero(self.frame_of >= 0)[0].astype(np.int32)

    def resident_rows(self) -> int:
        spec = self.spec
        return sum(b - a for a, b in (spec.slot_range(int(s)) for s in self.owned_slots()))


class ShardStore:
    def __init__(self, shard_id: int = 0, shm_dir: str | None = None, max_request_bytes: int = 256 << 20,
                 log=None, max_lr: float = MAX_LR, max_grad_abs: float = MAX_GRAD_ABS,
                 storage: str = "shm", memory_budget: int = 0, member: int = 0):
        self.shard_id, self.member = shard_id, member   # member 0: the primary; k > 0: replica k
        self.shm_dir = shm_dir
        self.storage, self.memory_budget = storage, memory_budget  # disk-backed rows: storage.py
        self.max_request_bytes = max_request_bytes
        self.max_lr, self.max_grad_abs = max_lr, max_grad_abs
        self.log = log            # a WriteAheadLog, or None (nothing logged)
        self.taps: list = []      # tap(lsn, kind, meta, blobs) for every change, in lsn order (replication.py)
        self.lsn = 0              # last lsn applied
        self.order = threading.RLock()
        self.epoch = 0
        self.ready = True
        self.not_ready_reason = ""
        self.writes_frozen = False
        self.tables: dict[str, TableShard] = {}
        self.budgets: dict = {}  # table -> storage.PageBudget, for disk-backed tables
        self._lock = threading.Lock()  # guards the tables dict
        self.layout = _Layout(os.path.join(shm_dir, member_dir(shard_id, member), "layout") if shm_dir else None)

    # ---- tables and slots ------------------------------------------------------------------
    def add_table(self, spec: TableSpec, slots, optimizer: OptimizerSpec | dict | None = None,
                  epoch: int | None = None, restore=None, uid: str = "") -> None:
        """Create this shard's part of a table. Each slot is restored (restore(ts, slot, frame, out) -> bool,
        see recovery.py) or else gets the table's initial values."""
        with self._lock:
            if spec.name in self.tables:
                raise TableExists(f"table {spec.name!r} already exists on shard {self.shard_id}")
            opt_spec = optimizer if isinstance(optimizer, OptimizerSpec) else OptimizerSpec.from_dict(optimizer)
            path = rows_path(self.shm_dir, self.shard_id, spec, self.storage, self.member)
            ts = TableShard(spec=spec, optimizer_spec=opt_spec, optimizer=make_optimizer(opt_spec),
                            buffer=_Buffer(path, spec.slot_rows, spec.storage_dim, spec.storage_dtype),
                            frame_of=np.full(spec.n_slots, -1, dtype=np.int32),
                            dirty=np.zeros(spec.n_slots, dtype=bool), uid=uid, dedup=DedupWindow(spec.n_slots),
                            slot_lsn=np.zeros(spec.n_slots, dtype=np.int64),
                            mod_lsn=np.zeros(spec.n_slots, dtype=np.int64))
            self.tables[spec.name] = ts
        try:
            self._fill_slots(ts, np.asarray(list(slots), dtype=np.int64), restore)
        except BaseException:
            self.drop_table(spec.name)
            raise
        if epoch is not None:
            self.set_epoch(max(self.epoch, epoch))

    def drop_table(self, name: str) -> None:
        with self._lock, self.layout:
            ts = self.tables.pop(name, None)
        if ts is None:
            raise UnknownTable(f"unknown table {name!r} on shard {self.shard_id}")
        ts.buffer.close()
        if name in self.budgets:
            self.budgets.pop(name).close()
            for d in (os.path.dirname(ts.buffer.path), os.path.dirname(os.path.dirname(ts.buffer.path))):
                try:
                    os.rmdir(d)  # the shard's, then the cluster's directory on disk, once empty
                except OSError:
                    break

    def _fill_slots(self, ts: TableShard, slots: np.ndarray, restore=None, data: dict | None = None) -> None:
        """Give `slots` frames and fill them: from `data`, else restore(slot, out), else initial values."""
        spec = ts.spec
        if slots.size and (slots.min() < 0 or slots.max() >= spec.n_slots):
            raise InvalidArgument(f"table {spec.name!r}: slots must be in [0, {spec.n_slots})")
        with ts.lock, self.layout:
            new = [int(s) for s in slots if ts.frame_of[s] < 0]
            need = len(new) - len(ts.free_frames)
            if need > 0:
                first = ts.buffer.frames
                ts.buffer.grow(first + need)
                ts.free_frames.extend(range(first, first + need))
                self._grow_state(ts)
            for slot in new:
                frame = ts.free_frames.pop()
                a, b = spec.slot_range(slot)
                out = ts.rows[frame * spec.slot_rows: frame * spec.slot_rows + (b - a)]
                if data is not None and slot in data:
                    out[:] = data[slot]["rows"]
                    moved_state = data[slot].get("state") or {}
                    if moved_state:  # optimizer state moves with its rows
                        self._ensure_state(ts)
                        for k, v in moved_state.items():
                            ts.state[k][frame * spec.slot_rows: frame * spec.slot_rows + (b - a)] = torch.from_numpy(v)
                    ts.dedup.install(np.array([slot]), data[slot].get("dedup") or {})  # keys move with slots
                    ts.dirty[slot] = True
                elif restore is None or not restore(ts, slot, frame, out):
                    spec.init_range(a, b, out=out)
                ts.frame_of[slot] = frame
        self._attach_budget(ts)

    def add_slots(self, name: str, data: dict[int, dict]) -> int:
        """Receive slots moved from another shard: data[slot] = {"rows", "state", "dedup"}. A slot this
        store already holds (copied before, and changed at its source since) is overwritten: rows,
        optimizer state and keys. Logged whole (an INSTALL record), so the slots survive this shard's
        death before its next snapshot; a restart holds them only if the cluster file gives it them."""
        ts = self._table(name)
        slots = np.array(sorted(data), dtype=np.int64)
        blobs, meta_slots = [], []
        for slot in slots.tolist():
            d = data[slot]
            names = sorted(d.get("state") or {})
            blobs += [np.ascontiguousarray(d["rows"]), *[np.ascontiguousarray(d["state"][k]) for k in names],
                      dedup_codec.encode({c: (h, m) for c, (h, m) in (d.get("dedup") or {}).items()})]
            meta_slots.append([slot, names])
        with self.order:
            lsn = self._next_lsn()
            held = ts.frame_of[slots] >= 0
            self._overwrite_slots(ts, {s: _with_parts(data[s]) for s in slots[held].tolist()}, lsn)
            self._fill_slots(ts, slots[~held], data=data)
            ts.mod_lsn[slots] = lsn
            self._commit(lsn, KIND_INSTALL, {"t": name, "uid": ts.uid, "slots": meta_slots}, blobs)
        return lsn

    def export_slots(self, name: str, slots) -> dict[int, dict]:
        """Copies of the rows, optimizer state and idempotency keys of owned slots, for a move."""
        ts = self._table(name)
        out = {}
        with self.order, ts.lock:
            for slot in slots:
                frame = int(ts.frame_of[slot])
                if frame < 0:
                    raise InvalidArgument(f"table {name!r}: shard {self.shard_id} does not own slot {slot}")
                a, b = ts.spec.slot_range(int(slot))
                lo = frame * ts.spec.slot_rows
                out[int(slot)] = {"rows": ts.rows[lo: lo + b - a].copy(),
                                  "state": {k: v[lo: lo + b - a].numpy().copy() for k, v in ts.state.items()},
                                  "dedup": ts.dedup.export(np.array([int(slot)]))}
        return out

    def copy_slots(self, name: str, slots) -> tuple[int, dict[int, dict]]:
        """export_slots as a cut: (the lsn it reflects, the copies). Each copy is exact as of that lsn;
        a slot whose mod_lsn is past it has changed since (changed_since). For a move's pre-copy
        and a replica's full copy."""
        with self.order:
            return self.lsn, self.export_slots(name, slots)

    def changed_since(self, name: str, slots, lsns) -> np.ndarray:
        """Those of `slots` changed after their cut (lsns[i] for slots[i], from copy_slots). Asked under
        the order lock once writes are frozen, the answer is final: nothing changes after it."""
        ts = self._table(name)
        slots = np.asarray(slots, dtype=np.int64)
        with self.order:
            return slots[ts.mod_lsn[slots] > np.asarray(lsns, dtype=np.int64)]

    def install_copy(self, name: str, data: dict[int, dict], lsn: int) -> None:
        """Make slots exact copies of another member's (copy_slots), as of `lsn`: later records
        (replay) apply to them, earlier ones do not. Not logged: a replica keeps no log."""
        ts = self._table(name)
        with self.order:
            new = np.array([s for s in data if ts.frame_of[s] < 0], dtype=np.int64)
            self._fill_slots(ts, new, data={int(s): data[s] for s in new.tolist()})
            held = {s: d for s, d in data.items() if s not in set(new.tolist())}
            if held:
                self._overwrite_slots(ts, held, lsn)
            slots = np.fromiter(data, dtype=np.int64, count=len(data))
            ts.slot_lsn[slots] = ts.mod_lsn[slots] = lsn

    def keep_only_slots(self, name: str, slots) -> None:
        """Release every slot of the table but `slots` (a replica re-joining after a scale)."""
        ts = self._table(name)
        with self.order:
            keep = np.zeros(ts.spec.n_slots, dtype=bool)
            keep[np.asarray(slots, dtype=np.int64)] = True
            self._drop_slots(ts, np.nonzero((ts.frame_of >= 0) & ~keep)[0].tolist())

    def remove_slots(self, name: str, slots) -> int:
        ts = self._table(name)
        slots = [int(x) for x in slots]
        with self.order:
            lsn = self._next_lsn()
            self._drop_slots(ts, slots)
            self._commit(lsn, KIND_DROP, {"t": name, "uid": ts.uid, "slots": slots}, [])
        return lsn

    def _drop_slots(self, ts: TableShard, slots) -> None:
        with ts.lock, self.layout:
            for slot in slots:
                frame = int(ts.frame_of[slot])
                if frame < 0:
                    continue
                ts.frame_of[slot] = -1
                ts.dirty[slot] = False
                ts.buffer.release(frame)
                for v in ts.state.values():
                    v[frame * ts.spec.slot_rows: (frame + 1) * ts.spec.slot_rows] = 0
                ts.free_frames.append(frame)
            ts.dedup.clear(np.asarray(slots, dtype=np.int64))

    # ---- the log -----------------------------------------------------------------------------
    def _next_lsn(self) -> int:
        return self.lsn + 1

    def _commit(self, lsn: int, kind: int, meta: dict, blobs) -> None:
        """The change `lsn` is applied: make it current and queue its log record (order lock held)."""
        self.lsn = lsn
        if self.log is not None:
            self.log.append(lsn, kind, meta, blobs)
        for tap in self.taps:
            tap(lsn, kind, meta, blobs)

    def set_epoch(self, epoch: int) -> None:
        with self.layout:
            self.epoch = epoch

    def set_ready(self, ready: bool, reason: str = "") -> None:
        self.ready, self.not_ready_reason = ready, reason

    def freeze_writes(self, frozen: bool) -> None:
        self.writes_frozen = frozen

    # ---- optimizer state -------------------------------------------------------------------
    def _ensure_state(self, ts: TableShard) -> None:
        if not ts.state:
            ts.state = ts.optimizer.init_state(ts.buffer.frames * ts.spec.slot_rows, ts.spec.dim)

    def _grow_state(self, ts: TableShard) -> None:
        if ts.state:
            n = ts.buffer.frames * ts.spec.slot_rows
            fresh = ts.optimizer.init_state(n, ts.spec.dim)
            for k, v in ts.state.items():
                fresh[k][: v.shape[0]] = v
            ts.state = fresh

    def set_optimizer(self, name: str, optimizer: OptimizerSpec | dict) -> None:
        ts = self._table(name)
        spec = optimizer if isinstance(optimizer, OptimizerSpec) else OptimizerSpec.from_dict(optimizer)
        with ts.lock:
            if spec.name != ts.optimizer_spec.name:
                ts.state = {}
            ts.optimizer_spec, ts.optimizer = spec, make_optimizer(spec)

    # ---- validation ------------------------------------------------------------------------
    def _table(self, name: str) -> TableShard:
        ts = self.tables.get(name)
        if ts is None:
            known = ", ".join(sorted(self.tables)) or "none"
            raise UnknownTable(f"unknown table {name!r} (shard {self.shard_id} has: {known})")
        return ts

    def check_ready(self, epoch: int = 0) -> None:
        if not self.ready:
            raise NotReady(f"shard {self.shard_id} is not ready: {self.not_ready_reason or 'starting'}")
        if epoch and epoch != self.epoch:
            raise StaleEpoch(f"request epoch {epoch} does not match placement epoch {self.epoch} "
                             f"on shard {self.shard_id}; re-read the placement")

    def parse_ids(self, name: str, ids: bytes | np.ndarray, field_name: str = "ids") -> tuple[TableShard, np.ndarray]:
        ts = self._table(name)
        if isinstance(ids, (bytes, bytearray, memoryview)):
            if len(ids) % 8:
                raise InvalidArgument(f"table {name!r}: field {field_name!r} has {len(ids)} bytes, "
                                      f"not a multiple of 8 (int64 row ids)")
            if len(ids) > self.max_request_bytes:
                raise RequestTooLarge(f"table {name!r}: field {field_name!r} is {len(ids)} bytes, over the "
                                      f"{self.max_request_bytes}-byte request limit; split the batch")
            ids = np.frombuffer(ids, dtype="<i8")
        return ts, check_ids(ts.spec, ids, field_name)

    def _local_rows(self, ts: TableShard, ids: np.ndarray) -> np.ndarray:
        slot_rows = ts.spec.slot_rows
        frames = ts.frame_of[ids // slot_rows]
        if ids.size and frames.min() < 0:
            bad = int(ids[np.argmin(frames)])
            raise InvalidArgument(f"table {ts.spec.name!r}: row id {bad} is in slot {bad // slot_rows}, which "
                                  f"shard {self.shard_id} does not own at epoch {self.epoch}")
        return frames.astype(np.int64) * slot_rows + ids % slot_rows

    def _parse_rows(self, ts: TableShard, n: int, data: bytes | np.ndarray, dtype: str, field_name: str) -> np.ndarray:
        """Rows or gradients of a request as a [n, dim] array of `dtype` (float32 or the table's)."""
        spec = ts.spec
        if dtype not in ("float32", spec.dtype):
            raise InvalidArgument(f"table {spec.name!r}: field {field_name!r} has dtype {dtype!r}; "
                                  f"expected 'float32' or the table's {spec.dtype!r}")
        if spec.is_bytes and dtype != spec.dtype:
            raise InvalidArgument(f"table {spec.name!r}: field {field_name!r} has dtype {dtype!r}; a {spec.dtype!r} "
                                  f"table takes its stored rows ({spec.storage_dim} bytes each, dtype {spec.dtype!r})")
        dt, width = np_dtype(dtype), (spec.storage_dim if dtype == spec.dtype else spec.dim)
        if isinstance(data, (bytes, bytearray, memoryview)):
            if len(data) > self.max_request_bytes:
                raise RequestTooLarge(f"table {spec.name!r}: field {field_name!r} is {len(data)} bytes, over the "
                                      f"{self.max_request_bytes}-byte request limit; split the batch")
            expect = n * width * dt.itemsize
            if len(data) != expect:
                raise InvalidArgument(f"table {spec.name!r}: field {field_name!r} has {len(data)} bytes; "
                                      f"{n} ids x dim {width} x {dtype} needs {expect}")
            return np.frombuffer(data, dtype=dt).reshape(n, width)
        arr = np.asarray(data)
        if arr.shape != (n, width):
            raise InvalidArgument(f"table {spec.name!r}: field {field_name!r} has shape {arr.shape}; "
                                  f"expected ({n}, {width})")
        return arr.astype(dt, copy=False)

    def _check_writable(self, name: str) -> None:
        if self.writes_frozen:
            raise NotReady(f"shard {self.shard_id}: table {name!r} is read-only while slots move; retry shortly")

    # ---- data plane ------------------------------------------------------------------------
    def gather(self, name: str, ids, epoch: int = 0) -> np.ndarray:
        """Rows for global row ids (ids must be owned by this shard): [n, dim] in the table dtype."""
        self.check_ready(epoch)
        ts, ids = self.parse_ids(name, ids)
        local = self._local_rows(ts, ids)
        self._prefetch(ts, local)
        rows = np.take(ts.rows, local, axis=0)
        self._touch(ts, local)
        return rows

    def gather_into(self, ts: TableShard, local: np.ndarray, out: np.ndarray) -> None:
        self._prefetch(ts, local)
        np.take(ts.rows, local, axis=0, out=out)
        self._touch(ts, local)

    def write(self, name: str, ids, rows, dtype: str | None = None, epoch: int = 0, client: str = "",
              seq: int = 0) -> tuple[int, int]:
        """Set rows (the last of duplicate ids wins). Returns (rows written, lsn to wait for)."""
        self.check_ready(epoch)
        ts, ids = self.parse_ids(name, ids)
        dtype = dtype or (ts.spec.dtype if isinstance(rows, (bytes, bytearray, memoryview)) else _dtype_name(rows, ts))
        rows = self._parse_rows(ts, ids.size, rows, dtype, "rows")
        self._check_writable(name)
        stored = from_float32(rows, ts.spec.dtype) if dtype != ts.spec.dtype else rows
        check_rows_finite(ts.spec, ids, stored)
        self._local_rows(ts, ids)  # ownership check before anything is applied
        with self.order:
            self._check_writable(name)  # again under the lock: nothing applies once a freeze has begun
            keep = self._not_applied(ts, ids, client, seq)
            if keep is not None and not keep.any():
                return int(ids.size), self.lsn  # a retry of an applied write: answer as before
            if keep is not None and not keep.all():
                ids, stored = ids[keep], stored[keep]
            lsn = self._next_lsn()
            self._apply_write(ts, ids, stored, client, seq, lsn)
            self._commit(lsn, KIND_WRITE, {"t": name, "uid": ts.uid, "c": client, "s": seq},
                         [np.ascontiguousarray(ids, dtype="<i8"), np.ascontiguousarray(stored)])
        return int(keep.size if keep is not None else ids.size), lsn

    def push(self, name: str, ids, grads, dtype: str = "float32", lr: float | None = None,
             step: int = 0, epoch: int = 0, client: str = "", seq: int = 0) -> tuple[int, int]:
        """Apply a sparse gradient with the table's optimizer; duplicate ids are summed.
        Returns (unique rows updated, lsn to wait for)."""
        self.check_ready(epoch)
        ts, ids = self.parse_ids(name, ids)
        if ts.spec.is_bytes:
            raise ReadOnlyTable(f"table {name!r} holds {ts.spec.dtype} rows, which take Write (import) but not Push; "
                                f"train a float32 or bfloat16 table and quantize it on export")
        grads = self._parse_rows(ts, ids.size, grads, dtype, "grads")
        g32 = to_float32(grads, dtype) if dtype != "float32" else grads
        g = torch.from_numpy(g32 if g32.flags.writeable else g32.copy())  # request bytes are read-only
        check_grads(ts.spec, ids, g.numpy(), self.max_grad_abs)
        lr = check_lr(ts.spec, ts.optimizer_spec.lr if lr is None else lr, self.max_lr)
        self._check_writable(name)
        self._local_rows(ts, ids)  # ownership check before anything is applied
        with self.order:
            self._check_writable(name)  # again under the lock: nothing applies once a freeze has begun
            keep = self._not_applied(ts, ids, client, seq)
            n_unique = None
            if keep is not None and not keep.all():
                n_unique = int(np.unique(ids).size)
                if not keep.any():
                    return n_unique, self.lsn  # a retry of an applied push: answer as before
                ids, g = ids[keep], g[torch.from_numpy(keep)]
            lsn = self._next_lsn()
            n = self._apply_push(ts, ids, g, lr, client, seq, lsn)
            self._commit(lsn, KIND_PUSH, {"t": name, "uid": ts.uid, "c": client, "s": seq, "lr": lr},
                         [np.ascontiguousarray(ids, dtype="<i8"), g.numpy()])
        return (n_unique if n_unique is not None else n), lsn

    def _not_applied(self, ts: TableShard, ids: np.ndarray, client: str, seq: int) -> np.ndarray | None:
        """bool per id: its slot has not applied (client, seq) yet; None when the request has no key."""
        if not client:
            return None
        slots = ids // ts.spec.slot_rows
        return ~ts.dedup.applied(client, seq, slots)

    def _apply_write(self, ts: TableShard, ids: np.ndarray, stored: np.ndarray, client: str, seq: int,
                     lsn: int) -> None:
        local = self._local_rows(ts, ids)
        with ts.lock:
            ts.rows[local] = stored  # numpy: the last of duplicate ids wins
            slots = ids // ts.spec.slot_rows
            ts.dirty[slots] = True
            ts.mod_lsn[slots] = lsn
            if client:
                ts.dedup.mark(client, seq, np.unique(slots))

    def _apply_push(self, ts: TableShard, ids: np.ndarray, g: torch.Tensor, lr: float, client: str, seq: int,
                    lsn: int) -> int:
        local = torch.from_numpy(self._local_rows(ts, ids))
        if ids.size > 1 and not bool(np.all(ids[1:] > ids[:-1])):  # duplicates possible: sum them
            uniq, inv = torch.unique(local, return_inverse=True)
            g = torch.zeros(uniq.numel(), ts.spec.dim, dtype=torch.float32).index_add_(0, inv, g)
        else:  # strictly increasing ids are distinct (what the client sends): rows update in place
            uniq = local
        with ts.lock:
            self._ensure_state(ts)
            weight = as_torch(ts.rows, ts.spec.dtype)
            try:
                ts.optimizer.apply(weight, ts.state, uniq, g, lr)
            except NonFiniteUpdate as e:
                raise NonFiniteUpdate(f"table {ts.spec.name!r}: {e}") from None
            slots = ids // ts.spec.slot_rows
            ts.dirty[slots] = True
            ts.mod_lsn[slots] = lsn
            if client:
                ts.dedup.mark(client, seq, np.unique(slots))
        return int(uniq.numel())

    # ---- replay and snapshots ----------------------------------------------------------------
    def replay(self, rec: Record, wanted=None) -> None:
        """Apply a log record to the slots it touches that this store holds (and, if wanted(ts) gives a
        bool mask over slots, only to those) and whose snapshot is older than the record."""
        name = rec.meta.get("t")
        ts = self.tables.get(name)
        if ts is None or ts.uid != rec.meta.get("uid", ""):
            return
        fresh = (ts.frame_of >= 0) & (ts.slot_lsn < rec.lsn)
        if wanted is not None:
            fresh &= wanted(ts)
        if rec.kind in (KIND_WRITE, KIND_PUSH):
            ids = np.frombuffer(rec.blobs[0], dtype="<i8")
            sel = fresh[ids // ts.spec.slot_rows]
            if not sel.any():
                return
            if rec.kind == KIND_WRITE:
                rows = np.frombuffer(rec.blobs[1], dtype=ts.spec.storage_dtype).reshape(-1, ts.spec.storage_dim)
                self._apply_write(ts, ids[sel], rows[sel], rec.meta["c"], rec.meta["s"], rec.lsn)
            else:
                g = torch.from_numpy(np.frombuffer(rec.blobs[1], dtype="<f4").reshape(-1, ts.spec.dim)[sel].copy())
                self._apply_push(ts, ids[sel], g, rec.meta["lr"], rec.meta["c"], rec.meta["s"], rec.lsn)
        elif rec.kind == KIND_INSTALL:
            data, i = {}, 0
            for slot, names in rec.meta["slots"]:
                a, b = ts.spec.slot_range(slot)
                rows = np.frombuffer(rec.blobs[i], dtype=ts.spec.storage_dtype).reshape(b - a, ts.spec.storage_dim)
                state = {}
                for k, nm in enumerate(names):
                    ref = ts.optimizer.init_state(1, ts.spec.dim)[nm]
                    state[nm] = np.frombuffer(rec.blobs[i + 1 + k], dtype=ref.numpy().dtype).reshape(
                        (b - a,) + tuple(ref.shape[1:]))
                dd = dedup_codec.decode(rec.blobs[i + 1 + len(names)])
                i += 2 + len(names)
                if fresh[slot]:
                    data[slot] = {"rows": rows, "state": state, "dedup": dd}
            if data:  # the slot is already allocated here: overwrite it in place
                self._overwrite_slots(ts, data, rec.lsn)
        # KIND_DROP: a dropped slot that this store holds came back later by an INSTALL, which overwrites it

    def _overwrite_slots(self, ts: TableShard, data: dict, lsn: int) -> None:
        """Replace held slots by installed data (a move's re-copy, or an INSTALL record replayed)."""
        with ts.lock:
            for slot, d in data.items():
                frame = int(ts.frame_of[slot])
                a, b = ts.spec.slot_range(slot)
                lo = frame * ts.spec.slot_rows
                ts.rows[lo: lo + b - a] = d["rows"]
                if d["state"]:
                    self._ensure_state(ts)
                    for k, v in d["state"].items():
                        ts.state[k][lo: lo + b - a] = torch.from_numpy(v.copy())
                elif ts.state:
                    fresh = ts.optimizer.init_state(b - a, ts.spec.dim)
                    for k, v in fresh.items():
                        ts.state[k][lo: lo + b - a] = v
                ts.dedup.install(np.array([slot]), d["dedup"])
                ts.dirty[slot] = True
                ts.mod_lsn[slot] = lsn

    def snapshot_slots(self, name: str, slots: np.ndarray) -> tuple[int, list[tuple[int, list]]]:
        """A per-slot cut: (lsn, [(slot, parts)]) copied under the order lock, for a SnapshotWriter."""
        ts = self._table(name)
        out = []
        with self.order, ts.lock:
            lsn = self.lsn
            for slot in slots.tolist():
                frame = int(ts.frame_of[slot])
                if frame < 0:
                    continue
                a, b = ts.spec.slot_range(slot)
                lo = frame * ts.spec.slot_rows
                parts = [("rows", ts.rows[lo: lo + b - a].copy())]
                parts += [(f"state:{k}", v[lo: lo + b - a].numpy().copy()) for k, v in sorted(ts.state.items())]
                parts.append(("dedup", dedup_codec.encode(ts.dedup.export(np.array([slot])))))
                ts.dirty[slot] = False
                out.append((slot, parts))
        return lsn, out

    def load_slot(self, ts: TableShard, slot: int, frame: int, out: np.ndarray, lsn: int, parts: dict) -> None:
        """Fill an allocated slot from snapshot parts (see snapshot.py); used by recovery."""
        rows = np.frombuffer(parts["rows"], dtype=out.dtype)
        if rows.size != out.size:
            raise InvalidArgument(f"table {ts.spec.name!r} slot {slot}: snapshot holds {rows.size} values, "
                                  f"the table's slot needs {out.size}")
        out[:] = rows.reshape(out.shape)
        names = [k[6:] for k in parts if k.startswith("state:") and k[6:] in ts.optimizer.state_names]
        if names:
            self._ensure_state(ts)
            lo = frame * ts.spec.slot_rows
            for nm in names:
                dst = ts.state[nm][lo: lo + out.shape[0]]
                dst.copy_(torch.from_numpy(np.frombuffer(parts["state:" + nm], dtype=dst.numpy().dtype)
                                           .reshape(dst.shape).copy()))
        ts.dedup.install(np.array([slot]), dedup_codec.decode(parts["dedup"]))
        ts.slot_lsn[slot] = ts.mod_lsn[slot] = lsn

    def import_rows(self, name: str, start: int, rows: np.ndarray) -> int:
        """Set stored rows [start, start + len(rows)) (all in owned slots) from an import: rows are
        [n, storage_dim] in the storage dtype. Marks their slots dirty for the next snapshot."""
        ts = self._table(name)
        spec = ts.spec
        if rows.ndim != 2 or rows.shape[1] != spec.storage_dim or rows.dtype != spec.storage_dtype:
            raise InvalidArgument(f"table {name!r}: imported rows are {rows.dtype} {rows.shape}; expected "
                                  f"[n, {spec.storage_dim}] {spec.storage_dtype}")
        self._check_writable(name)
        ids = np.arange(start, start + rows.shape[0], dtype=np.int64)
        local = self._local_rows(ts, ids)
        # Not logged (an import is bulk data, re-runnable from its files): the importer snapshots at the end.
        with self.order, ts.lock:
            self._check_writable(name)
            ts.rows[local] = rows
            ts.dirty[ids // spec.slot_rows] = True
            ts.mod_lsn[ids // spec.slot_rows] = self.lsn + 1  # newer than every cut taken so far
        self._touch(ts, local, write=True)
        return int(rows.shape[0])

    # ---- disk-backed rows (storage.py) -----------------------------------------------------
    def _attach_budget(self, ts: TableShard) -> None:
        if ts.buffer.path and self._on_disk(ts.spec):
            from engram_mem.storage.disk import PageBudget

            b = self.budgets.get(ts.spec.name)
            if b is None:
                n_disk = 1 + len(self.budgets)  # the budget is shared out among this shard's disk tables
                b = self.budgets[ts.spec.name] = PageBudget(self.memory_budget // max(1, n_disk))
            b.attach(ts.buffer)
            b.written = True
            b.trim(ts.buffer)  # the initial fill wrote every page: start cold

    def _on_disk(self, spec: TableSpec) -> bool:
        return (spec.storage or self.storage or "shm").startswith("disk:")

    def _prefetch(self, ts: TableShard, local: np.ndarray) -> None:
        b = self.budgets.get(ts.spec.name) if self.budgets else None
        if b is not None:
            b.prefetch(ts.buffer, local)

    def _touch(self, ts: TableShard, local: np.ndarray, write: bool = False) -> None:
        b = self.budgets.get(ts.spec.name) if self.budgets else None
        if b is not None:
            b.touched(ts.buffer, local, write)

    # ---- introspection ---------------------------------------------------------------------
    def describe(self) -> dict:
        out = {"shard_id": self.shard_id, "epoch": self.epoch, "tables": {},
               "layout_path": self.layout.path or "", "layout_version": self.layout.version}
        for name, ts in list(self.tables.items()):
            out["tables"][name] = {
                "spec": ts.spec.to_dict(),
                "optimizer": ts.optimizer_spec.to_dict(),
                "owned_slots": ts.owned_slots(),
                "frame_of": ts.frame_of.copy(),
                "shm_path": ts.buffer.path or "",
                "frames": ts.buffer.frames,
                "resident_rows": ts.resident_rows(),
            }
        return out

    def table_bytes(self) -> int:
        return sum(ts.buffer.frames * ts.buffer.frame_bytes for ts in self.tables.values())

    def state_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for ts in self.tables.values() for v in ts.state.values())

    def close(self) -> None:
        for name in list(self.tables):
            self.drop_table(name)
        if self.shm_dir:
            shutil.rmtree(os.path.join(self.shm_dir, member_dir(self.shard_id, self.member)), ignore_errors=True)


def _with_parts(d: dict) -> dict:
    """Moved slot data with every part present (a slot without optimizer state or keys has none)."""
    return {"rows": d["rows"], "state": d.get("state") or {}, "dedup": d.get("dedup") or {}}


def _dtype_name(rows, ts: TableShard) -> str:
    arr = np.asarray(rows)
    if arr.dtype == np.float32:
        return "float32"
    if arr.dtype == np_dtype(ts.spec.dtype):
        return ts.spec.dtype
    raise InvalidArgument(f"table {ts.spec.name!r}: rows have dtype {arr.dtype}; expected float32 or the "
                          f"table's {ts.spec.dtype}")

