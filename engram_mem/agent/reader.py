"""AgentReader: a worker's read path through its node's fetch agent (the default of ClusterRows).

    reader = AgentReader(client, cache_bytes={"engram.l1": 256 << 20})
    fut = reader.fetch_async("engram.l1", ids)    # ids copied into a shared slot; one small message
    uniq, rows, inverse = fut.result()            # views of the slot: valid until fut.release()
    fut.release()
    reader.push_async("engram.l1", uniq, grads, lr=..., step=...).result()

What runs in the worker's process: copying ids (and gradients) into a slot, one message per
request, reading the replies. No gRPC, no event loop, no thread, no cache bookkeeping: replies
are read by whichever call waits for one (result(), done(), a slot wanted), so nothing of the
read path takes the model's interpreter between those calls. The agent (service.py) does the
rest with its own interpreter and cores.

The interface is RowFetcher's (engram_mem/worker/fetcher.py), so ClusterRows takes either:
fetch_async / fetch / push_async / summary / clear_caches / close. A fetch result's arrays view
the slot it arrived in and stay valid until release() (fetch() copies and releases at once).

Failures: if the agent dies (kill -9, its node's Ray restarting it), the next read of the socket
sees it; the reader reconnects to the restarted agent (same name) until the client's
retry_timeout, hands it every slot again and re-sends every request not yet answered, in order,
pushes with their own idempotency keys: a fetch is answered, a push applied once, and the step
does not fail. Past the deadline, fetches end Unavailable and pushes MaybeApplied (retry with
key=e.key), as the client's own pushes do.
"""

from __future__ import annotations

import collections
import logging
import select
import socket
import threading
import time
import uuid

import numpy as np

from engram_mem.agent import protocol as P
from engram_mem.agent.slots import Slot, fetch_layout, push_layout
from engram_mem.agent.slots import array as slot_array
from engram_mem.errors import InvalidArgument, MaybeApplied, ReadOnlyTable, Unavailable
from engram_mem.errors import _Unresolved

log = logging.getLogger("engram_mem.agent.reader")

MAX_PUSHES_IN_FLIGHT = 24   # under half the shards' dedup window (storage/dedup.py)
POLL_S = 0.02


class AgentFuture:
    """A fetch or push sent to the agent. result() reads replies until this one's arrives."""

    def __init__(self, reader: "AgentReader", rid: int, kind: str, table: str, slot: Slot, decode=None,
                 key: tuple | None = None):
        self._reader, self.rid, self.kind, self.table = reader, rid, kind, table
        self.slot, self._decode, self.key = slot, decode, key
        self._done = self._released = self.sent = False
        self._value = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        if not self._done:
            self._reader._poll()
        return self._done

    def result(self, timeout: float | None = None):
        self._reader._wait(self, timeout)
        if self._error is not None:
            raise self._error
        return self._value

    def exception(self, timeout: float | None = None):
        self._reader._wait(self, timeout)
        return self._error

    def release(self) -> None:
        """Give the fetch's slot back (its arrays must not be read after this); before the answer
        came, the slot goes back when it comes."""
        self._released = True
        if self.slot is not None and self._done:
            self._reader._give_back(self.slot)
            self.slot = None

    def _finish(self, value=None, error: BaseException | None = None) -> None:
        self._value, self._error, self._done = value, error, True
        if error is not None or self.kind != "fetch" or self._released:  # only a fetch's rows live on in its slot
            self._reader._give_back(self.slot)
            self.slot = None


