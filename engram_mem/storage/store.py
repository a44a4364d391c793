"""ShardStore: one shard's rows of every table, in host DRAM. No Ray, no gRPC.

A shard owns a set of slots of each table, in frames (frames.py); slots move in and out whole
(slots.py).

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

import os
import shutil
import threading

import numpy as np
import torch

from engram_mem.errors import (InvalidArgument, NonFiniteUpdate, NotReady, ReadOnlyTable, RequestTooLarge, StaleEpoch,
                               TableExists, UnknownTable)
from engram_mem.optim import MAX_GRAD_ABS, MAX_LR, OptimizerSpec, make_optimizer
from engram_mem.storage.dedup import DedupWindow
from engram_mem.storage.frames import TableShard, _Buffer, _Layout, member_dir, rows_path
from engram_mem.storage.slot_image import SlotImage
from engram_mem.storage.slots import SlotOps
from engram_mem.storage.wal import KIND_INSTALL, KIND_PUSH, KIND_WRITE, Record
from engram_mem.table import TableSpec, as_torch, from_float32, np_dtype, to_float32
from engram_mem.validate import check_grads, check_ids, check_lr, check_rows_finite


class ShardStore(SlotOps):
    def __init__(self, shard_id: int = 0, shm_dir: str | None = None, max_request_bytes: int = 256 << 20,
                 log=None, max_lr: float = MAX_LR, max_grad_abs: float = MAX_GRAD_ABS,
                 storage: str = "shm", memory_budget: int = 0, member: int = 0):
        self.shard_id, self.member = shard_id, member   # member 0: the primary; k > 0: replica k
        self.shm_dir = shm_dir
        self.storage, self.memory_budget = storage, memory_budget  # disk-backed rows: disk.py
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


    # ---- the log -----------------------------------------------------------------------------
    def _next_lsn(self) -> int:
        """The lsn of the change about to be applied; refuses it first if the log cannot take it."""
        if self.log is not None:
            self.log.check_space()
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
                parts = {"rows": rec.blobs[i], **{f"state:{nm}": rec.blobs[i + 1 + k] for k, nm in enumerate(names)},
                         "dedup": rec.blobs[i + 1 + len(names)]}
                i += 2 + len(names)
                if fresh[slot]:
                    data[slot] = SlotImage.from_parts(ts, slot, parts)
            if data:  # the slot is already allocated here: overwrite it in place
                self._overwrite_slots(ts, data, rec.lsn)
        # KIND_DROP: a dropped slot that this store holds came back later by an INSTALL, which overwrites it


    # ---- disk-backed rows (disk.py) ---------------------------------------------------------
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


def _dtype_name(rows, ts: TableShard) -> str:
    arr = np.asarray(rows)
    if arr.dtype == np.float32:
        return "float32"
    if arr.dtype == np_dtype(ts.spec.dtype):
        return ts.spec.dtype
    raise InvalidArgument(f"table {ts.spec.name!r}: rows have dtype {arr.dtype}; expected float32 or the "
                          f"table's {ts.spec.dtype}")

