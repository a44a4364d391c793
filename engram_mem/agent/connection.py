"""One worker's connection to its node's fetch agent: its slots, its requests, their replies.

Each connection has a thread that reads its messages in order; a fetch or push is handed to the
agent's fetcher at once and answered from that request's completion, so the requests of one
worker (the fetches of every Engram layer of a forward, the pushes of a step) are in flight
together. Order is kept where it matters: a push is registered with the agent's client before
the next message is read, so a later fetch of that table waits for it (read-your-writes).

A connection is refused until its HELLO presents the cluster's credential (compared in constant
time); a read-only credential may fetch but not push. Any bytes at all get an ERROR naming what
was wrong and the connection goes on (the socket keeps message boundaries); only a failed HELLO
closes it. Memory per connection: at most MAX_SLOTS slots of at most the agent's slot limit,
which the worker owns; the agent maps them.
"""

from __future__ import annotations

import array
import collections
import logging
import socket
import threading

import numpy as np

from engram_mem.agent import protocol as P
from engram_mem.agent.slots import array as slot_array
from engram_mem.agent.slots import fetch_layout, map_slot, push_layout
from engram_mem.errors import EngramMemError, PermissionDenied, Unauthenticated
from engram_mem.validate import check_ids

log = logging.getLogger("engram_mem.agent.connection")

MAX_SLOTS = 256
MAX_CACHE_TABLES = 64


