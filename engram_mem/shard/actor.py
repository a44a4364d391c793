"""ShardActor: the Ray actor that owns one ShardStore, its write-ahead log and snapshots, and serves it.

A thin wrapper: the controller calls these methods (control plane, through Ray); clients call the
gRPC server (data plane). Shards are detached named actors (`<cluster>-shard-<id>`) that Ray
restarts when their process dies (`max_restarts=-1`): the constructor restores the shard by
itself, from the cluster file and its own snapshot and log when the cluster has a data
directory, or from the controller's table list (initial values) when it has none. Neither the
controller nor any client is needed for that.

    actor = ray.remote(ShardActor).options(...).remote(shard_id=0, cluster=cfg.to_dict(), cluster_id="ab12")
    info = ray.get(actor.info.remote())       # {"address": "127.0.0.2:PORT", "node_id": ..., "error": ...}

With `replicas=R` a shard has R members (replication.py): member 0, the primary, is the shard
above; members 1..R-1 are replicas, named `<cluster>-shard-<id>-r<k>`, that keep no log or
snapshots of their own: each (re)builds itself by copying its primary's slots and then applies
the changes the primary ships. A restarted primary tells its replicas to rebuild from it; one
without a data directory, or whose shard directory is missing or damaged (a lost disk or node),
first restores itself from the replica that applied the most (with replica_ack=all that one has
every acknowledged change), moves the damaged directory aside and snapshots into a new one.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import numpy as np

from engram_mem.config import NAMESPACE, ClusterConfig, member_name
from engram_mem.optim import OptimizerSpec
from engram_mem.shard.membership import Membership
from engram_mem.shard.restore import Restore
from engram_mem.storage.frames import huge_pages
from engram_mem.storage.store import ShardStore
from engram_mem.table import TableSpec

log = logging.getLogger("engram_mem.shard.actor")


def _restart_count(ctx) -> int:
    """How many times Ray has restarted this actor (from the GCS actor table; 0 or 1 if unknown)."""
    try:
        from ray._private import state

        return int(state.actors(ctx.get_actor_id())["NumRestarts"])
    except Exception:  # noqa: BLE001 - a private API: fall back to whether this is a restart at all
        return int(bool(ctx.was_current_actor_reconstructed))


class ShardActor(Restore, Membership):
    def __init__(self, shard_id: int, cluster: dict, cluster_id: str, member: int = 0):
        import ray

        from engram_mem.affinity import pin_process, set_nice
        from engram_mem.shard.replication import ReplicaFeed, ReplicaSync
        from engram_mem.shard.server import ShardServer

        cfg = ClusterConfig(**cluster)
        self.cfg, self.shard_id, self.cluster_id, self.member = cfg, shard_id, cluster_id, member
        pin_process(cfg.shard_cpus, f"shard {shard_id}")  # before its servers start their threads
        set_nice(cfg.shard_nice, f"shard {shard_id}")
        shm_dir = os.path.join(cfg.shm_dir, cluster_id) if cfg.shm_dir else None
        self.store = ShardStore(shard_id, shm_dir=shm_dir, max_request_bytes=cfg.max_request_bytes,
                                max_lr=cfg.max_lr, max_grad_abs=cfg.max_grad_abs, storage=cfg.storage,
                                memory_budget=cfg.memory_budget, member=member)
        self.feed = None           # primary of a replicated shard: ships its changes to the replicas
        if member == 0 and cfg.replicas > 1:
            self.feed = ReplicaFeed(self._wait_logged, cfg.replica_max_lag_bytes, cfg.replica_ack_timeout_s)
            self.store.taps.append(self.feed.publish)
        self.sync = ReplicaSync(self.store, member_name(cfg.name, shard_id, member), cfg.move_batch_bytes)
        self._syncing = threading.Lock()
        self.store.set_ready(False, "restoring")
        self.error = ""
        self.wal = None
        self.snapshots = 0
        self.last_snapshot = time.time()
        self._snap_lock = threading.Lock()
        self._stop = threading.Event()
        ctx = ray.get_runtime_context()
        self.restarts = _restart_count(ctx)
        self.node_id = ctx.get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.server = ShardServer(self.store, host=self.node_ip, node_id=self.node_id, security=cfg.security,
                                  data_plane=cfg.data_plane == "tcp")
        self.address = self.server.start()
        if self.feed is not None and cfg.replica_ack == "all":
            self.server.servicer.replica_acks = self.feed.wait_acked
        if ctx.was_current_actor_reconstructed:
            self._current_credentials()
        self.restore_stats: dict = {}
        if member > 0:  # a replica: copies its primary in the background, ready once it has
            self.resync("")
            if ctx.was_current_actor_reconstructed:
                self._announce()
            return
        t0 = time.time()
        try:
            self._restore()
            self.store.set_ready(True)
        except Exception as e:  # noqa: BLE001 - reported through info(); the shard stays up, not ready
            log.exception("shard %d: restore failed", shard_id)
            self.error = f"{type(e).__name__}: {e}"
            self.store.set_ready(False, f"restore failed: {self.error}")
        self.restore_stats["seconds"] = time.time() - t0
        self.server.servicer.metrics.watch(  # exported as engram_mem_log_bytes / _snapshot_age_seconds
            log_bytes=lambda: self.wal.size_bytes() if self.wal else -1,
            snapshot_time=lambda: self.last_snapshot if self.snapshots else None,
            replica_lag=self.feed.lag_seconds if self.feed else None)
        if cfg.data_dir:  # by time (snapshot_interval_s > 0) and by log size (always)
            threading.Thread(target=self._snapshot_loop, name="engram-snapshots", daemon=True).start()
        if self.feed is not None and ctx.was_current_actor_reconstructed:
            self._rebuild_replicas()
        if ctx.was_current_actor_reconstructed:
            self._announce()

    def _announce(self) -> None:
        """Tell the controller this member's new process (pid, address, restart count), in the
        background: the controller may be restarting too, and then reads it when it adopts us."""
        import ray

        def run():
            try:
                ctl = ray.get_actor(self.cfg.controller_name, namespace=NAMESPACE)
                ray.get(ctl.member_started.remote(self.info()), timeout=60)
            except Exception as e:  # noqa: BLE001 - best effort; describe() refreshes on check_shards
                log.info("shard %d member %d: could not tell the controller it restarted: %s",
                         self.shard_id, self.member, e)

        threading.Thread(target=run, name="engram-announce", daemon=True).start()


    # ---- replication (replication.py) ------------------------------------------------------


    def copy_slots(self, name: str, slots) -> tuple[int, dict]:
        return self.store.copy_slots(name, slots)


    # ---- control plane, called by the controller ------------------------------------------
    def info(self) -> dict:
        return {"shard_id": self.shard_id, "member": self.member, "address": self.address, "node_id": self.node_id,
                "node_ip": self.node_ip, "pid": os.getpid(), "restarts": self.restarts, "ready": self.store.ready, "error": self.error,
                "epoch": self.store.epoch, "shm_dir": self.store.shm_dir or "", "lsn": self.store.lsn,
                "huge_pages": huge_pages(self.store.shm_dir),
                "restore": self.restore_stats, "snapshots": self.snapshots,
                "log_bytes": self.wal.size_bytes() if self.wal else 0,
                "metrics_address": self.server.metrics_address, "data_address": self.server.data_address,
                "replication": (self.feed.describe() if self.feed else
                                {"applied_lsn": self.sync.applied_lsn, "syncs": self.sync.syncs,
                                 "following": self.sync.following, "sync_seconds": self.sync.seconds}
                                if self.member else {}),
                "tables": {n: {"uid": ts.uid, "spec": ts.spec.to_dict(), "optimizer": ts.optimizer_spec.to_dict(),
                               "slots": ts.owned_slots()} for n, ts in self.store.tables.items()}}

    def __repr__(self) -> str:  # how the Ray dashboard and log prefixes name this actor
        return f"ShardActor({member_name(self.cfg.name, self.shard_id, self.member)})"

    def add_table(self, spec: dict, optimizer: dict, slots: np.ndarray, epoch: int, uid: str = "") -> None:
        name = spec["name"]
        if name in self.store.tables and self.store.tables[name].uid == uid:
            return  # restored from disk already (a restarted shard)
        self.store.add_table(TableSpec.from_dict(spec), slots, OptimizerSpec.from_dict(optimizer), epoch=epoch, uid=uid)

    def drop_table(self, name: str) -> None:
        if self.member and name not in self.store.tables:
            return  # a replica re-joining may not have copied it yet
        self.store.drop_table(name)

    def set_optimizer(self, name: str, optimizer: dict) -> None:
        if self.member and name not in self.store.tables:
            return
        self.store.set_optimizer(name, optimizer)

    def export_slots(self, name: str, slots) -> dict:
        return self.store.export_slots(name, slots)

    def changed_slots(self, cuts: dict) -> dict:
        """{table: the slots changed since their cut} for cuts = {table: (slots, lsns)}, the lsns from
        copy_slots (a move's pre-copy calls it with num_returns=2: the data goes to the destination
        through the object store, only the lsn to the controller): one call per source."""
        return {name: self.store.changed_since(name, slots, lsns) for name, (slots, lsns) in cuts.items()}

    def add_slots(self, name: str, data: dict) -> None:
        lsn = self.store.add_slots(name, data)
        if self.wal:
            self.wal.flush()
        return lsn

    def remove_slots(self, name: str, slots) -> None:
        self.store.remove_slots(name, slots)
        if self.wal:
            self.wal.flush()

    def set_credentials(self, security: dict) -> None:
        self.server.set_credentials(security)

    def credentials(self) -> dict:
        return self.server.security.to_dict()

    def _current_credentials(self) -> None:
        """Ray restarts a shard with its startup config: take the credentials in force now (rotation)."""
        import ray

        try:
            ctl = ray.get_actor(self.cfg.controller_name, namespace=NAMESPACE)
            self.server.set_credentials(ray.get(ctl.shard_security.remote(), timeout=30))
        except Exception as e:  # noqa: BLE001 - no controller now: keep the startup credentials
            log.warning("shard %d: kept its startup credentials (%s: %s)", self.shard_id, type(e).__name__, e)

    def set_epoch(self, epoch: int) -> None:
        self.store.set_epoch(epoch)

    def set_ready(self, ready: bool, reason: str = "") -> None:
        if not self.error:
            self.store.set_ready(ready, reason)

    def freeze_writes(self, frozen: bool) -> None:
        self.store.freeze_writes(frozen)
        if frozen and self.wal:
            self.wal.flush()  # every write acknowledged before the freeze is in the log

    def import_rows(self, table: str, plan: list[dict]) -> dict:
        """Read this shard's row ranges from safetensors files (ranged reads) into its store
        (importer.py); returns {"rows": n, "bytes": b}."""
        from engram_mem.tools.importer import read_into_store

        return read_into_store(self.store, table, plan)

    def slot_digests(self, table: str, slots) -> dict:
        """{slot: digest of its stored rows} for owned slots (`engram-mem verify`, tools/verify.py)."""
        from engram_mem.tools.verify import digest_slots

        return digest_slots(self.store, table, slots)

    # ---- snapshots ---------------------------------------------------------------------------
    def snapshot(self, target_dir: str | None = None) -> dict:
        """Write a snapshot generation (to the data directory, or to target_dir for a checkpoint)
        as a per-slot cut; then drop the log behind it. Returns {"bytes", "lsn", "generation"}."""
        from engram_mem.storage.snapshot import SnapshotWriter

        out_dir = target_dir or self.cfg.data_dir
        if not out_dir:
            return {"bytes": 0, "lsn": self.store.lsn, "generation": 0}
        if target_dir is None:
            self._check_own_dir()
        with self._snap_lock:
            w = SnapshotWriter(out_dir, self.shard_id, fsync=self.cfg.durability == "fsync")
            try:
                tables = {}
                for name, ts in list(self.store.tables.items()):
                    tables[name] = {"spec": ts.spec.to_dict(), "uid": ts.uid, "optimizer": ts.optimizer_spec.to_dict()}
                    owned = ts.owned_slots().astype(np.int64)
                    for i in range(0, owned.size, 64):  # a per-slot cut: pushes wait for one batch at most
                        lsn, parts = self.store.snapshot_slots(name, owned[i:i + 64])
                        for slot, p in parts:
                            w.put(name, slot, lsn, p)
                last = self.store.lsn
                if self.wal:
                    self.wal.flush()  # the manifest never covers a record the log does not have
                doc = w.publish(last, tables, keep=self.cfg.keep_generations,
                                logged=self.wal is not None and target_dir is None)
            except BaseException:
                w.abort()
                raise
            if self.wal and target_dir is None:
                self.wal.truncate_before(doc["base_lsn"] + 1)
            self.snapshots += 1
            self.last_snapshot = time.time()
            return {"bytes": w.bytes, "lsn": last, "generation": doc["generation"]}

    def _check_own_dir(self) -> None:
        """A snapshot must never recreate a shard directory that vanished while the shard ran: the log
        written since went with it, and a new generation without it would restore as if complete."""
        from engram_mem.errors import CorruptData
        from engram_mem.storage.snapshot import MANIFEST, shard_dir

        path = os.path.join(shard_dir(self.cfg.data_dir, self.shard_id), MANIFEST)
        if not os.path.exists(path):
            raise CorruptData(f"{path} vanished while shard {self.shard_id} ran; the changes it logged since are not "
                              f"on disk: restart the shard (it restores from a replica if it has one)")

    def _snapshot_loop(self) -> None:
        """Snapshot when the interval has passed or the log has grown past its budget."""
        while not self._stop.wait(0.5):
            try:
                every = self.cfg.snapshot_interval_s
                due = bool(every) and time.time() - self.last_snapshot >= every
                big = self.wal is not None and self.wal.bytes_since_truncate >= self.cfg.snapshot_log_bytes
                if self.store.ready and (due or big):
                    self.snapshot()
            except Exception:  # noqa: BLE001 - the loop must outlive one failure
                log.exception("shard %d: snapshot failed", self.shard_id)
                self.last_snapshot = time.time()

    def stop(self, grace: float = 2.0) -> None:
        self._stop.set()
        if self.feed is not None:
            self.feed.close()
        self.server.stop(grace)
        if self.wal:
            self.wal.close()
        self.store.close()