class AgentReader:
    def __init__(self, client, *, cache_bytes: dict[str, int] | None = None, node_local: bool = True,
                 max_slots: int = 32, node_id: str | None = None):
        import ray

        from engram_mem.agent.launch import node_agent

        self.client = client
        self.retry_timeout = client.retry_timeout
        self.handle = node_agent(client, node_id)
        self.address = ray.get(self.handle.address.remote(), timeout=max(60.0, self.retry_timeout))
        self._hello = {"credential": client.security.credential, "worker": client.worker or client.client_id,
                       "pid": _pid(), "caches": {n: int(b) for n, b in (cache_bytes or {}).items()},
                       "node_local": bool(node_local), "read_replicas": bool(client.read_replicas)}
        self.key_client = uuid.uuid4().hex   # this worker's idempotency keys: (key_client, seq)
        self._seq = 0
        self._rid = 0
        self.max_slots = max_slots
        self._slots: list[Slot] = []
        self._free: list[Slot] = []
        self._pending: "collections.OrderedDict[int, tuple[bytes, AgentFuture]]" = collections.OrderedDict()
        self._lock = threading.RLock()
        self._sock: socket.socket | None = None
        self._rbuf = bytearray(P.MAX_MESSAGE)  # replies are read into it (_pump)
        self._closed = False
        self.agent_pid = 0
        self.stats: collections.Counter = collections.Counter()
        if not self._connect(time.monotonic() + max(30.0, self.retry_timeout)):
            raise Unavailable(f"fetch agent @{self.address} of this node did not answer")

    # ---- reads -------------------------------------------------------------------------------
    def fetch_async(self, name: str, ids) -> AgentFuture:
        spec = self.client._table(name).spec
        ids = np.ascontiguousarray(np.asarray(ids).reshape(-1), dtype=np.int64)
        n = int(ids.size)
        end = fetch_layout(n, spec.row_bytes)[-1]
        with self._lock:
            slot = self._take_slot(end)
            ids_v, uniq_v, rows_v, inv_v = slot.fetch_views(n, spec.storage_dtype, spec.storage_dim, spec.row_bytes)
            ids_v[:] = ids

            def decode(u: int):
                if u > n:
                    raise P.MessageError(f"fetch agent: a Fetch reply says {u} distinct ids of {n}")
                return uniq_v[:u], rows_v[:u], inv_v

            fut = AgentFuture(self, self._next_rid(), "fetch", name, slot, decode)
            self._submit(fut, P.FETCH, {"table": name, "slot": slot.index, "n": n, "uid": self._uid(name)})
            self.stats["fetches"] += 1
            self.stats["ids"] += n
            return fut

    def fetch(self, name: str, ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(distinct ids, their rows, inverse) as the worker's own arrays (copied out of the slot)."""
        fut = self.fetch_async(name, ids)
        try:
            uniq, rows, inverse = fut.result()
            return uniq.copy(), rows.copy(), inverse.copy()
        finally:
            fut.release()

    # ---- writes ------------------------------------------------------------------------------
    def push_async(self, name: str, ids, grads, lr: float | None = None, step: int = 0) -> AgentFuture:
        """Send a sparse gradient through the agent (duplicate ids are summed there). Applied once,
        also when re-sent to a restarted agent: the key is this worker's (key_client, seq)."""
        spec = self.client._table(name).spec
        if spec.is_bytes:
            raise ReadOnlyTable(f"table {name!r} holds {spec.dtype} rows, which take write (import) but not push; "
                                f"train a float32 or bfloat16 table and quantize it on export")
        ids = np.ascontiguousarray(np.asarray(ids).reshape(-1), dtype=np.int64)
        if hasattr(grads, "detach"):
            import torch

            grads = grads.detach().to("cpu", torch.float32).numpy()
        g = np.asarray(grads, dtype=np.float32)
        n = int(ids.size)
        if g.size != n * spec.dim:
            raise InvalidArgument(f"table {name!r}: field 'grads' has shape {tuple(g.shape)}; expected ({n}, {spec.dim})")
        _, grads_at, end = push_layout(n, 4 * spec.dim)
        with self._lock:
            while sum(1 for _, f in self._pending.values() if f.kind == "push") >= MAX_PUSHES_IN_FLIGHT:
                self._pump(POLL_S, time.monotonic() + self.retry_timeout)
            slot = self._take_slot(end)
            slot_array(slot.mm, np.int64, 0, n)[:] = ids
            slot_array(slot.mm, np.float32, grads_at, n, spec.dim)[:] = g.reshape(n, spec.dim)
            self._seq += 1
            key = (self.key_client, self._seq)
            fut = AgentFuture(self, self._next_rid(), "push", name, slot, key=key)
            self._submit(fut, P.PUSH, {"table": name, "slot": slot.index, "n": n, "step": int(step), "uid": self._uid(name),
                                       "lr": None if lr is None else float(lr), "key": list(key)})
            self.stats["pushes"] += 1
            return fut

    # ---- the agent's side of things ------------------------------------------------------------
    def summary(self) -> dict:
        """This worker's own counts under RowFetcher's names (fetches, ids, unique_ids,
        node_local_rows, cache_lookups, cache_hits, cache_hit_rate, remote_rows, pushes), the node's
        (the agent's: every local worker's, its cache's bytes) under "node_" + the same names,
        and agent_* (workers connected, pid, refusals, this worker's reconnects)."""
        with self._lock:
            fut = AgentFuture(self, self._next_rid(), "stats", "", None)
            self._submit(fut, P.STATS, {})
        d = fut.result(timeout=max(30.0, self.retry_timeout))
        node, own = d["node"], d["worker"]
        s = {k: own.get(k, 0) for k in ("fetches", "ids", "unique_ids", "node_local_rows", "cache_lookups",
                                          "cache_hits", "remote_rows", "pushes")}
        s["cache_hit_rate"] = s["cache_hits"] / s["cache_lookups"] if s["cache_lookups"] else 0.0
        s["cache_bytes"] = node.get("cache_bytes", 0)
        s.update({k if k.startswith("agent_") else f"node_{k}": v for k, v in node.items()})
        s["agent_reconnects"] = self.stats["reconnects"]
        return s

    def clear_caches(self) -> None:
        with self._lock:
            fut = AgentFuture(self, self._next_rid(), "clear", "", None)
            self._submit(fut, P.CLEAR, {})
        fut.result(timeout=max(30.0, self.retry_timeout))

    def close(self) -> None:
        """Wait for the pushes still in flight (up to retry_timeout), then close the socket and the slots."""
        with self._lock:
            if self._closed:
                return
            deadline = time.monotonic() + self.retry_timeout
            while any(f.kind == "push" for _, f in self._pending.values()) and time.monotonic() < deadline:
                self._pump(POLL_S, deadline)
            self._closed = True
            if self._sock is not None:
                self._sock.close()
            for s in self._slots:
                s.close()

    # ---- internals ---------------------------------------------------------------------------
    def _uid(self, name: str) -> str | None:
        return self.client.view.raw["tables"].get(name, {}).get("uid")

    def _next_rid(self) -> int:
        self._rid += 1
        return self._rid

    def _take_slot(self, nbytes: int) -> Slot:
        """A free slot of at least nbytes: the smallest that fits, a new one, or a free one grown."""
        deadline = time.monotonic() + self.retry_timeout
        while True:
            fits = [s for s in self._free if s.nbytes >= nbytes]
            if fits:
                slot = min(fits, key=lambda s: s.nbytes)
                self._free.remove(slot)
                return slot
            if len(self._slots) < self.max_slots:
                slot = Slot(len(self._slots), nbytes)
                self._slots.append(slot)
                self._announce(slot)
                return slot
            if self._free:  # every slot exists: grow the biggest free one
                old = max(self._free, key=lambda s: s.nbytes)
                self._free.remove(old)
                slot = Slot(old.index, max(nbytes, 2 * old.nbytes))
                self._slots[old.index] = slot
                old.close()
                self._announce(slot)
                return slot
            if not self._pending:
                raise RuntimeError(f"fetch agent: all {self.max_slots} slots hold fetch results not released; "
                                   f"call release() on fetch futures once their rows are read")
            self._pump(POLL_S, deadline)

    def _give_back(self, slot: Slot | None) -> None:
        if slot is not None:
            with self._lock:
                if self._slots[slot.index] is slot:
                    self._free.append(slot)

    def _announce(self, slot: Slot) -> None:
        msg = P.pack(P.SLOT, 0, {"slot": slot.index, "bytes": slot.nbytes})
        try:
            socket.send_fds(self._sock, [msg], [slot.fd])
        except (OSError, AttributeError):  # (no socket: the last reconnect failed)
            self._reconnect()  # announces every slot again

    def _submit(self, fut: AgentFuture, op: int, meta: dict) -> None:
        msg = P.pack(op, fut.rid, meta)
        self._pending[fut.rid] = (msg, fut)
        try:
            self._sock.sendall(msg)
            fut.sent = True
        except (OSError, AttributeError):
            self._reconnect()  # re-sends it with the rest, or ends it with a typed error

    def _poll(self) -> None:
        with self._lock:
            self._pump(0.0, time.monotonic() + self.retry_timeout)

    def _wait(self, fut: AgentFuture, timeout: float | None) -> None:
        end = None if timeout is None else time.monotonic() + timeout
        while not fut._done:
            if end is not None and time.monotonic() >= end:
                raise TimeoutError(f"fetch agent: no answer to {fut.kind} {fut.rid} within {timeout} s")
            with self._lock:
                if not fut._done:
                    self._pump(POLL_S, time.monotonic() + self.retry_timeout, until=fut)

    def _pump(self, wait_s: float, deadline: float, until: AgentFuture | None = None) -> None:
        """Read the replies that have arrived, waiting up to wait_s for the first; with `until`, stop
        once that request's reply is in (the others are read when they are asked for).

        The socket stays blocking, so sends wait for room; reads pass MSG_DONTWAIT into one buffer
        and wait in poll() only when nothing has arrived. A reply that is already there, as a
        prefetch's is by the time its layer asks, costs one system call and no allocation (the
        model's thread pays this inside get(), where it counts as exposed wait)."""
        if self._closed:
            raise Unavailable("fetch agent: the reader is closed")
        sock = self._sock
        if sock is None:  # the last reconnect failed: try again (what was pending has ended)
            self._reconnect(deadline)
            return
        buf = self._rbuf
        while True:
            try:
                n = sock.recv_into(buf, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:  # nothing has arrived
                if wait_s <= 0 or not _readable(sock, wait_s):
                    return
                wait_s = 0.0
                continue
            except OSError:
                n = 0
            if not n:
                self._reconnect(deadline)
                return
            self._reply(bytes(memoryview(buf)[:n]))
            wait_s = 0.0
            if until is not None and until._done:
                return

    def _reply(self, raw: bytes) -> None:
        try:
            op, rid, meta = P.unpack(raw, P.REPLY_OPS)
        except P.MessageError as e:
            log.warning("fetch agent: unreadable reply dropped: %s", e)
            return
        entry = self._pending.pop(rid, None)
        if entry is None:
            if op == P.ERROR:
                log.warning("fetch agent: %s", P.decode_error(meta, self.address))
            return
        fut = entry[1]
        if op == P.ERROR:
            err = P.decode_error(meta, self.address)
            if isinstance(err, _Unresolved):
                err.table, err.kind, err.key = fut.table, fut.kind, fut.key
            fut._finish(error=err)
            return
        if fut.kind == "fetch":  # its count, as a fixed field (protocol.FETCH_REPLY)
            try:
                if len(meta) != P.FETCH_REPLY.size:
                    raise P.MessageError(f"fetch agent: a Fetch reply of {len(meta)} bytes, expected "
                                         f"{P.FETCH_REPLY.size}")
                value = fut._decode(P.FETCH_REPLY.unpack(meta)[0])
            except P.MessageError as e:
                fut._finish(error=e)
                return
            fut._finish(value=value)
            return
        d = P.meta_dict(meta, op, {})
        fut._finish(value=d.get("rows", d) if fut.kind == "push" else d)

    def _connect(self, deadline: float) -> bool:
        """Connect, present the credential, hand over every slot, re-send what is unanswered.
        Past the deadline: every request still pending ends with a typed error; False."""
        last: Exception | None = None
        while True:
            if self._closed:
                raise Unavailable("fetch agent: the reader is closed")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                sock.settimeout(max(1.0, min(30.0, deadline - time.monotonic())))
                sock.connect("\0" + self.address)
                sock.sendall(P.pack(P.HELLO, 0, self._hello))
                raw = sock.recv(P.MAX_MESSAGE)
                if not raw:
                    raise ConnectionError("the agent closed the connection during HELLO")
                op, _, meta = P.unpack(raw, P.REPLY_OPS)
                if op == P.ERROR:
                    raise P.decode_error(meta, self.address)
                self.agent_pid = int(P.meta_dict(meta, op, {"pid": int})["pid"])
                for slot in self._slots:
                    socket.send_fds(sock, [P.pack(P.SLOT, 0, {"slot": slot.index, "bytes": slot.nbytes})], [slot.fd])
                for msg, fut in self._pending.values():
                    sock.sendall(msg)
                    fut.sent = True
                sock.settimeout(None)
                self._sock = sock
                return True
            except (OSError, ConnectionError, P.MessageError) as e:
                sock.close()
                last = e
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.1)
        self._fail_pending(f"fetch agent @{self.address} not reachable until the deadline ({last})")
        return False

    def _reconnect(self, deadline: float | None = None) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.stats["reconnects"] += 1
        log.info("fetch agent: connection lost; reconnecting and re-sending %d request(s)", len(self._pending))
        self._connect(deadline or time.monotonic() + self.retry_timeout)

    def _fail_pending(self, why: str) -> None:
        for _, fut in list(self._pending.values()):
            if fut.kind == "push" and fut.sent:
                err = MaybeApplied(f"push to table {fut.table!r}: {why}; retry with key={fut.key} to apply it once",
                                   table=fut.table, kind="push", key=fut.key)
            else:
                err = Unavailable(f"{fut.kind} of table {fut.table!r}: {why}; nothing of it was sent", table=fut.table,
                                  kind=fut.kind, key=fut.key)
            fut._finish(error=err)
        self._pending.clear()


def _readable(sock: socket.socket, timeout_s: float) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(max(1, int(timeout_s * 1000))))


def _pid() -> int:
    import os

    return os.getpid()
