"""A shard's Prometheus metrics (prometheus_client), and the summary `Stats` and `engram-mem status` read.

Each shard process has its own registry, served over HTTP on the shard's node address
(`http://NODE_IP:PORT/metrics`, listed by the controller as `metrics_address`):

    engram_mem_requests_total{shard,rpc}                 calls received (refused ones included)
    engram_mem_errors_total{shard,rpc,code,error}        calls that ended in an error status
    engram_mem_rows_total{shard,op}                      op = gathered | pushed | written
    engram_mem_bytes_total{shard,op}                     row bytes sent (gathered) or received
    engram_mem_rpc_latency_seconds{shard,rpc}            histogram, handler entry to last byte
    engram_mem_rows_held / _table_bytes / _optimizer_state_bytes{shard}
    engram_mem_ready / _epoch{shard}
    engram_mem_log_bytes, _snapshot_age_seconds, _replica_lag_seconds{shard}  (hooks, see below)
    process_resident_memory_bytes, process_cpu_seconds_total, ...  (prometheus_client's ProcessCollector)

Hooks for the durability work: `set_log_bytes(n)`, `set_snapshot_time(t)`, `set_replica_lag(s)`
(-1 until set, so "never set" is distinguishable from 0), or `watch(log_bytes=fn, snapshot_time=fn)`
to read them at scrape time (the shard actor watches its write-ahead log and snapshots).

    m = ShardMetrics(shard_id=0, store=store)
    m.serve("127.0.0.2")                 # -> "127.0.0.2:PORT"
    summarize(m.registry.collect())      # {"requests": {...}, "errors": {...}, "rss_bytes": ..., ...}
    summarize(scrape("127.0.0.2:PORT"))  # the same dict, from the HTTP endpoint
"""

from __future__ import annotations

import math
import time
import urllib.request

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.parser import text_string_to_metric_families

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0)


