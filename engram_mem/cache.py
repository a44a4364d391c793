"""RowCache: a worker's hot rows of one table, bounded in bytes, with frequency-based admission.

N-gram lookups follow Zipf: a small hot set takes most of the traffic. The cache keeps the rows
whose ids were asked for most often recently (TinyLFU): a count-min sketch estimates each id's
frequency; a fetched row enters only if the cache has room or it is asked for more often than the
coldest row it would replace. Counters halve every `10 x capacity` recorded ids, so popularity
decays.

Everything is vectorized over a batch of ids; there are no per-row Python objects:
    keys   int64  [n]        cached ids, sorted (lookup by np.searchsorted)
    slots  int32  [n]        where each key's row lives in `rows`
    rows   dtype  [cap, dim] the rows

    cache = RowCache(capacity_bytes=64 << 20, dim=64, dtype=np.float32)
    hit, rows = cache.lookup(ids)          # ids sorted and distinct; rows of the hits
    cache.admit(miss_ids, miss_rows)       # after fetching the misses
    cache.invalidate(pushed_ids)           # a training worker after its own push
"""

from __future__ import annotations

import numpy as np

_MULT = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93],
                 dtype=np.uint64)


class CountMinSketch:
    def __init__(self, width: int, depth: int = 4):
        self.width = 1 << max(10, int(width - 1).bit_length())  # a power of two
        self.depth = depth
        self.table = np.zeros((depth, self.width), dtype=np.uint32)
        self.added = 0

    def _cells(self, ids: np.ndarray) -> np.ndarray:
        x = ids.astype(np.uint64)[None, :] * _MULT[: self.depth, None]     # [depth, n], wraps mod 2^64
        return (x >> np.uint64(64 - self.width.bit_length() + 1)).astype(np.int64)

    def add(self, ids: np.ndarray, counts: np.ndarray | None = None) -> None:
        if ids.size == 0:
            return
        inc = np.ones(ids.size, dtype=np.uint32) if counts is None else counts.astype(np.uint32)
        for d, cells in enumerate(self._cells(ids)):
            if ids.size * 16 < self.width:  # a small batch (decode): touch only its cells
                np.add.at(self.table[d], cells, inc)
            else:                           # a large batch (prefill): one pass over the row
                self.table[d] += np.bincount(cells, weights=inc, minlength=self.width).astype(np.uint32)
        self.added += int(ids.size if counts is None else counts.sum())

    def estimate(self, ids: np.ndarray) -> np.ndarray:
        if ids.size == 0:
            return np.zeros(0, dtype=np.uint32)
        cells = self._cells(ids)
        return np.min(self.table[np.arange(self.depth)[:, None], cells], axis=0)

    def halve(self) -> None:
        self.table >>= 1
        self.added //= 2


