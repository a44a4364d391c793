"""SlotImage: one slot's whole content (rows, optimizer state, idempotency keys), in one encoding.

A slot leaves a shard and arrives elsewhere in four ways: moved to another shard (the object
store), copied to a replica, logged whole (an INSTALL record of the write-ahead log) and saved in
a snapshot. All four carry a SlotImage; the log and snapshots store its `parts()`:

    [("rows", rows), ("state:<name>", state) for each optimizer state in name order, ("dedup", bytes)]

and read it back with `from_parts`, which checks the sizes against the table.

    img = SlotImage.read(ts, slot)                 # a copy of an owned slot (caller holds ts.lock)
    img.write(ts, slot, frame, ensure_state)       # into a frame: rows, state (or fresh), keys
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from engram_mem.errors import InvalidArgument
from engram_mem.storage import dedup as dedup_codec


@dataclass
class SlotImage:
    rows: np.ndarray                                        # [slot rows, storage dim], the table's storage dtype
    state: dict[str, np.ndarray] = field(default_factory=dict)  # optimizer state by name; {} = none yet
    dedup: dict = field(default_factory=dict)               # DedupWindow.export() of this slot

    @classmethod
    def read(cls, ts, slot: int) -> "SlotImage":
        """A copy of owned slot `slot` of TableShard ts."""
        frame = int(ts.frame_of[slot])
        a, b = ts.spec.slot_range(int(slot))
        lo = frame * ts.spec.slot_rows
        return cls(ts.rows[lo: lo + b - a].copy(),
                   {k: v[lo: lo + b - a].numpy().copy() for k, v in sorted(ts.state.items())},
                   ts.dedup.export(np.array([int(slot)])))

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + sum(v.nbytes for v in self.state.values())

    def parts(self) -> list[tuple[str, np.ndarray | bytes]]:
        return ([("rows", np.ascontiguousarray(self.rows))] +
                [(f"state:{k}", np.ascontiguousarray(v)) for k, v in sorted(self.state.items())] +
                [("dedup", dedup_codec.encode(self.dedup))])

    @classmethod
    def from_parts(cls, ts, slot: int, parts: dict) -> "SlotImage":
        """Decode parts (name -> bytes-like) of slot `slot` of TableShard ts; state the table's
        optimizer does not keep is ignored."""
        a, b = ts.spec.slot_range(int(slot))
        n = b - a
        rows = np.frombuffer(parts["rows"], dtype=ts.spec.storage_dtype)
        if rows.size != n * ts.spec.storage_dim:
            raise InvalidArgument(f"table {ts.spec.name!r} slot {slot}: the image holds {rows.size} values, "
                                  f"the table's slot needs {n * ts.spec.storage_dim}")
        state = {}
        names = [k[6:] for k in parts if k.startswith("state:") and k[6:] in ts.optimizer.state_names]
        if names:
            ref = ts.optimizer.init_state(1, ts.spec.dim)
            for nm in names:
                state[nm] = np.frombuffer(parts["state:" + nm], dtype=ref[nm].numpy().dtype).reshape(
                    (n,) + tuple(ref[nm].shape[1:]))
        return cls(rows.reshape(n, ts.spec.storage_dim), state, dedup_codec.decode(parts["dedup"]))

    def write(self, ts, slot: int, frame: int, ensure_state) -> None:
        """Make frame `frame` of ts hold this image as slot `slot` (caller holds ts.lock).
        ensure_state(ts) allocates optimizer state; a table that keeps state and gets an image
        without any starts the slot's state fresh."""
        a, b = ts.spec.slot_range(int(slot))
        lo = frame * ts.spec.slot_rows
        ts.rows[lo: lo + b - a] = self.rows
        if self.state:
            ensure_state(ts)
            for k, v in self.state.items():
                ts.state[k][lo: lo + b - a] = torch.from_numpy(np.array(v))
        elif ts.state:
            for k, v in ts.optimizer.init_state(b - a, ts.spec.dim).items():
                ts.state[k][lo: lo + b - a] = v
        ts.dedup.install(np.array([int(slot)]), self.dedup)
