"""RowCache: a worker's hot rows of one table, bounded in bytes, with frequency-based admission.

N-gram lookups follow Zipf: a small hot set takes most of the traffic. The cache keeps the rows
whose ids were asked for most often recently (TinyLFU): a count-min sketch estimates each id's
frequency; a fetched row enters only if the cache has room or it is asked for more often than the
coldest of a random sample of cached rows it would replace (sampled eviction, as in Redis's
approximated LFU: every operation costs O(batch), never O(cache)). Counters halve every
`10 x capacity` recorded ids, so popularity decays.

Everything is vectorized over a batch of ids; there are no per-row Python objects. An
open-addressing hash index (numpy arrays, linear probing, vectorized over the batch) maps an id to
the slot of `rows [cap, dim]` that holds it, so lookups, admissions and invalidations cost O(batch).

    cache = RowCache(capacity_bytes=64 << 20, dim=64, dtype=np.float32)
    hit, rows = cache.lookup(ids)          # ids distinct; rows of the hits
    cache.admit(miss_ids, miss_rows)       # after fetching the misses
    cache.invalidate(pushed_ids)           # a training worker after its own push
"""

from __future__ import annotations

import threading

import numpy as np

SAMPLE = 4  # cached rows sampled as eviction candidates per row offered

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


_EMPTY, _TOMB = -1, -2   # hash-index cells: never used / key removed
_WINDOW = 8             # index cells looked at per probe round
_OFFSETS = np.arange(_WINDOW, dtype=np.int64)
_OVERHEAD = 4 * 12 + 20  # bytes per row beyond the row: up to 4 index cells (id, slot) and its slot maps