class RowCache:
    def __init__(self, capacity_bytes: int, dim: int, dtype, *, min_frequency: int = 1):
        self.dtype = np.dtype(dtype)
        self.dim = dim
        per_row = dim * self.dtype.itemsize + 12  # the row, its key and its slot
        self.capacity = max(0, int(capacity_bytes) // per_row)
        self.rows = np.empty((self.capacity, dim), dtype=self.dtype)
        self.keys = np.zeros(0, dtype=np.int64)
        self.slots = np.zeros(0, dtype=np.int32)
        self.free = np.arange(self.capacity - 1, -1, -1, dtype=np.int32)  # a stack of free slots
        self.n_free = self.capacity
        self.sketch = CountMinSketch(width=4 * max(self.capacity, 256))
        self.min_frequency = min_frequency
        self.stats = {"lookups": 0, "hits": 0, "admitted": 0, "rejected": 0, "evicted": 0, "invalidated": 0}

    def __len__(self) -> int:
        return int(self.keys.size)

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + self.capacity * 12

    def record(self, ids: np.ndarray, counts: np.ndarray | None = None) -> None:
        """Count accesses (distinct ids, with how often each was asked for in the batch)."""
        self.sketch.add(ids, counts)
        if self.sketch.added >= 10 * max(self.capacity, 256):
            self.sketch.halve()

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ids sorted and distinct -> (hit mask [n], rows of the hits [hits, dim])."""
        self.stats["lookups"] += int(ids.size)
        if self.keys.size == 0 or ids.size == 0:
            return np.zeros(ids.size, dtype=bool), self.rows[:0]
        pos = np.searchsorted(self.keys, ids)
        pos_c = np.minimum(pos, self.keys.size - 1)
        hit = self.keys[pos_c] == ids
        self.stats["hits"] += int(hit.sum())
        return hit, self.rows[self.slots[pos_c[hit]]]

    def admit(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Offer fetched rows (ids distinct, not cached). Frequent ones enter, evicting colder ones."""
        if self.capacity == 0 or ids.size == 0:
            return
        freq = self.sketch.estimate(ids)
        keep = freq >= self.min_frequency
        ids, rows, freq = ids[keep], rows[keep], freq[keep]
        order = np.argsort(-freq.astype(np.int64), kind="stable")       # hottest candidates first
        ids, rows, freq = ids[order], rows[order], freq[order]
        n_direct = min(self.n_free, ids.size)
        take_ids, take_rows = [ids[:n_direct]], [rows[:n_direct]]
        rest_ids, rest_rows, rest_f = ids[n_direct:], rows[n_direct:], freq[n_direct:]
        evict_pos = np.zeros(0, dtype=np.int64)
        if rest_ids.size and self.keys.size:
            # Pair the i-th hottest remaining candidate with the i-th coldest cached row: swap where hotter.
            cur_f = self.sketch.estimate(self.keys)
            m = min(rest_ids.size, self.keys.size)
            coldest = np.argpartition(cur_f, m - 1)[:m] if m < self.keys.size else np.arange(self.keys.size)
            coldest = coldest[np.argsort(cur_f[coldest], kind="stable")]
            wins = rest_f[:m] > cur_f[coldest]
            evict_pos = coldest[wins]
            take_ids.append(rest_ids[:m][wins])
            take_rows.append(rest_rows[:m][wins])
            self.stats["rejected"] += int(rest_ids.size - wins.sum())
        elif rest_ids.size:
            self.stats["rejected"] += int(rest_ids.size)
        if evict_pos.size:
            self._remove_positions(evict_pos)
            self.stats["evicted"] += int(evict_pos.size)
        new_ids = np.concatenate(take_ids)
        if new_ids.size == 0:
            return
        new_rows = np.concatenate(take_rows)
        slots = self.free[self.n_free - new_ids.size:self.n_free][::-1].copy()
        self.n_free -= new_ids.size
        self.rows[slots] = new_rows
        order = np.argsort(new_ids)
        new_ids, slots = new_ids[order], slots[order]
        at = np.searchsorted(self.keys, new_ids)
        self.keys = np.insert(self.keys, at, new_ids)
        self.slots = np.insert(self.slots, at, slots)
        self.stats["admitted"] += int(new_ids.size)

    def invalidate(self, ids: np.ndarray) -> int:
        """Drop these ids (e.g. rows this worker just pushed gradients for). Returns how many were cached."""
        if self.keys.size == 0 or ids.size == 0:
            return 0
        ids = np.unique(ids)
        pos = np.searchsorted(self.keys, ids)
        pos_c = np.minimum(pos, self.keys.size - 1)
        found = pos_c[self.keys[pos_c] == ids]
        self._remove_positions(found)
        self.stats["invalidated"] += int(found.size)
        return int(found.size)

    def clear(self) -> None:
        self._remove_positions(np.arange(self.keys.size))

    def _remove_positions(self, pos: np.ndarray) -> None:
        if pos.size == 0:
            return
        freed = self.slots[pos]
        self.free[self.n_free:self.n_free + freed.size] = freed
        self.n_free += freed.size
        mask = np.ones(self.keys.size, dtype=bool)
        mask[pos] = False
        self.keys, self.slots = self.keys[mask], self.slots[mask]

    @property
    def hit_rate(self) -> float:
        return self.stats["hits"] / self.stats["lookups"] if self.stats["lookups"] else 0.0
