"""SlotOps: moving whole slots in and out of a ShardStore (a mixin of it; its state is the store's).

Re-sharding and replication copy slots out with the lsn of their cut (`copy_slots`,
`export_slots`), install them elsewhere (`add_slots`, `install_copy`), and drop them where
they left (`remove_slots`, `keep_only_slots`); snapshots copy slots (`snapshot_slots`) and
restores load them (`load_slot`); `import_rows` bulk-loads rows of a checkpoint.
"""

from __future__ import annotations

import numpy as np

from engram_mem.errors import InvalidArgument
from engram_mem.storage.frames import TableShard
from engram_mem.storage.slot_image import SlotImage
from engram_mem.storage.wal import KIND_DROP, KIND_INSTALL


class SlotOps:
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
                if data is not None and slot in data:  # optimizer state and keys move with the rows
                    data[slot].write(ts, slot, frame, self._ensure_state)
                    ts.dirty[slot] = True
                elif restore is None or not restore(ts, slot, frame, out):
                    spec.init_range(a, b, out=out)
                ts.frame_of[slot] = frame
        self._attach_budget(ts)

    def add_slots(self, name: str, data: dict[int, SlotImage]) -> int:
        """Receive slots moved from another shard (SlotImages). A slot this store already holds
        (copied before, and changed at its source since) is overwritten: rows, optimizer state and
        keys. Logged whole (an INSTALL record of each image's parts), so the slots survive this
        shard's death before its next snapshot; a restart holds them only if the cluster file gives
        it them."""
        ts = self._table(name)
        slots = np.array(sorted(data), dtype=np.int64)
        blobs, meta_slots = [], []
        for slot in slots.tolist():
            parts = data[slot].parts()
            blobs += [p for _, p in parts]
            meta_slots.append([slot, [k[6:] for k, _ in parts if k.startswith("state:")]])
        with self.order:
            lsn = self._next_lsn()
            held = ts.frame_of[slots] >= 0
            self._overwrite_slots(ts, {s: data[s] for s in slots[held].tolist()}, lsn)
            self._fill_slots(ts, slots[~held], data=data)
            ts.mod_lsn[slots] = lsn
            self._commit(lsn, KIND_INSTALL, {"t": name, "uid": ts.uid, "slots": meta_slots}, blobs)
        return lsn

    def export_slots(self, name: str, slots) -> dict[int, SlotImage]:
        """SlotImages (copies of rows, optimizer state and idempotency keys) of owned slots, for a move."""
        ts = self._table(name)
        out = {}
        with self.order, ts.lock:
            for slot in slots:
                if ts.frame_of[slot] < 0:
                    raise InvalidArgument(f"table {name!r}: shard {self.shard_id} does not own slot {slot}")
                out[int(slot)] = SlotImage.read(ts, int(slot))
        return out

    def copy_slots(self, name: str, slots) -> tuple[int, dict[int, SlotImage]]:
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

    def install_copy(self, name: str, data: dict[int, SlotImage], lsn: int) -> None:
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

    def snapshot_slots(self, name: str, slots: np.ndarray) -> tuple[int, list[tuple[int, list]]]:
        """A per-slot cut: (lsn, [(slot, SlotImage parts)]) copied under the order lock, for a SnapshotWriter."""
        ts = self._table(name)
        out = []
        with self.order, ts.lock:
            lsn = self.lsn
            for slot in slots.tolist():
                if ts.frame_of[slot] < 0:
                    continue
                out.append((slot, SlotImage.read(ts, slot).parts()))
                ts.dirty[slot] = False
        return lsn, out

    def load_slot(self, ts: TableShard, slot: int, frame: int, out: np.ndarray, lsn: int, parts: dict) -> None:
        """Fill an allocated slot from snapshot parts (SlotImage.parts, see snapshot.py); used by recovery."""
        SlotImage.from_parts(ts, slot, parts).write(ts, slot, frame, self._ensure_state)
        ts.slot_lsn[slot] = ts.mod_lsn[slot] = lsn

    def _overwrite_slots(self, ts: TableShard, data: dict[int, SlotImage], lsn: int) -> None:
        """Replace held slots by installed images (a move's re-copy, or an INSTALL record replayed)."""
        with ts.lock:
            for slot, img in data.items():
                img.write(ts, slot, int(ts.frame_of[slot]), self._ensure_state)
                ts.dirty[slot] = True
                ts.mod_lsn[slot] = lsn

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
