"""WriteAheadLog: a shard's log of accepted updates, appended before the update is acknowledged.

    log = WriteAheadLog("/data/engram-mem/shard-0001/wal", policy="process")
    log.append(lsn, KIND_PUSH, {"table": "t", ...}, [ids_bytes, grads_bytes])   # buffered
    await log.wait(lsn)                       # the group holding lsn is written (and fsynced)
    for rec in log.replay(after=snapshot_lsn): ...

Records are framed `[u32 length][u32 crc32c][payload]`, payload `[u64 lsn][u8 kind][u32 meta length]
[meta JSON][blobs...]`, the blob lengths listed in the meta. They go to segment files
`<first lsn:020d>.wal` that roll over at `segment_bytes`.

Group commit: appends only queue the record's buffers; one committer thread writes everything
queued with a single `writev` (and, under the `fsync` policy, one `fdatasync`), then wakes every
request of that group. While it writes, new appends queue for the next group, so the log never
serializes the push path on its own I/O.

Durability policies (per cluster):
    none     nothing is logged (updates since the last snapshot are lost when a shard dies)
    process  written to the OS before the acknowledgement: survives kill -9 of any process
    fsync    also fdatasync'ed before the acknowledgement: survives a machine crash

Recovery reads the segments in order. A torn record at the very end of the newest segment (the
process died mid-write: the record is cut short, or a machine crash left its last bytes
unwritten) is cut off; a bad record anywhere else, or one followed by more data, is corruption
and raises CorruptData naming the file and offset.
"""

from __future__ import annotations

import asyncio
import errno
import glob
import json
import logging
import os
import struct
import threading
from dataclasses import dataclass

import crc32c

from engram_mem.errors import CorruptData, InvalidArgument, ResourceExhausted

log = logging.getLogger("engram_mem.storage.wal")

POLICIES = ("none", "process", "fsync")
KIND_WRITE, KIND_PUSH, KIND_INSTALL, KIND_DROP = 1, 2, 3, 4
_FRAME = struct.Struct("<II")        # length of payload, crc32c of payload
_HEAD = struct.Struct("<QBI")        # lsn, kind, meta length


@dataclass
class Record:
    lsn: int
    kind: int
    meta: dict
    blobs: list[memoryview]


def _segment_name(first_lsn: int) -> str:
    return f"{first_lsn:020d}.wal"


