"""Restore: how a shard actor gets its rows back when it (re)starts (a mixin of ShardActor).

From its data directory (the newest valid snapshot generation, then the log replayed); from a
replica when its directory is unusable or it has none; else from the controller (initial rows).
`restore_from` loads a checkpoint directory (`engram-mem restore`) into any shard count.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from engram_mem.config import NAMESPACE
from engram_mem.optim import OptimizerSpec
from engram_mem.table import TableSpec

log = logging.getLogger("engram_mem.shard.actor")


class Restore:
    def _restore(self) -> None:
        from engram_mem.errors import CorruptData

        if not self.cfg.data_dir:
            if not (self.feed is not None and self._restore_from_replica("it has no data directory")):
                self._init_from_controller()
            return
        try:
            self._restore_from_disk()
        except CorruptData as e:
            if self.feed is None or not self._restore_from_replica(f"its shard directory is unusable: {e}"):
                raise
            self._rebase_data_dir()

    def _rebase_data_dir(self) -> None:
        """Restored from a replica: move the unusable shard directory aside (kept for inspection), and
        make the copy this shard's own: a fresh directory, a snapshot of it, a log from its lsn on."""
        from engram_mem.storage.snapshot import create_empty, shard_dir

        d = shard_dir(self.cfg.data_dir, self.shard_id)
        if os.path.exists(d):
            aside = f"{d}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            os.rename(d, aside)
            self.restore_stats["moved_aside"] = aside
            log.warning("shard %d: moved the unusable %s to %s", self.shard_id, d, aside)
        if self.wal is not None:
            self.wal.close()
        self.wal = self.store.log = None
        create_empty(self.cfg.data_dir, self.shard_id, fsync=self.cfg.durability == "fsync")
        self._open_log()
        self.snapshot()

    def _open_log(self) -> None:
        from engram_mem.storage.recovery import wal_dir
        from engram_mem.storage.wal import WriteAheadLog

        cfg = self.cfg
        if cfg.durability != "none":
            self.wal = WriteAheadLog(wal_dir(cfg.data_dir, self.shard_id), policy=cfg.durability,
                                     segment_bytes=cfg.wal_segment_bytes)
            self.wal.start(self.store.lsn + 1)
            self.store.log = self.wal

    def _restore_from_disk(self) -> None:
        from engram_mem.control.cluster_state import ClusterState
        from engram_mem.errors import CorruptData
        from engram_mem.storage.recovery import TablePlan, restore_tables
        from engram_mem.storage.snapshot import create_empty, read_manifest

        cfg = self.cfg

        state = ClusterState.load(cfg.data_dir, missing_ok=cfg.reinit_missing)
        known = state is not None and self.shard_id < state.shards
        holds = known and any(bool((t.placement == self.shard_id).any()) for t in state.tables.values())
        try:
            manifest = read_manifest(cfg.data_dir, self.shard_id, missing_ok=True)
        except CorruptData:
            if not cfg.reinit_missing:
                raise
            log.error("shard %d: damaged manifest; its slots start from initial values (--reinit-missing)",
                      self.shard_id)
            manifest = None
        if manifest is None:
            if holds and not cfg.reinit_missing:
                from engram_mem.storage.snapshot import shard_dir

                raise CorruptData(f"shard directory {shard_dir(cfg.data_dir, self.shard_id)} has no MANIFEST.json "
                                  f"(missing or deleted), but the cluster file lists shard {self.shard_id}: its rows "
                                  f"are unknown; restore the directory, or start with --reinit-missing")
            create_empty(cfg.data_dir, self.shard_id, fsync=cfg.durability == "fsync")
        plans = []
        if known:
            for name, t in state.tables.items():
                plans.append(TablePlan(t.spec, t.optimizer, t.uid, np.nonzero(t.placement == self.shard_id)[0],
                                       t.placement))
            self.store.epoch = state.epoch
        self.restore_stats = restore_tables(self.store, cfg.data_dir, plans, epoch=state.epoch if known else 0,
                                            reinit_missing=cfg.reinit_missing)
        self._open_log()

    def _init_from_controller(self) -> None:
        """No data directory: a restarted shard gets its tables (initial values) from the controller."""
        import ray

        deadline = time.time() + 120
        while True:
            try:
                ctl = ray.get_actor(self.cfg.controller_name, namespace=NAMESPACE)
                d = ray.get(ctl.describe.remote(), timeout=30)
                break
            except Exception:  # noqa: BLE001 - the controller may be restarting too, or not exist yet
                if time.time() > deadline:
                    return
                time.sleep(0.5)
        if self.shard_id not in d["shards"]:
            return  # a new shard: the controller adds its tables
        for name, t in d["tables"].items():
            slots = np.nonzero(np.asarray(t["placement"]) == self.shard_id)[0]
            self.store.add_table(TableSpec.from_dict(t["spec"]), slots, OptimizerSpec.from_dict(t["optimizer"]),
                                 epoch=d["epoch"], uid=t.get("uid", ""))
        self.store.set_epoch(d["epoch"])

    def _restore_from_replica(self, why: str) -> bool:
        """Ray restarted this primary and it cannot restore itself (`why`): copy the ready, following
        replica that applied the most (under replica_ack=all it has every acknowledged change; else it
        trails by at most its lag). False if there is none (a new cluster, or all replicas down)."""
        import ray

        if not ray.get_runtime_context().was_current_actor_reconstructed:
            return False
        candidates = []
        for k, h in self._member_handles().items():
            if k == 0:
                continue
            try:
                info = ray.get(h.info.remote(), timeout=10)
            except Exception as e:  # noqa: BLE001 - that one is down too
                log.warning("shard %d: replica %d did not answer: %s", self.shard_id, k, e)
                continue
            rep = info.get("replication") or {}
            if info["ready"] and rep.get("following"):
                candidates.append((rep.get("applied_lsn", 0), k, h))
        for applied, k, h in sorted(candidates, key=lambda c: -c[0]):
            try:
                for name in list(self.store.tables):   # whatever a failed restore left
                    self.store.drop_table(name)
                stats = self.sync.sync(h, follow=False)
                self.restore_stats = dict(stats, source=f"replica {k}", lsn=applied, reason=why,
                                          replica_ack=self.cfg.replica_ack)
                log.warning("shard %d: restored from replica %d at lsn %d, because %s", self.shard_id, k,
                            applied, why)
                return True
            except Exception as e:  # noqa: BLE001 - try the next replica
                log.warning("shard %d: restoring from replica %d failed: %s", self.shard_id, k, e)
        return False

    def restore_from(self, source_dir: str, tables: list[dict], epoch: int) -> dict:
        """Replace this shard's tables by slots read from another directory (a checkpoint, or the
        data directory of a cluster with another shard count): tables = [{spec, optimizer, uid,
        slots, source}]. Then snapshots, so the restored rows are this shard's own."""
        from engram_mem.storage.recovery import TablePlan, restore_tables

        plans = [TablePlan(TableSpec.from_dict(t["spec"]), OptimizerSpec.from_dict(t["optimizer"]), t["uid"],
                           np.asarray(t["slots"], dtype=np.int64), np.asarray(t["source"], dtype=np.int32))
                 for t in tables]
        log_ = self.store.log
        self.store.log = None  # the restored state is made durable by the snapshot below, not record by record
        try:
            with self.store.order:
                stats = restore_tables(self.store, source_dir, plans, epoch=epoch,
                                       reinit_missing=self.cfg.reinit_missing)
                self.store.set_epoch(epoch)
        finally:
            self.store.log = log_
        self.snapshot()
        return stats
