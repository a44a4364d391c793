"""DedupWindow: which (client, sequence number) keys a table's slots have already applied.

Every Write and Push carries an idempotency key: the client's id and a per-client sequence number
(one per request; its parts on several shards share it). A retried request, or the part of one
that was routed again after a slot moved, must not be applied twice. So the memory is per
*slot*: for each client, each slot keeps the highest sequence number applied to it and a 64-bit
window of the ones just below it (the anti-replay window of IPsec):

    high[c, slot]   highest seq of client c applied to the slot (0: none)
    mask[c, slot]   bit d set: seq high - d was applied, for d < 64

A retry checks each of its slots: rows in slots that applied the key are skipped (answered as
applied), the others are applied. A seq 64 or more below a slot's newest is refused with
SequenceTooOld: it can't be told apart; the client keeps fewer than 64 requests in flight, so a
live client never gets there. The window moves with its slots (export/install) when a table is
re-sharded, is saved in snapshots, and is rebuilt by log replay.

    w = DedupWindow(n_slots=4096)
    done = w.applied("client-a", 17, slots)        # bool per entry of `slots`
    w.mark("client-a", 17, np.unique(slots))
"""

from __future__ import annotations

import numpy as np

from engram_mem.errors import InvalidArgument, SequenceTooOld

WINDOW = 64
MAX_CLIENTS = 4096  # per table; the least recently seen client is forgotten beyond this


class DedupWindow:
    def __init__(self, n_slots: int, max_clients: int = MAX_CLIENTS):
        self.n_slots, self.max_clients = n_slots, max_clients
        self.rows: dict[str, int] = {}           # client id -> row of high/mask
        self.last_seen: dict[str, int] = {}      # client id -> a counter, for eviction
        self.high = np.zeros((0, n_slots), dtype=np.int64)
        self.mask = np.zeros((0, n_slots), dtype=np.uint64)
        self._tick = 0

    def _row(self, client: str, create: bool) -> int | None:
        r = self.rows.get(client)
        if r is None and create:
            if len(self.rows) >= self.max_clients:
                old = min(self.last_seen, key=self.last_seen.get)
                r = self.rows.pop(old)
                del self.last_seen[old]
                self.high[r] = 0
                self.mask[r] = 0
            else:
                r = len(self.rows)
                if r >= self.high.shape[0]:  # grow by doubling
                    cap = max(4, 2 * self.high.shape[0])
                    self.high = np.concatenate([self.high, np.zeros((cap - self.high.shape[0], self.n_slots), np.int64)])
                    self.mask = np.concatenate([self.mask, np.zeros((cap - self.mask.shape[0], self.n_slots), np.uint64)])
            self.rows[client] = r
        if r is not None:
            self._tick += 1
            self.last_seen[client] = self._tick
        return r

    def applied(self, client: str, seq: int, slots: np.ndarray) -> np.ndarray:
        """bool per entry of `slots`: has (client, seq) been applied to that slot?"""
        if seq <= 0:
            raise InvalidArgument(f"sequence number must be positive, got {seq}")
        r = self._row(client, create=False)
        if r is None or slots.size == 0:
            return np.zeros(slots.size, dtype=bool)
        d = self.high[r, slots] - seq
        if bool((d >= WINDOW).any()):
            raise SequenceTooOld(f"client {client!r} request {seq} is {int(d.max())} requests behind the newest "
                                 f"one applied to its rows; it cannot be told whether it was applied (window "
                                 f"{WINDOW}); send it as a new request if it should be")
        bit = (self.mask[r, slots] >> np.clip(d, 0, WINDOW - 1).astype(np.uint64)) & np.uint64(1)
        return (d >= 0) & (bit == 1)

    def mark(self, client: str, seq: int, slots: np.ndarray) -> None:
        """Record (client, seq) as applied to distinct `slots`."""
        if slots.size == 0:
            return
        r = self._row(client, create=True)
        h, m = self.high[r, slots], self.mask[r, slots]
        ahead = seq > h
        shift = np.clip(seq - h, 0, WINDOW).astype(np.uint64)
        moved = np.where(shift >= WINDOW, np.uint64(0), m << np.minimum(shift, np.uint64(WINDOW - 1)))
        back = np.clip(h - seq, 0, WINDOW - 1).astype(np.uint64)
        self.mask[r, slots] = np.where(ahead, moved | np.uint64(1), m | (np.uint64(1) << back))
        self.high[r, slots] = np.where(ahead, seq, h)

    # ---- moving with slots -------------------------------------------------------------------
    def export(self, slots: np.ndarray) -> dict:
        """The window of `slots` for every client that touched them: {client: (high[k], mask[k])}."""
        out = {}
        for client, r in self.rows.items():
            h = self.high[r, slots]
            if bool((h > 0).any()):
                out[client] = (h.copy(), self.mask[r, slots].copy())
        return out

    def install(self, slots: np.ndarray, data: dict) -> None:
        """Replace the window of `slots` by exported data (clients absent from it: nothing applied)."""
        if slots.size == 0:
            return
        self.high[:, slots] = 0
        self.mask[:, slots] = 0
        for client, (h, m) in data.items():
            r = self._row(client, create=True)
            self.high[r, slots] = h
            self.mask[r, slots] = m

    def clear(self, slots: np.ndarray) -> None:
        self.high[:, slots] = 0
        self.mask[:, slots] = 0


def encode(data: dict) -> bytes:
    """Exported window of ONE slot ({client: (high, mask)} with scalars) as bytes, for snapshots."""
    clients = sorted(data)
    names = "\n".join(clients).encode()
    high = np.array([int(np.asarray(data[c][0]).reshape(-1)[0]) for c in clients], dtype="<i8")
    mask = np.array([int(np.asarray(data[c][1]).reshape(-1)[0]) for c in clients], dtype="<u8")
    return len(clients).to_bytes(4, "little") + len(names).to_bytes(4, "little") + names + high.tobytes() + mask.tobytes()


def decode(buf) -> dict:
    buf = bytes(buf)
    n = int.from_bytes(buf[:4], "little")
    ln = int.from_bytes(buf[4:8], "little")
    clients = buf[8:8 + ln].decode().split("\n") if n else []
    off = 8 + ln
    high = np.frombuffer(buf, "<i8", n, off)
    mask = np.frombuffer(buf, "<u8", n, off + 8 * n)
    return {c: (np.array([high[i]]), np.array([mask[i]], dtype=np.uint64)) for i, c in enumerate(clients)}