class WriteAheadLog:
    def __init__(self, path: str, policy: str = "process", segment_bytes: int = 256 << 20):
        if policy not in POLICIES:
            raise InvalidArgument(f"durability policy {policy!r} is not one of {POLICIES}")
        self.path, self.policy, self.segment_bytes = path, policy, segment_bytes
        os.makedirs(path, exist_ok=True)
        self._cond = threading.Condition()
        self._queue: list[tuple[int, list]] = []      # (lsn, buffers) waiting for the committer
        self._waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future]] = []
        self.written_lsn = 0      # every record up to here is in the OS (and on disk under fsync)
        self.last_lsn = 0         # highest lsn appended
        self._fd = -1
        self._seg_bytes = 0
        self.bytes_since_truncate = 0
        self._closed = False
        self._error: BaseException | None = None
        self._stalled: OSError | None = None   # the disk is full: the committer retries, new updates are refused
        self._progress = 0                     # bytes of the group being written that are written
        self._thread: threading.Thread | None = None

    # ---- segments ----------------------------------------------------------------------------
    def segments(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.path, "*.wal")))

    def size_bytes(self) -> int:
        return sum(os.path.getsize(p) for p in self.segments())

    def _open_segment(self, first_lsn: int) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        p = os.path.join(self.path, _segment_name(first_lsn))
        self._fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._seg_bytes = os.fstat(self._fd).st_size
        if self.policy == "fsync":
            fsync_path(self.path)

    def start(self, next_lsn: int) -> None:
        """Begin appending (after replay): a fresh segment starting at next_lsn."""
        if self.policy == "none":
            return
        self.written_lsn = self.last_lsn = next_lsn - 1
        self._open_segment(next_lsn)
        self._thread = threading.Thread(target=self._commit_loop, name="engram-wal", daemon=True)
        self._thread.start()

    # ---- appending ---------------------------------------------------------------------------
    def append(self, lsn: int, kind: int, meta: dict, blobs=()) -> None:
        """Queue a record (caller holds the order: lsns are appended increasing)."""
        if self.policy == "none":
            self.last_lsn = self.written_lsn = lsn
            return
        blobs = [memoryview(b).cast("B") for b in blobs]
        meta = dict(meta, blobs=[b.nbytes for b in blobs])
        mj = json.dumps(meta, separators=(",", ":")).encode()
        head = _HEAD.pack(lsn, kind, len(mj)) + mj
        crc = crc32c.crc32c(head)
        for b in blobs:
            crc = crc32c.crc32c(b, crc)
        n = len(head) + sum(b.nbytes for b in blobs)
        with self._cond:
            if self._error is not None:
                raise self._error
            self._queue.append((lsn, [_FRAME.pack(n, crc), head, *blobs], _FRAME.size + n))
            self.last_lsn = lsn
            self._cond.notify()

    def _commit_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue and self._closed:
                    return
                group, self._queue = self._queue, []
            self._progress = 0
            try:
                while not self._write_group(group):  # the disk is full: wait for space, never drop a record
                    with self._cond:
                        if self._closed:
                            raise self._stalled
                        self._cond.wait(0.5)
            except BaseException as e:  # noqa: BLE001 - a failed log write fails the requests waiting on it
                log.exception("write-ahead log %s: write failed", self.path)
                with self._cond:
                    self._error = e
                self._wake(error=e)
                return
            with self._cond:
                self.written_lsn = group[-1][0]
                self._cond.notify_all()
            self._wake()

    def check_space(self) -> None:
        """Raise ResourceExhausted while the disk under the log is full (before an update is applied:
        a refused update changes nothing). Updates already accepted wait until space returns."""
        e = self._stalled
        if e is not None:
            raise ResourceExhausted(f"write-ahead log {self.path}: the disk is full ({e.strerror}); writes and "
                                    f"pushes are refused until space is freed there (reads go on)")

    def _write_group(self, group) -> bool:
        """Write the group from self._progress on; False if the disk filled (call again: it resumes)."""
        try:
            if self._progress == 0 and self._seg_bytes >= self.segment_bytes:
                self._open_segment(group[0][0])
            bufs = [b for _, parts, _ in group for b in parts]
            total = sum(n for _, _, n in group)
            while self._progress < total:  # writev may write less than asked (and takes at most IOV_MAX buffers)
                chunk, left = [], self._progress
                for b in bufs:
                    n = len(b) if isinstance(b, bytes) else b.nbytes
                    if left >= n:
                        left -= n
                        continue
                    chunk.append(memoryview(b)[left:] if left else b)
                    left = 0
                    if len(chunk) >= 512:
                        break
                self._progress += os.writev(self._fd, chunk)
            if self.policy == "fsync":
                os.fdatasync(self._fd)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            if self._stalled is None:
                log.error("write-ahead log %s: the disk is full (%s); refusing updates until space returns",
                          self.path, e.strerror)
            self._stalled = e
            return False
        if self._stalled is not None:
            log.warning("write-ahead log %s: space is back; updates are accepted again", self.path)
            self._stalled = None
        self._seg_bytes += total
        self.bytes_since_truncate += total
        return True

    def _wake(self, error: BaseException | None = None) -> None:
        with self._cond:
            ready = [w for w in self._waiters if error is not None or w[0] <= self.written_lsn]
            self._waiters = [w for w in self._waiters if w not in ready]
        for _, loop, fut in ready:
            loop.call_soon_threadsafe(_resolve, fut, error)

    async def wait(self, lsn: int) -> None:
        """Return once the record `lsn` is written under the policy (at once under `none`)."""
        if self.policy == "none":
            return
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cond:
            if self._error is not None:
                raise self._error
            if lsn <= self.written_lsn:
                return
            self._waiters.append((lsn, loop, fut))
        await fut

    def flush(self, timeout: float = 60.0) -> None:
        """Block until everything appended so far is written (from any thread but the committer)."""
        if self.policy == "none" or self._thread is None:
            return
        with self._cond:
            target = self.last_lsn
            if not self._cond.wait_for(lambda: self.written_lsn >= target or self._error is not None, timeout):
                raise TimeoutError(f"write-ahead log {self.path}: not written within {timeout}s")
            if self._error is not None:
                raise self._error

    # ---- recovery and truncation -------------------------------------------------------------
    def replay(self, after: int = 0):
        """Records with lsn > after, in order. Cuts a torn tail off the newest segment."""
        segs = self.segments()
        for i, p in enumerate(segs):
            nxt = int(os.path.basename(segs[i + 1])[:-4]) if i + 1 < len(segs) else None
            if nxt is not None and nxt <= after + 1:
                continue  # every record of this segment is <= after
            yield from _read_segment(p, after, last=(i == len(segs) - 1))

    def truncate_before(self, lsn: int) -> int:
        """Delete segments whose records are all below lsn (covered by a snapshot). Returns bytes freed."""
        segs = self.segments()
        freed = 0
        for i, p in enumerate(segs[:-1]):  # never the segment being written
            nxt = int(os.path.basename(segs[i + 1])[:-4])
            if nxt <= lsn:
                freed += os.path.getsize(p)
                os.unlink(p)
        self.bytes_since_truncate = max(0, self.bytes_since_truncate - freed)
        return freed

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _resolve(fut: asyncio.Future, error: BaseException | None) -> None:
    if not fut.done():
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)


