"""ReplyBuffers: the arrays a gather returns when the caller gave no out=, reused once freed.

    pool = ReplyBuffers(keep_bytes=256 << 20)
    rows = pool.empty((65536, 256), np.float32)   # a numpy array like np.empty's
    del rows                                      # its memory goes back to the pool, pages and all

A large array fresh from the allocator is fresh pages: the kernel zeroes each one on first touch
(and on a VM that hands freed memory back to its host, the host backs it again). Here that cost
more CPU than receiving the rows themselves (bench/bench_data_plane.py: the client's CPU per GB,
with and without out=). So a gather's own array is carved from a block this pool keeps; when the
caller drops the last reference to it (its views and torch tensors made with from_numpy count),
the block comes back and the next gather of about that size writes into pages that are already
there. What the caller can see is an ordinary C-contiguous writeable numpy array that no one else
writes to while any reference to it lives.

Blocks are sized in powers of two from MIN_BYTES (a block's untouched tail costs no memory);
smaller arrays come from np.empty, whose allocator keeps small blocks itself. At most keep_bytes
of free blocks are kept (the oldest go first); keep_bytes=0 turns the pool off.
"""

from __future__ import annotations

import threading

import numpy as np

MIN_BYTES = 1 << 20
KEEP_BYTES = 256 << 20


class _Lease:
    """The base object of an array carved from a block: the block goes back when this dies."""

    __slots__ = ("__array_interface__", "_block", "_pool")

    def __init__(self, pool: "ReplyBuffers", block: np.ndarray, shape: tuple, dtype: np.dtype):
        self._pool, self._block = pool, block
        self.__array_interface__ = {"data": (block.ctypes.data, False), "shape": shape,
                                    "typestr": dtype.str, "descr": dtype.descr, "version": 3}

    def __del__(self):
        try:
            self._pool._give_back(self._block)
        except Exception:  # noqa: BLE001 - interpreter shutdown: the block is freed with everything else
            pass


class ReplyBuffers:
    def __init__(self, keep_bytes: int = KEEP_BYTES):
        self.keep_bytes = int(keep_bytes)
        self._free: list[np.ndarray] = []   # free blocks, in the order they came back (at most keep_bytes)
        self._held = 0
        self._lock = threading.Lock()
        self.reused = self.fresh = 0        # arrays carved from a kept block / from a new one

    def empty(self, shape: tuple, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        shape = tuple(int(s) for s in shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if self.keep_bytes <= 0 or nbytes < MIN_BYTES or dtype.hasobject:
            return np.empty(shape, dtype)
        size = 1 << (nbytes - 1).bit_length()
        block = None
        with self._lock:
            for i in range(len(self._free) - 1, -1, -1):  # the most recently freed: its pages are warmest
                if self._free[i].nbytes == size:
                    block = self._free.pop(i)
                    self._held -= size
                    self.reused += 1
                    break
            else:
                self.fresh += 1
        if block is None:
            block = np.empty(size, np.uint8)
        return np.asarray(_Lease(self, block, shape, dtype))

    def _give_back(self, block: np.ndarray) -> None:
        if block.nbytes > self.keep_bytes:
            return
        with self._lock:
            self._free.append(block)
            self._held += block.nbytes
            while self._held > self.keep_bytes:  # the oldest go back to the allocator
                self._held -= self._free.pop(0).nbytes

    def held_bytes(self) -> int:
        with self._lock:
            return self._held