class RowCache:
    def __init__(self, capacity_bytes: int, dim: int, dtype, *, min_frequency: int = 1):
        self.dtype = np.dtype(dtype)
        self.dim = dim
        self.capacity_bytes = int(capacity_bytes)
        per_row = dim * self.dtype.itemsize + _OVERHEAD
        self.capacity = max(0, int(capacity_bytes) // per_row)
        self.rows = np.empty((self.capacity, dim), dtype=self.dtype)
        # Open-addressing hash index, linear probing, at most half full (plus tombstones up to a quarter).
        self._bits = max(4, (2 * max(self.capacity, 1) - 1).bit_length())
        self._mask = (1 << self._bits) - 1
        self._hkeys = np.full(1 << self._bits, _EMPTY, dtype=np.int64)  # id in each cell
        self._hslot = np.zeros(1 << self._bits, dtype=np.int32)         # its row slot
        self._tombs = 0
        self._slot_key = np.full(self.capacity, _EMPTY, dtype=np.int64)  # id held by each slot
        self._slot_cell = np.zeros(self.capacity, dtype=np.int64)        # its index cell
        self.free = np.arange(self.capacity - 1, -1, -1, dtype=np.int32)  # a stack of free slots
        self.n_free = self.capacity
        self.sketch = CountMinSketch(width=4 * max(self.capacity, 256))
        self.min_frequency = min_frequency
        self.stats = {"lookups": 0, "hits": 0, "admitted": 0, "rejected": 0, "evicted": 0, "invalidated": 0,
                      "stale_skipped": 0}
        # Each invalidate() bumps the generation. A fetch notes it before it reads (peek) and offers its
        # rows with record_and_admit(..., noted): if a push invalidated rows in between, the fetched
        # copy may predate that push, so none of it is admitted.
        self.generation = 0
        self.admissions = 0  # admit() calls that cached rows: a fetch that saw none since its lookup skips a re-check
        self._lock = threading.RLock()
        self._rng = np.random.default_rng(0)

    def __len__(self) -> int:
        return self.capacity - self.n_free

    @property
    def nbytes(self) -> int:
        return (self.rows.nbytes + self._hkeys.nbytes + self._hslot.nbytes + self._slot_key.nbytes
                + self._slot_cell.nbytes + self.free.nbytes)

    @property
    def keys(self) -> np.ndarray:
        """The cached ids, sorted (introspection; O(capacity))."""
        with self._lock:
            return np.sort(self._slot_key[self._slot_key >= 0])

    # ---- the hash index ----------------------------------------------------------------------
    def _home(self, ids: np.ndarray) -> np.ndarray:
        """Fibonacci hashing: the top bits of id x 2^64/phi."""
        h = ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        return (h >> np.uint64(64 - self._bits)).astype(np.int64)

    def _find(self, ids: np.ndarray) -> np.ndarray:
        """Index cell of each id, -1 where not cached. Each round looks at a window of _WINDOW cells
        per id: an id's probe ends at its key or at the first never-used cell."""
        cell = self._home(ids)
        out = np.full(ids.size, -1, dtype=np.int64)
        todo = np.arange(ids.size)
        while todo.size:
            win = (cell[todo, None] + _OFFSETS) & self._mask                  # [n, W]
            k = self._hkeys[win]
            match = k == ids[todo, None]
            stop = match | (k == _EMPTY)
            ended = stop.any(axis=1)
            at = stop.argmax(axis=1)
            rows = np.arange(todo.size)
            found = ended & match[rows, at]
            out[todo[found]] = win[rows[found], at[found]]
            cell[todo] = (cell[todo] + _WINDOW) & self._mask
            todo = todo[~ended]
        return out

    def _insert(self, ids: np.ndarray, slots: np.ndarray) -> None:
        """Index ids (distinct, not cached) at row slots: each takes the first free cell of its probe."""
        cell = self._home(ids)
        todo = np.arange(ids.size)
        while todo.size:
            win = (cell[todo, None] + _OFFSETS) & self._mask
            k = self._hkeys[win]
            open_ = (k == _EMPTY) | (k == _TOMB)
            has = open_.any(axis=1)
            at = open_.argmax(axis=1)
            target = win[np.arange(todo.size), at]
            cand = np.nonzero(has)[0]
            taken = np.zeros(todo.size, dtype=bool)
            if cand.size:  # several ids may want one cell: the first of them takes it
                _, first = np.unique(target[cand], return_index=True)
                won = cand[first]
                w, c = todo[won], target[won]
                self._tombs -= int((self._hkeys[c] == _TOMB).sum())
                self._hkeys[c] = ids[w]
                self._hslot[c] = slots[w]
                self._slot_key[slots[w]] = ids[w]
                self._slot_cell[slots[w]] = c
                taken[won] = True
            # no free cell in the window: move past it; lost a cell to another id: retry from that cell
            cell[todo] = np.where(has, target, (cell[todo] + _WINDOW) & self._mask)
            todo = todo[~taken]

    def _remove_slots(self, slots: np.ndarray) -> None:
        if slots.size == 0:
            return
        self._hkeys[self._slot_cell[slots]] = _TOMB
        self._tombs += int(slots.size)
        self._slot_key[slots] = _EMPTY
        self.free[self.n_free:self.n_free + slots.size] = slots
        self.n_free += int(slots.size)
        if self._tombs > (self._mask + 1) // 4:  # rebuild the index without tombstones
            live = np.nonzero(self._slot_key >= 0)[0].astype(np.int32)
            self._hkeys[:] = _EMPTY
            self._tombs = 0
            self._insert(self._slot_key[live], live)

    # ---- API ---------------------------------------------------------------------------------
    def peek(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """lookup() without counting the access: (hit mask, rows of the hits, noted). A fetch that
        answers before it books (the fetch agent) counts the access afterwards with
        record_and_admit(..., noted), off the path of the rows."""
        with self._lock:
            return (*self.lookup(ids), (self.generation, self.admissions))

    def record_and_admit(self, asked: np.ndarray, ids: np.ndarray, rows: np.ndarray, noted: tuple[int, int]) -> None:
        """record(asked), then admit(ids, rows) as of the peek() that gave `noted`: nothing enters if an
        invalidate came since; and if no other fetch admitted rows since, the misses are known uncached."""
        with self._lock:
            self.record(asked)
            generation, admissions = noted
            if generation != self.generation:
                self.stats["stale_skipped"] += int(ids.size)
                return
            self._admit(np.asarray(ids, dtype=np.int64), rows, known_new=admissions == self.admissions)

    def record(self, ids: np.ndarray, counts: np.ndarray | None = None) -> None:
        """Count accesses (distinct ids, optionally with a count each)."""
        with self._lock:
            self.sketch.add(ids, counts)
            if self.sketch.added >= 10 * max(self.capacity, 256):
                self.sketch.halve()

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ids distinct -> (hit mask [n], rows of the hits [hits, dim])."""
        with self._lock:
            self.stats["lookups"] += int(ids.size)
            if len(self) == 0 or ids.size == 0:
                return np.zeros(ids.size, dtype=bool), self.rows[:0]
            cell = self._find(np.asarray(ids, dtype=np.int64))
            hit = cell >= 0
            self.stats["hits"] += int(hit.sum())
            return hit, self.rows[self._hslot[cell[hit]]]

    def admit(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Offer fetched rows (ids distinct, not cached). Frequent ones enter, evicting colder ones.
        A fetch that may overlap pushes offers its misses with record_and_admit() instead."""
        with self._lock:
            self._admit(np.asarray(ids, dtype=np.int64), rows)

    def _admit(self, ids: np.ndarray, rows: np.ndarray, known_new: bool = False) -> None:
        if self.capacity == 0 or ids.size == 0:
            return
        if len(self) and not known_new:  # another fetch may have admitted some of them since this one looked
            new = self._find(ids) < 0
            ids, rows = ids[new], rows[new]
        freq = self.sketch.estimate(ids)
        keep = freq >= self.min_frequency
        ids, rows, freq = ids[keep], rows[keep], freq[keep]
        order = np.argsort(-freq.astype(np.int64), kind="stable")       # hottest candidates first
        ids, rows, freq = ids[order], rows[order], freq[order]
        n_direct = min(self.n_free, ids.size)
        take_ids, take_rows = [ids[:n_direct]], [rows[:n_direct]]
        rest_ids, rest_rows, rest_f = ids[n_direct:], rows[n_direct:], freq[n_direct:]
        if rest_ids.size and len(self):
            # Victims are the coldest of a random sample of cached rows (SAMPLE per candidate), so an
            # admission costs O(batch), not O(cache). Pair the i-th hottest remaining candidate with
            # the i-th coldest sampled row: swap where the candidate is hotter.
            sample = np.unique(self._rng.integers(0, self.capacity, SAMPLE * rest_ids.size))
            sample = sample[self._slot_key[sample] >= 0]
            cur_f = self.sketch.estimate(self._slot_key[sample])
            m = min(rest_ids.size, sample.size)
            coldest = np.argpartition(cur_f, m - 1)[:m] if m < sample.size else np.arange(sample.size)
            coldest = coldest[np.argsort(cur_f[coldest], kind="stable")]
            wins = rest_f[:m] > cur_f[coldest]
            victims = sample[coldest[wins]].astype(np.int32)
            self._remove_slots(victims)
            self.stats["evicted"] += int(victims.size)
            take_ids.append(rest_ids[:m][wins])
            take_rows.append(rest_rows[:m][wins])
            self.stats["rejected"] += int(rest_ids.size - wins.sum())
        elif rest_ids.size:
            self.stats["rejected"] += int(rest_ids.size)
        new_ids = np.concatenate(take_ids)
        if new_ids.size == 0:
            return
        slots = self.free[self.n_free - new_ids.size:self.n_free][::-1].copy()
        self.n_free -= new_ids.size
        self.rows[slots] = np.concatenate(take_rows)
        self._insert(new_ids, slots)
        self.admissions += 1
        self.stats["admitted"] += int(new_ids.size)

    def invalidate(self, ids: np.ndarray) -> int:
        """Drop these ids (e.g. rows this worker just pushed gradients for). Returns how many were cached."""
        with self._lock:
            self.generation += 1
            if len(self) == 0 or ids.size == 0:
                return 0
            cell = self._find(np.unique(np.asarray(ids, dtype=np.int64)))
            slots = self._hslot[cell[cell >= 0]]
            self._remove_slots(slots)
            self.stats["invalidated"] += int(slots.size)
            return int(slots.size)

    def clear(self) -> None:
        with self._lock:
            self.generation += 1
            self._remove_slots(np.nonzero(self._slot_key >= 0)[0].astype(np.int32))

    @property
    def hit_rate(self) -> float:
        return self.stats["hits"] / self.stats["lookups"] if self.stats["lookups"] else 0.0