class WorkerConnection:
    def __init__(self, agent, sock: socket.socket):
        self.agent, self.sock = agent, sock
        self.slots: dict[int, object] = {}     # slot index -> its mapping
        self.level = ""                        # "full" or "read" once HELLO passed
        self.worker = ""
        self.cache_tables: set[str] = set()    # tables this worker reads through the node's cache
        self.node_local = True
        self.spread = False
        self._send_lock = threading.Lock()
        self.closed = False
        self.tally: collections.Counter = collections.Counter()  # this worker's own fetch counts
        self.pushes = 0

    # ---- the reading thread ------------------------------------------------------------------
    def serve(self) -> None:
        try:
            while not self.closed:
                try:
                    raw, anc, flags, _ = self.sock.recvmsg(P.MAX_MESSAGE, socket.CMSG_SPACE(4 * P.MAX_FDS))
                except OSError:
                    break
                fds = _fds(anc)
                if not raw and not fds:
                    break  # the worker closed (or died)
                rid = 0
                try:
                    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                        raise P.MessageError(f"fetch agent: a message over {P.MAX_MESSAGE} bytes or with more than "
                                             f"{P.MAX_FDS} file descriptor was cut; nothing of it was done")
                    op, rid, meta = P.unpack(raw, P.REQUEST_OPS)
                    self._handle(op, rid, meta, fds)
                    fds = []
                except Unauthenticated as e:
                    self.reply_error(rid, e)
                    break
                except Exception as e:  # noqa: BLE001 - any bytes at all get a defined refusal
                    self.agent.count("refused")
                    self.reply_error(rid, e)
                finally:
                    for fd in fds:
                        _close(fd)
        finally:
            self.close()

    def _handle(self, op: int, rid: int, meta: bytes, fds: list[int]) -> None:
        if not self.level and op != P.HELLO:
            raise Unauthenticated(f"fetch agent: a connection must open with HELLO and the cluster credential; "
                                  f"got {P.REQUEST_OPS[op]}")
        if fds and op != P.SLOT:
            raise P.MessageError(f"fetch agent: {P.REQUEST_OPS[op]} carries no file descriptor; got {len(fds)}")
        if op == P.HELLO:
            self._hello(rid, P.meta_dict(meta, op, {"credential": str}))
        elif op == P.SLOT:
            self._slot(P.meta_dict(meta, op, {"slot": int, "bytes": int}), fds)
            del fds[:]  # map_slot closed it
        elif op == P.FETCH:
            self._fetch(rid, P.meta_dict(meta, op, {"table": str, "slot": int, "n": int}))
        elif op == P.PUSH:
            self._push(rid, P.meta_dict(meta, op, {"table": str, "slot": int, "n": int, "step": int, "key": list}))
        elif op == P.STATS:
            with self.agent.fetcher._lock:
                own = dict(self.tally, pushes=self.pushes)
            self.reply(rid, {"node": self.agent.summary(), "worker": own})
        elif op == P.CLEAR:
            self.agent.fetcher.clear_caches()
            self.reply(rid, {})

    def _hello(self, rid: int, d: dict) -> None:
        level = self.agent.security_level(d["credential"])
        if not level:
            raise Unauthenticated("fetch agent: the credential presented is not this cluster's (HELLO)")
        caches = d.get("caches", {})
        if not isinstance(caches, dict) or len(caches) > MAX_CACHE_TABLES or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
                for k, v in caches.items()):
            raise P.MessageError(f"fetch agent: Hello: field 'caches' must map at most {MAX_CACHE_TABLES} table "
                                 f"names to byte counts >= 0")
        for name, nbytes in caches.items():
            self.agent.table(name)  # UnknownTable names it
            if nbytes > self.agent.max_cache_bytes:
                raise P.MessageError(f"fetch agent: Hello: a cache of {nbytes} bytes for {name!r} is over the "
                                     f"agent's {self.agent.max_cache_bytes}-byte limit per table")
            self.agent.fetcher.ensure_cache(name, nbytes)
        self.level = level
        self.worker = str(d.get("worker", ""))[:200]
        self.cache_tables = {n for n, b in caches.items() if b > 0}
        self.node_local = bool(d.get("node_local", True))
        # A worker whose client spreads its gathers over a replicated shard's members (a read-only,
        # inference client's default) keeps doing so through the agent, except for tables it reads
        # through the node's cache: a replica may trail its primary, and what a fetch reads enters
        # the cache that other workers of the node read their own writes from. The others read
        # primaries.
        self.spread = bool(d.get("read_replicas", False))
        self.reply(rid, self.agent.hello_reply())

    def _slot(self, d: dict, fds: list[int]) -> None:
        if len(fds) != 1:
            raise P.MessageError(f"fetch agent: Slot needs exactly one file descriptor attached; got {len(fds)}")
        if d["slot"] >= MAX_SLOTS:
            _close(fds[0])
            raise P.MessageError(f"fetch agent: Slot: index {d['slot']} is over the limit of {MAX_SLOTS} slots")
        self.slots[d["slot"]] = map_slot(fds[0], d["bytes"], self.agent.max_slot_bytes)

    def _mapped(self, what: str, d: dict, end: int):
        mm = self.slots.get(d["slot"])
        if mm is None:
            raise P.MessageError(f"fetch agent: {what}: slot {d['slot']} was never sent (Slot first)")
        if end > len(mm):
            raise P.MessageError(f"fetch agent: {what}: {d['n']} ids need {end} bytes; slot {d['slot']} holds "
                                 f"{len(mm)}")
        return mm

    def _fetch(self, rid: int, d: dict) -> None:
        name, n = d["table"], d["n"]
        spec = self.agent.table(name, _uid(d)).spec
        ids_at, uniq_at, inv_at, rows_at, end = fetch_layout(n, spec.row_bytes)
        mm = self._mapped("Fetch", d, end)
        ids = check_ids(spec, slot_array(mm, np.int64, ids_at, n))
        rows = slot_array(mm, spec.storage_dtype, rows_at, n, spec.storage_dim)
        self.agent.count("fetches")

        def done(f):
            try:
                uniq, _rows, inverse = f.result()
                slot_array(mm, np.int64, uniq_at, uniq.size)[:] = uniq
                slot_array(mm, np.int64, inv_at, n)[:] = inverse
                self._send(P.pack(P.OK, rid, P.FETCH_REPLY.pack(int(uniq.size))))
            except BaseException as e:  # noqa: BLE001 - handed to the worker
                self.reply_error(rid, e)

        self.agent.fetcher.fetch_async(name, ids, out=rows, node_local=self.node_local, cache=name in self.cache_tables,
                                       tally=self.tally, inline=True,
                                       spread=self.spread and name not in self.cache_tables).add_done_callback(done)

    def _push(self, rid: int, d: dict) -> None:
        if self.level != "full":
            raise PermissionDenied("fetch agent: Push needs the full cluster credential; this worker presented "
                                   "the read-only one")
        name, n, key, lr = d["table"], d["n"], d["key"], d.get("lr")
        if len(key) != 2 or not isinstance(key[0], str) or not key[0] or not isinstance(key[1], int) or key[1] <= 0:
            raise P.MessageError("fetch agent: Push: field 'key' must be [client id, sequence number > 0]")
        if lr is not None and (not isinstance(lr, (int, float)) or isinstance(lr, bool)):
            raise P.MessageError(f"fetch agent: Push: field 'lr' is {type(lr).__name__}, expected a number or null")
        spec = self.agent.table(name, _uid(d)).spec
        ids_at, grads_at, end = push_layout(n, 4 * spec.dim)
        mm = self._mapped("Push", d, end)
        ids = slot_array(mm, np.int64, ids_at, n)
        grads = slot_array(mm, np.float32, grads_at, n, spec.dim)
        self.agent.count("pushes")
        self.pushes += 1

        def done(f):
            try:
                self.reply(rid, {"rows": int(f.result())})
            except BaseException as e:  # noqa: BLE001
                self.reply_error(rid, e)

        self.agent.fetcher.push_async(name, ids, grads, lr=lr, step=d["step"],
                                      key=(key[0], key[1])).add_done_callback(done)

    # ---- replies -----------------------------------------------------------------------------
    def reply(self, rid: int, meta: dict) -> None:
        self._send(P.pack(P.OK, rid, meta))

    def reply_error(self, rid: int, e: BaseException) -> None:
        if not isinstance(e, EngramMemError):
            e = EngramMemError(f"fetch agent: {type(e).__name__}: {e}")
        self._send(P.pack(P.ERROR, rid, P.encode_error(e)))

    def _send(self, msg: bytes) -> None:
        with self._send_lock:
            if self.closed:
                return
            try:
                self.sock.sendall(msg)
            except OSError:  # the worker is gone: its requests end here, the agent serves the others
                pass

    def close(self) -> None:
        with self._send_lock:
            if self.closed:
                return
            self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass
        self.slots.clear()  # each mapping goes once the requests viewing it have finished
        self.agent.forget(self)


def _uid(d: dict) -> str | None:
    uid = d.get("uid")
    if uid is not None and not isinstance(uid, str):
        raise P.MessageError(f"fetch agent: field 'uid' is {type(uid).__name__}, expected a string")
    return uid


def _fds(ancillary) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[:len(data) - len(data) % a.itemsize])
            fds.extend(a)
    return fds


def _close(fd: int) -> None:
    try:
        import os

        os.close(fd)
    except OSError:
        pass
