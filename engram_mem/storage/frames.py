"""Frames: how one table's rows sit in a shard's memory.

A table's rows on a shard live in one growable buffer of frames, one frame per owned slot
(`slot_rows x dim`), in a file in shared memory so same-node workers can map it (_Buffer); a
seqlock word in shared memory tells those readers when frames move (_Layout); TableShard is the
table's frames, optimizer state, idempotency windows and per-slot lsns.

A shard owns a set of slots (contiguous row ranges, see table.py) of each table. A table's rows on
a shard live in one contiguous buffer of *frames*, one frame per owned slot, `slot_rows x dim` each:

    frame_of[slot] -> frame index (-1 if the slot is not owned)
    local row of global row r = frame_of[r // slot_rows] * slot_rows + r % slot_rows

The buffer is a file in shared memory (/dev/shm by default) mapped into the shard process, so a
worker on the same node can map it too and read rows without a request (the same-node tier: a
model of CXL load/store). Slots that leave free their frame (the pages are released with
MADV_REMOVE) and the frame is reused by the next slot that arrives; the buffer grows only when no
frame is free. Resident memory is the table bytes plus at most one partly used slot per table.
"""

from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from engram_mem.optim import OptimizerSpec, RowOptimizer
from engram_mem.storage.dedup import DedupWindow
from engram_mem.table import TableSpec


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


def huge_pages(path: str | None, mounts: str | None = None) -> str:
    """The `huge=` option of the tmpfs holding `path` ("never", "always", "within_size", "advise"),
    "" where the path is not on a tmpfs (disk, or anonymous memory). Rows in a tmpfs without huge
    pages sit on 4 KiB pages: a random-row gather then misses the TLB on nearly every row and ran
    1.5-1.8x slower here than on 2 MiB pages (docs/operations.md: mount /dev/shm with
    huge=within_size, or huge=advise: the shard asks for huge pages on its tables' mappings)."""
    if not path:
        return ""
    if mounts is None:
        try:
            with open("/proc/mounts") as f:
                mounts = f.read()
        except OSError:
            return ""
    path = os.path.abspath(path)
    best, option = "", ""
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        where = parts[1]
        if (path == where or path.startswith(where.rstrip("/") + "/")) and len(where) >= len(best):
            best = where
            opts = dict(o.partition("=")[::2] for o in parts[3].split(","))
            option = opts.get("huge", "never") if parts[2] == "tmpfs" else ""
    return option


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
        self._tmpfs = bool(huge_pages(path))
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
            if self._tmpfs:  # 2 MiB pages where the tmpfs allows them (huge=advise; huge_pages()); never on
                try:         # disk, whose page budget counts 4 KiB pages (large folios would overrun it)
                    mm.madvise(mmap.MADV_HUGEPAGE)
                except (AttributeError, OSError):
                    pass
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

