"""FetchAgent: one process per node that runs the read path for every worker on the node.

    agent = node_agent(client)              # the Ray actor on this node (launch.py), created once
    reader = AgentReader(client, ...)       # a worker's side (reader.py)

The agent holds the node's one MemoryClient of the read path and one RowFetcher
(engram_mem/worker/fetcher.py) behind it: de-duplication, the same-node tier, **one hot-row cache
per table for every worker of the node**, remote gathers over the data plane and pushes. Workers
reach it over a local SOCK_SEQPACKET socket in the abstract namespace (named after the cluster
id and the node, so it vanishes with the process) and exchange ids, rows and gradients in
shared-memory slots (slots.py), so the model's process keeps only hashing, posting ids and
reading rows.

A push from any worker of the node goes through the agent's fetcher, which drops those rows
from the shared cache before and after sending it: every worker's next fetch misses them. The
agent's client waits for the pushes it carries before a fetch of the same table (read-your-writes
for each worker; a fetch can also wait for another local worker's push, never the reverse).
Pushes keep the worker's own idempotency key, so a push re-sent after the agent was killed
applies once.

Ray restarts a killed agent (max_restarts=-1) on the same node and name; workers reconnect and
re-send what was in flight. The agent ends itself (ray.kill, no restart) once its memory
cluster's controller is gone for good.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import time

from engram_mem.agent.connection import WorkerConnection

log = logging.getLogger("engram_mem.agent.service")

MAX_CONNECTIONS = 256
WATCH_S = 2.0


def socket_name(cluster_id: str, node_id: str) -> str:
    """The agent's address in the abstract socket namespace (no file; gone with the process)."""
    return f"engram-mem-agent-{cluster_id}-{node_id[:16]}"


class FetchAgent:
    def __init__(self, cluster_name: str, cluster_id: str, node_id: str, fetch_threads: int = 2,
                 max_slot_bytes: int = 4 << 30, max_cache_bytes: int = 64 << 30):
        import ray

        from engram_mem.affinity import pin_process, set_nice
        from engram_mem.client.api import MemoryClient
        from engram_mem.control.controller import get_controller
        from engram_mem.security import Security
        from engram_mem.worker.fetcher import RowFetcher

        self._ray = ray
        self.cluster_name, self.cluster_id, self.node_id = cluster_name, cluster_id, node_id
        self.max_slot_bytes, self.max_cache_bytes = max_slot_bytes, max_cache_bytes
        ctl = get_controller(cluster_name)
        if ctl is None:
            raise RuntimeError(f"fetch agent: no memory cluster {cluster_name!r} in this Ray cluster")
        self._ctl = ctl
        self._Security = Security
        self._security = Security.from_dict(ray.get(ctl.shard_security.remote()))
        self._security_at = time.monotonic()
        self.client = MemoryClient(ctl, worker=f"fetch-agent-{node_id[:8]}")
        # Off the model's cores where the cluster says so; the fetcher's threads, started next, inherit it.
        self.cpus = pin_process(self.client.view.raw["config"].get("agent_cpus"), "fetch agent")
        self.nice = set_nice(self.client.view.raw["config"].get("agent_nice"), "fetch agent")
        self.fetcher = RowFetcher(self.client, node_local=True, threads=fetch_threads)
        self.started = time.time()
        self._counts: collections.Counter = collections.Counter()
        self._count_lock = threading.Lock()
        self._conns: set[WorkerConnection] = set()
        self._conns_lock = threading.Lock()
        self.name = socket_name(cluster_id, node_id)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock.bind("\0" + self.name)
        self._sock.listen(64)
        self._stopping = False
        threading.Thread(target=self._accept, name="engram-agent-accept", daemon=True).start()
        threading.Thread(target=self._watch, name="engram-agent-watch", daemon=True).start()
        log.info("fetch agent of %s on node %s: pid %d, socket @%s", cluster_name, node_id[:8], os.getpid(), self.name)

    # ---- actor methods -------------------------------------------------------------------------
    def address(self) -> str:
        return self.name

    def pid(self) -> int:
        return os.getpid()

    def summary(self) -> dict:
        s = self.fetcher.summary()
        with self._count_lock:
            s.update({f"agent_{k}": self._counts[k] for k in ("connections", "fetches", "pushes", "refused")})
        with self._conns_lock:
            s["agent_workers"] = len(self._conns)
        s["agent_pid"] = os.getpid()
        s["agent_cpus"] = sorted(self.cpus) if self.cpus else None
        s["agent_nice"] = self.nice
        return s

    # ---- for connections -----------------------------------------------------------------------
    def hello_reply(self) -> dict:
        return {"pid": os.getpid(), "node": self.node_id, "agent": self.name}

    def security_level(self, presented: str) -> str:
        if time.monotonic() - self._security_at > 5.0:  # a rotation reaches the agent within seconds
            try:
                self._security = self._Security.from_dict(self._ray.get(self._ctl.shard_security.remote(),
                                                                        timeout=10))
                self._security_at = time.monotonic()
            except Exception as e:  # noqa: BLE001 - the controller may be restarting: keep the last
                log.debug("fetch agent: security refresh failed: %s", e)
        return self._security.level(presented)

    def table(self, name: str, uid: str | None = None):
        """The table's view; re-read from the controller when the worker knows a newer incarnation
        (the table was dropped and created again since the agent last looked)."""
        t = self.client._table(name)
        if uid and self.client.view.raw["tables"].get(name, {}).get("uid") != uid:
            self.client.refresh()
            t = self.client._table(name)
        return t

    def count(self, what: str, n: int = 1) -> None:
        with self._count_lock:
            self._counts[what] += n

    def forget(self, conn: WorkerConnection) -> None:
        with self._conns_lock:
            self._conns.discard(conn)

    # ---- threads -------------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._stopping:
            try:
                sock, _ = self._sock.accept()
            except OSError:
                if self._stopping:
                    return
                time.sleep(0.05)
                continue
            with self._conns_lock:
                full = len(self._conns) >= MAX_CONNECTIONS
            conn = WorkerConnection(self, sock)
            if full:
                from engram_mem.errors import ResourceExhausted

                conn.reply_error(0, ResourceExhausted(f"fetch agent: {MAX_CONNECTIONS} workers are connected, "
                                                      f"the most one agent serves"))
                conn.close()
                continue
            with self._conns_lock:
                self._conns.add(conn)
            self.count("connections")
            threading.Thread(target=conn.serve, name="engram-agent-conn", daemon=True).start()

    def _watch(self) -> None:
        """End the agent once its memory cluster is gone (its controller no longer named)."""
        from engram_mem.control.controller import get_controller

        missing, rounds = 0, 0
        while not self._stopping:
            time.sleep(WATCH_S)
            rounds += 1
            try:
                missing = missing + 1 if get_controller(self.cluster_name) is None else 0
            except Exception:  # noqa: BLE001 - Ray itself is going away
                missing += 1
            if not missing and rounds % 5 == 0:  # every ~10 s: forget the caches of dropped tables
                try:
                    self.client.refresh()
                    self.fetcher.prune_caches()
                except Exception as e:  # noqa: BLE001 - the controller may be restarting
                    log.debug("fetch agent: view refresh failed: %s", e)
            if missing >= 2:
                log.info("fetch agent: memory cluster %s is gone; ending", self.cluster_name)
                self._stopping = True
                try:
                    self._sock.close()
                    self.client.close()
                finally:
                    try:
                        self._ray.kill(self._ray.get_runtime_context().current_actor, no_restart=True)
                    except Exception:  # noqa: BLE001
                        os._exit(0)
                return
