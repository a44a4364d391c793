"""Disk-backed shard rows: tables larger than RAM, with a memory budget per shard.

By default a shard's rows file lives in /dev/shm (shard.py). With `engram-mem up --storage
disk:/nvme/engram` (or a table's own `storage="disk:/path"`) the same file of slot frames lives on a
local disk instead, mapped MAP_SHARED exactly as before: gathers and the same-node tier read rows in
place, and the OS page cache keeps the pages that were read. What is new is only the bound:

    budget = PageBudget(512 << 20)      # bytes of this table's file the shard lets stay cached
    budget.attach(buffer)               # after the file grows (MADV_RANDOM: no read-ahead)
    budget.prefetch(buffer, local_rows) # before a gather: read the batch's missing pages at once
    budget.touched(buffer, local_rows)  # after every gather / import

PageBudget counts reads per 4 KiB page (a uint16 count and a bit per page: ~1/1300 of the file) and
tracks which pages it may have brought into memory (those kept at the last trim, plus every page
touched since). When those exceed the budget, it keeps the most-read pages up to half the budget
and drops the rest of the file from this process's mapping
(MADV_DONTNEED) and from the page cache (posix_fadvise DONTNEED, after msync if anything was
written). Counts then halve, so the hot set follows the traffic. The resident part of the file is
thus at most about the budget, whatever the table's size; `resident_bytes(path)` measures it (mincore).
Before a gather, `prefetch` asks the kernel (MADV_WILLNEED) for every page of the batch that is not
known to be in memory, so the disk serves a batch's misses together rather than one fault at a time.

Persistence is unchanged (lmdb snapshots of dirty slots); the disk file is a cache of the rows,
not their durable copy, and is deleted when the table is dropped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import threading

import numpy as np

PAGE = mmap.PAGESIZE


def parse_storage(value: str) -> str:
    """Validate a --storage value: 'shm' or 'disk:/absolute/dir' (returned normalized)."""
    if value in ("", "shm"):
        return "shm"
    if value.startswith("disk:"):
        path = value[5:]
        if not path or not os.path.isabs(path):
            raise ValueError(f"storage {value!r}: give an absolute directory, e.g. disk:/nvme/engram-mem")
        return "disk:" + os.path.normpath(path)
    raise ValueError(f"storage {value!r} must be 'shm' or 'disk:/absolute/dir'")


class PageBudget:
    def __init__(self, budget_bytes: int):
        self.budget = int(budget_bytes)   # 0 = unbounded (the page cache alone decides)
        self.counts = np.zeros(0, dtype=np.uint16)
        self.resident = np.zeros(0, dtype=bool)   # pages kept at the last trim or touched since
        self.n_resident = 0
        self.written = False
        self.trims = 0
        self._lock = threading.Lock()
        self._advised: set[int] = set()

    def attach(self, buffer) -> None:
        """Turn off read-ahead on the buffer's current mapping (rows are read at random)."""
        mm = buffer._mm
        if mm is not None and id(mm) not in self._advised:
            mm.madvise(mmap.MADV_RANDOM)
            self._advised = {id(mm)}

    def touched(self, buffer, local: np.ndarray, write: bool = False) -> None:
        """Count the pages that rows `local` (buffer row indices) live on; trim when over budget."""
        if local.size == 0:
            return
        pages = _pages(buffer, local)
        with self._lock:
            self._grow(-(-buffer.frames * buffer.frame_bytes // PAGE))
            np.add.at(self.counts, pages, 1)
            new = pages[~self.resident[pages]]
            if new.size:
                new = np.unique(new)
                self.resident[new] = True   # pages this shard may have brought into the page cache
                self.n_resident += int(new.size)
            self.written |= write
            if 0 < self.budget < self.n_resident * PAGE:
                self._trim(buffer)

    def prefetch(self, buffer, local: np.ndarray) -> None:
        """Before a gather: ask the kernel to read every page the rows need that may not be in memory
        (MADV_WILLNEED on each run of such pages), so the disk sees them all at once instead of one
        page fault at a time (measured here: ~3x faster gathers of cold Zipf rows)."""
        mm = buffer._mm
        if mm is None or local.size == 0:
            return
        pages = np.unique(_pages(buffer, local))
        with self._lock:
            if self.resident.size >= int(pages[-1]) + 1:
                pages = pages[~self.resident[pages]]
        if pages.size == 0:
            return
        breaks = np.nonzero(np.diff(pages) != 1)[0]
        starts = np.concatenate(([pages[0]], pages[breaks + 1]))
        stops = np.concatenate((pages[breaks], [pages[-1]])) + 1
        size = len(mm)
        for a, b in zip(starts.tolist(), stops.tolist()):
            length = min(b * PAGE, size) - a * PAGE
            if length > 0:
                mm.madvise(mmap.MADV_WILLNEED, a * PAGE, length)

    def _grow(self, n_pages: int) -> None:
        if self.counts.size < n_pages:
            extra = n_pages - self.counts.size
            self.counts = np.concatenate((self.counts, np.zeros(extra, np.uint16)))
            self.resident = np.concatenate((self.resident, np.zeros(extra, bool)))

    def trim(self, buffer) -> None:
        with self._lock:
            self._trim(buffer)

    def _trim(self, buffer) -> None:
        mm, fd = buffer._mm, getattr(buffer, "_fd", None)
        if mm is None or fd is None:
            return
        if self.written:
            mm.flush()  # dirty pages cannot be dropped from the page cache: write them first
            self.written = False
        n_pages = -(-len(mm) // PAGE)
        self._grow(n_pages)
        keep_pages = max(0, self.budget // 2 // PAGE)
        keep = np.zeros(n_pages, dtype=bool)
        if keep_pages:
            hot = np.nonzero(self.counts[:n_pages])[0]
            if hot.size > keep_pages:
                hot = hot[np.argpartition(self.counts[hot], -keep_pages)[-keep_pages:]]
            keep[hot] = True
        # Runs of pages to drop: starts where keep goes True -> False, ends where it goes False -> True.
        edges = np.diff(np.concatenate(([True], keep, [True])).astype(np.int8))
        starts, stops = np.nonzero(edges == -1)[0], np.nonzero(edges == 1)[0]
        size = len(mm)
        for a, b in zip(starts.tolist(), stops.tolist()):
            off, length = a * PAGE, min(b * PAGE, size) - a * PAGE
            if length > 0:
                mm.madvise(mmap.MADV_DONTNEED, off, length)
                os.posix_fadvise(fd, off, length, os.POSIX_FADV_DONTNEED)
        self.counts >>= 1
        self.resident[:] = False
        self.resident[:n_pages] = keep
        self.n_resident = int(keep.sum())
        self.trims += 1

    def close(self) -> None:
        self.counts = np.zeros(0, dtype=np.uint16)


def _pages(buffer, local: np.ndarray) -> np.ndarray:
    """The 4 KiB pages (of the buffer's file) that rows `local` touch, with repeats."""
    row_bytes = buffer.dim * buffer.dtype.itemsize
    start = local.astype(np.int64) * row_bytes
    pages = [start // PAGE, (start + row_bytes - 1) // PAGE]
    pages += [start // PAGE + k for k in range(1, -(-row_bytes // PAGE) - 1)] if row_bytes > PAGE else []
    return np.concatenate(pages)


# ---- measuring what is resident (tests and benchmarks) ---------------------------------------
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))


def resident_bytes(path: str) -> int:
    """Bytes of a file that are in the page cache now (mincore over a fresh read-only mapping)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ)
    try:
        arr = np.frombuffer(mm, dtype=np.uint8)
        addr = arr.__array_interface__["data"][0]   # a read-only mapping's address, via numpy
        n = -(-size // PAGE)
        vec = (ctypes.c_ubyte * n)()
        rc = _libc.mincore(ctypes.c_void_p(addr), size, vec)
        del arr
        if rc != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return int(np.count_nonzero(np.frombuffer(vec, dtype=np.uint8) & 1)) * PAGE
    finally:
        mm.close()


def drop_cache(path: str) -> None:
    """Drop a file's clean pages from the page cache (a cold start for benchmarks)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
