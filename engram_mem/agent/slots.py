"""Slots: the shared buffers a worker and its node's fetch agent exchange ids, rows and gradients in.

A slot is an anonymous memory file (memfd) the worker creates, sizes, seals against shrinking
and hands the agent once, over the agent's socket (SCM_RIGHTS). Both map it; nothing in it is
copied through the socket. Its memory goes when the last of the two closes it, so a killed
worker or agent leaves no file behind. Sealing matters: a mapping of a file that shrank would
fault (SIGBUS) in the agent on its next access, so the agent maps only sealed slots.

Layouts (byte offsets; each array starts on a 64-byte boundary):

    fetch of n ids, rows of R bytes:   ids int64[n] | uniq int64[n] | inverse int64[n] | rows [n, R]
    push of n ids, gradients of G bytes: ids int64[n] | grads [n, G]

The worker writes the ids (and gradients), the agent writes the distinct ids, the inverse and
the rows in place: from the shard's bytes (or the same-node tier's, or the node's cache) to
the worker's slot is the only copy on the agent's side.
"""

from __future__ import annotations

import fcntl
import mmap
import os

import numpy as np

from engram_mem.agent.protocol import MessageError

ALIGN = 64
MIN_SLOT_BYTES = 1 << 20
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def _up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def fetch_layout(n: int, row_bytes: int) -> tuple[int, int, int, int, int]:
    """(ids, uniq, inverse, rows, end) offsets of a fetch of n ids."""
    ids, uniq = 0, _up(8 * n)
    inverse = uniq + _up(8 * n)
    rows = inverse + _up(8 * n)
    return ids, uniq, inverse, rows, rows + _up(n * row_bytes)


def push_layout(n: int, grad_bytes: int) -> tuple[int, int, int]:
    """(ids, grads, end) offsets of a push of n ids."""
    grads = _up(8 * n)
    return 0, grads, grads + _up(n * grad_bytes)


def array(mm: mmap.mmap, dtype, offset: int, count: int, width: int | None = None) -> np.ndarray:
    """A view of count items (or [count, width]) of the slot at offset."""
    dtype = np.dtype(dtype)
    a = np.frombuffer(mm, dtype=dtype, count=count * (width or 1), offset=offset)
    return a if width is None else a.reshape(count, width)


class Slot:
    """The worker's side: one sealed memfd of `nbytes`, mapped read-write."""

    def __init__(self, index: int, nbytes: int):
        self.index = index
        self.nbytes = max(MIN_SLOT_BYTES, _up(nbytes))
        self.fd = os.memfd_create(f"engram-agent-slot-{index}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, self.nbytes)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, SEALS)
            self.mm = mmap.mmap(self.fd, self.nbytes)
        except BaseException:
            os.close(self.fd)
            raise
        self._fetch_views: tuple | None = None

    def fetch_views(self, n: int, dtype, dim: int, row_bytes: int) -> tuple:
        """(ids [n], distinct ids [n], rows [n, dim], inverse [n]) of a fetch of n ids in this slot,
        kept while fetches of the same shape reuse it (each decode step posts the same n), so a
        fetch and its answer slice them instead of making new arrays on the model's thread."""
        key = (n, np.dtype(dtype), dim)
        v = self._fetch_views
        if v is None or v[0] != key:
            ids_at, uniq_at, inv_at, rows_at, _ = fetch_layout(n, row_bytes)
            v = self._fetch_views = (key, (array(self.mm, np.int64, ids_at, n), array(self.mm, np.int64, uniq_at, n),
                                           array(self.mm, dtype, rows_at, n, dim), array(self.mm, np.int64, inv_at, n)))
        return v[1]

    def close(self) -> None:
        """Close the file; the mapping lives as long as arrays viewing it do."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def map_slot(fd: int, nbytes: int, max_bytes: int) -> mmap.mmap:
    """The agent's side: map a slot the worker sent, after checking it is as big as it says and
    sealed against shrinking. Closes fd either way."""
    try:
        if nbytes <= 0 or nbytes > max_bytes:
            raise MessageError(f"fetch agent: Slot: {nbytes} bytes is outside 1..{max_bytes} (the agent's "
                               f"slot limit)")
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError as e:
            raise MessageError(f"fetch agent: Slot: the descriptor is not a sealable memory file ({e})") from None
        if not seals & fcntl.F_SEAL_SHRINK:
            raise MessageError("fetch agent: Slot: the memory file is not sealed against shrinking "
                               "(F_SEAL_SHRINK); the agent maps only sealed slots")
        size = os.fstat(fd).st_size  # sealed: it stays at least this big
        if size < nbytes:
            raise MessageError(f"fetch agent: Slot: the file holds {size} bytes, the message says {nbytes}")
        return mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)