class ShardMetrics:
    def __init__(self, shard_id: int, store=None):
        self.shard = str(shard_id)
        self.store = store
        self.started = time.time()
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        self.requests = Counter("engram_mem_requests", "RPCs received", ["shard", "rpc"], registry=r)
        self.errors = Counter("engram_mem_errors", "RPCs that ended in an error status",
                              ["shard", "rpc", "code", "error"], registry=r)
        self.rows = Counter("engram_mem_rows", "rows gathered, pushed or written", ["shard", "op"], registry=r)
        self.bytes = Counter("engram_mem_bytes", "row bytes gathered (sent), pushed or written (received)",
                             ["shard", "op"], registry=r)
        self.latency = Histogram("engram_mem_rpc_latency_seconds", "RPC handler time", ["shard", "rpc"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        g = lambda name, doc: Gauge(name, doc, ["shard"], registry=r).labels(self.shard)  # noqa: E731
        g("engram_mem_start_time_seconds", "when the shard started (unix time)").set(self.started)
        g("engram_mem_rows_held", "table rows this shard holds").set_function(lambda: self._store("resident_rows"))
        g("engram_mem_table_bytes", "bytes of the rows this shard holds").set_function(lambda: self._store("table_bytes"))
        g("engram_mem_optimizer_state_bytes", "bytes of optimizer state").set_function(lambda: self._store("state_bytes"))
        g("engram_mem_ready", "1 if the shard serves, 0 while loading or moving").set_function(
            lambda: float(bool(getattr(self.store, "ready", False))))
        g("engram_mem_epoch", "placement epoch the shard serves").set_function(
            lambda: float(getattr(self.store, "epoch", 0)))
        self.log_bytes = g("engram_mem_log_bytes", "write-ahead log size (-1: no log)")
        self.log_bytes.set(-1)
        self._snapshot_time = None
        self._snapshot_fn = None
        g("engram_mem_snapshot_age_seconds", "seconds since the last snapshot (-1: none yet)").set_function(
            self._snapshot_age)
        self.replica_lag = g("engram_mem_replica_lag_seconds", "how far a replica trails its primary (-1: none)")
        self.replica_lag.set(-1)
        self._http = None
        self.address = ""
        self._children: dict = {}

    def _store(self, what: str) -> float:
        s = self.store
        if s is None:
            return 0.0
        try:
            if what == "resident_rows":
                return float(sum(ts.resident_rows() for ts in list(s.tables.values())))
            return float(getattr(s, what)())
        except Exception:  # noqa: BLE001 - a table dropped while being read: report it next scrape
            return math.nan

    # ---- counting (called by the servicer) ---------------------------------------------------
    def _child(self, metric, *labels):
        """metric.labels(shard, *labels), kept: prometheus_client's lookup costs more than the count."""
        key = (id(metric), labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(self.shard, *labels)
        return c

    def request(self, rpc: str) -> None:
        self._child(self.requests, rpc).inc()

    def error(self, rpc: str, code: str, error: str) -> None:
        self._child(self.errors, rpc, code, error).inc()

    def observe(self, rpc: str, seconds: float) -> None:
        self._child(self.latency, rpc).observe(seconds)

    def moved(self, op: str, rows: int, nbytes: int) -> None:
        self._child(self.rows, op).inc(rows)
        self._child(self.bytes, op).inc(nbytes)

    # ---- hooks for the durability work -------------------------------------------------------
    def set_log_bytes(self, n: int) -> None:
        self.log_bytes.set(n)

    def set_snapshot_time(self, t: float | None = None) -> None:
        self._snapshot_time = time.time() if t is None else t

    def set_replica_lag(self, seconds: float) -> None:
        self.replica_lag.set(seconds)

    def watch(self, log_bytes=None, snapshot_time=None, replica_lag=None) -> None:
        """Read these at every scrape instead: log_bytes() -> int, snapshot_time() -> unix time or None,
        replica_lag() -> seconds the furthest-behind replica trails (a primary with replicas)."""
        if replica_lag is not None:
            self.replica_lag.set_function(lambda: _safe(replica_lag))
        if log_bytes is not None:
            self.log_bytes.set_function(lambda: _safe(log_bytes))
        if snapshot_time is not None:
            self._snapshot_fn = snapshot_time

    def _snapshot_age(self) -> float:
        t = _safe(self._snapshot_fn, None) if self._snapshot_fn is not None else self._snapshot_time
        return -1.0 if t is None else time.time() - t

    # ---- export ------------------------------------------------------------------------------
    def serve(self, host: str, port: int = 0) -> str:
        from prometheus_client import start_http_server

        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        self.address = f"{host}:{self._http.server_port}"
        return self.address

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def summary(self) -> dict:
        return summarize(self.registry.collect())


def _safe(fn, default=math.nan):
    """fn() for a scrape; a failure (a log segment removed while being measured) reads as `default`."""
    try:
        v = fn()
        return v if v is None else float(v)
    except Exception:  # noqa: BLE001
        return default


def scrape(address: str, timeout: float = 10.0) -> list:
    """The metric families a shard's endpoint serves now."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as r:
        return list(text_string_to_metric_families(r.read().decode()))


def summarize(families) -> dict:
    """One shard's numbers as a flat dict (used by the Stats RPC and by `engram-mem status`)."""
    out = {"requests": {}, "errors": {}, "errors_by_code": {}, "rows": {}, "bytes": {}, "latency": {}}
    for fam in families:
        for s in fam.samples:
            name, lab, v = s.name, s.labels, s.value
            if name == "engram_mem_requests_total":
                out["requests"][lab["rpc"]] = out["requests"].get(lab["rpc"], 0) + int(v)
            elif name == "engram_mem_errors_total":
                out["errors"][lab["error"]] = out["errors"].get(lab["error"], 0) + int(v)
                out["errors_by_code"][lab["code"]] = out["errors_by_code"].get(lab["code"], 0) + int(v)
            elif name == "engram_mem_rows_total":
                out["rows"][lab["op"]] = int(v)
            elif name == "engram_mem_bytes_total":
                out["bytes"][lab["op"]] = int(v)
            elif name == "engram_mem_rpc_latency_seconds_bucket":
                out["latency"].setdefault(lab["rpc"], []).append((float(lab["le"]), v))
            elif name == "process_resident_memory_bytes":
                out["rss_bytes"] = int(v)
            elif name.startswith("engram_mem_") and "shard" in lab and not name.endswith(("_total", "_created")):
                key = name[len("engram_mem_"):]
                if not key.startswith("rpc_latency"):
                    out[key] = v
                    if key not in ("start_time_seconds",):
                        out.setdefault("shard", lab["shard"])
    out["latency"] = {rpc: {"count": int(max(c for _, c in b)), "p50_s": quantile(b, 0.5), "p99_s": quantile(b, 0.99)}
                      for rpc, b in out["latency"].items()}
    if "start_time_seconds" in out:
        out["uptime_s"] = time.time() - out["start_time_seconds"]
    return out


def quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """The q-quantile of a cumulative histogram (le, count), interpolated in its bucket as Prometheus does."""
    b = sorted(buckets)
    total = b[-1][1] if b else 0
    if total <= 0:
        return math.nan
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in b:
        if c >= rank:
            if math.isinf(le):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_c) / max(c - prev_c, 1e-12)
        prev_le, prev_c = le, c
    return prev_le


def rates(before: dict, after: dict, seconds: float) -> dict:
    """Requests/s and gathered bytes/s between two summaries taken `seconds` apart."""
    dt = max(seconds, 1e-9)
    req = sum(after["requests"].values()) - sum(before["requests"].values())
    gb = after["bytes"].get("gathered", 0) - before["bytes"].get("gathered", 0)
    return {"requests_per_s": req / dt, "gather_bytes_per_s": gb / dt}