def fsync_path(path: str) -> None:
    """fsync a file or directory by path (a directory: so a new or renamed entry in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_segment(path: str, after: int, last: bool):
    with open(path, "rb") as f:
        data = f.read()
    mv = memoryview(data)
    pos = 0
    while pos < len(data):
        bad, torn = None, False  # torn: what a process or machine dying mid-append leaves at the very end
        if pos + _FRAME.size > len(data):
            bad, torn = "a truncated record header", True
        else:
            n, crc = _FRAME.unpack_from(mv, pos)
            body = mv[pos + _FRAME.size: pos + _FRAME.size + n]
            if n < _HEAD.size:
                bad = f"a record of impossible length {n}"
                torn = not any(data[pos:])  # zeros past the end of what was written (a machine crash)
            elif body.nbytes < n:
                bad, torn = f"a truncated record ({body.nbytes} of {n} bytes)", True
            elif crc32c.crc32c(body) != crc:
                bad = "a record whose crc32c does not match"
                torn = pos + _FRAME.size + n == len(data)  # only the very last record can be half written
        if bad is not None:
            if last and torn:  # never acknowledged: the append did not complete
                log.warning("write-ahead log %s: cutting %d bytes at offset %d (%s)", path, len(data) - pos, pos, bad)
                os.truncate(path, pos)
                return
            raise CorruptData(f"write-ahead log segment {path} has {bad} at offset {pos} (not a torn end): "
                              f"the log is damaged; restore from a checkpoint")
        lsn, kind, mlen = _HEAD.unpack_from(body, 0)
        meta = json.loads(bytes(body[_HEAD.size:_HEAD.size + mlen]))
        off = _HEAD.size + mlen
        blobs = []
        for b in meta.pop("blobs"):
            blobs.append(body[off:off + b])
            off += b
        pos += _FRAME.size + n
        if lsn > after:
            yield Record(lsn, kind, meta, blobs)
