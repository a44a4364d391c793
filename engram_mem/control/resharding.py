"""Resharding: the controller's operations over every shard at once (a mixin of ClusterController).

`scale(n)` moves the fewest slots between shards (a pre-copy, migration.py) and bumps the epoch;
`checkpoint` takes a consistent cut of every shard; `restore` loads one into any shard count.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time

import numpy as np

from engram_mem.control.cluster_state import ClusterState
from engram_mem.control.migration import SlotMigration
from engram_mem.control.placement import rebalance
from engram_mem.errors import InvalidArgument, ResourceExhausted

log = logging.getLogger("engram_mem.control.resharding")


class Resharding:
    def _by_shard(self) -> dict[int, list]:
        return {sid: [h, *self.replicas.get(sid, [])] for sid, h in self.shards.items()}

    def _set_epoch_all(self) -> None:
        import ray

        ray.get([h.set_epoch.remote(self.state.epoch) for h in self._members()])
        for i in self.infos.values():
            i["epoch"] = self.state.epoch

    def scale(self, shards: int) -> dict:
        """Change the shard count. Reads are served throughout. The moved slots are copied while
        writes go on (pre-copy, migration.py); then writes and pushes wait (NotReady, retried by
        clients) only while the slots changed since their copy are copied again and the placement
        switches. Each moved slot carries its rows, optimizer state and idempotency keys, and is
        logged by its new shard before the placement that names it is persisted."""
        import ray

        if int(shards) < 1:
            raise InvalidArgument(f"shards must be >= 1, got {shards}")
        with self._lock:
            old = len(self.shards)
            if shards == old:
                return self.describe()
            t_start = time.perf_counter()
            new: dict = {}
            mig, switched = None, False
            try:
                if shards > old:
                    new = self.sup.start_shards(list(range(old, shards)))
                    ray.get([h.add_table.remote(t.spec.to_dict(), t.optimizer.to_dict(), np.zeros(0, np.int64),
                                                self.state.epoch, t.uid)
                             for h in new.values() for t in self.state.tables.values()])
                    self.shards.update(new)
                    # Their addresses first: a client that reads the new placement must find every shard it names.
                    self._refresh_infos()
                plans = {n: rebalance(t.placement, shards) for n, t in self.state.tables.items()}
                mig = SlotMigration(self.shards, self.state.tables, plans, self.cfg.move_batch_bytes)
                mig.precopy()
                with self.sup.frozen(self.shards) as t_freeze:
                    mig.finish()
                    self._switch(plans, shards)  # persisted: from here on a restart reads the new placement
                    switched = True
                    gone = {sid: h for sid, h in self.shards.items() if sid >= shards}
                    for sid in gone:
                        del self.shards[sid]
                    self._set_epoch_all()
                    for name, (_, moves) in plans.items():
                        ray.get([self.shards[src].remove_slots.remote(name, slots)
                                 for (src, _dst), slots in moves.items() if src < shards])
                    pause = time.perf_counter() - t_freeze
            except BaseException as e:
                if not switched:
                    self._scale_abandoned(old, shards, new, mig, e)
                raise
            if gone:
                self.sup.stop(gone)
                if self.cfg.data_dir:
                    for sid in gone:  # their slots live elsewhere now; the directories would only mislead
                        shutil.rmtree(os.path.join(self.cfg.data_dir, f"shard-{sid:04d}"), ignore_errors=True)
            self._replicas_after_scale()
            self.sup.remove_unused_groups(set(self.shards))
            self._refresh_infos()
            self.last_scale = {"from": old, "to": shards, "write_pause_s": pause, "moved_bytes": mig.moved_bytes,
                               "recopied_bytes": mig.recopied_bytes, "precopy_rounds": mig.rounds,
                               "seconds": time.perf_counter() - t_start}
            return self.describe()

    def _switch(self, plans: dict, shards: int) -> None:
        """The new placement and epoch, persisted (cluster.json) before anyone is told. If the cluster file
        cannot be written (a full disk) and still names the old placement, nothing switched: the old
        placement and epoch are put back and the error raised."""
        before = (self.state.epoch, {name: self.state.tables[name].placement for name in plans}, self.state.shards)
        self.state.epoch += 1
        for name, (placement, _) in plans.items():
            self.state.tables[name].placement = placement
        self.state.shards = shards
        try:
            if self.cfg.data_dir:
                self.state.save(self.cfg.data_dir, fsync=self.cfg.durability == "fsync")
        except BaseException as e:
            try:
                kept = ClusterState.load(self.cfg.data_dir, missing_ok=True)
            except Exception:  # noqa: BLE001 - unreadable: as if not written
                kept = None
            if kept is not None and kept.epoch == self.state.epoch:
                log.warning("scale: cluster file written, only its directory's fsync failed: the switch stands")
                return
            self.state.epoch, placements, self.state.shards = before
            for name, placement in placements.items():
                self.state.tables[name].placement = placement
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted(f"the cluster file in {self.cfg.data_dir} could not be written: the disk "
                                        f"is full ({e.strerror})") from e
            raise

    def _scale_abandoned(self, old: int, shards: int, new: dict, mig, err: BaseException) -> None:
        """A scale that failed before its placement switched leaves the cluster as it was: the copies
        dropped from the destinations, the new shards (if any) stopped, their placement groups and
        directories removed. `err` gets the scale's outcome and what to do added to its message."""
        from engram_mem.errors import EngramMemError

        if mig is not None:
            mig.abandon()
        if new:
            for sid in new:
                self.shards.pop(sid, None)
            self.infos = {sid: i for sid, i in self.infos.items() if sid in self.shards}
            try:
                self.sup.stop(new)
            except Exception as e:  # noqa: BLE001 - the scale's own error is the one raised
                log.warning("abandoned scale: stopping the new shards failed: %s: %s", type(e).__name__, e)
        try:
            self.sup.remove_unused_groups(set(self.shards))
        except Exception as e:  # noqa: BLE001
            log.warning("abandoned scale: removing placement groups failed: %s: %s", type(e).__name__, e)
        if self.cfg.data_dir and shards > old:  # no cluster file names these: a later scale starts them afresh
            for sid in range(old, shards):
                shutil.rmtree(os.path.join(self.cfg.data_dir, f"shard-{sid:04d}"), ignore_errors=True)
        self.sup._remove_shm(list(range(old, shards)) if shards > old else [])
        if isinstance(err, EngramMemError) and err.args:
            todo = (f"free space on the data directory's disk ({self.cfg.data_dir}), then run the scale again"
                    if isinstance(err, ResourceExhausted) else "run the scale again once that is resolved")
            err.args = (f"scale {old} -> {shards} refused, nothing changed (the cluster still has {old} shards "
                        f"and serves as before): {err.args[0]}; {todo}", *err.args[1:])

    def _replicas_after_scale(self) -> None:
        """Replicas follow a scale by re-joining: those of removed shards stop, those of new shards start,
        the others rebuild from their primary (its slots changed by whole-slot moves). Gathers go to
        the primaries meanwhile (a replica that is not ready refuses them)."""
        import ray

        if self.cfg.replicas <= 1:
            return
        gone = {sid: hs for sid, hs in self.replicas.items() if sid not in self.shards}
        for sid, hs in gone.items():
            self.sup.stop(dict(enumerate(hs)))
            del self.replicas[sid]
        ray.get([h.resync.remote("") for hs in self.replicas.values() for h in hs], timeout=60)
        self.replicas.update(self.sup.start_replicas([sid for sid in self.shards if sid not in self.replicas]))

    def checkpoint(self, target_dir: str | None = None) -> dict:
        """A consistent cut of every shard at one instant (writes wait while it is taken): into the
        data directory (a snapshot generation per shard), or into target_dir as a checkpoint that
        `restore` (also into another shard count) brings back."""
        if not target_dir and not self.cfg.data_dir:
            raise InvalidArgument("this cluster has no data_dir; give a checkpoint directory")
        with self._lock, self.sup.frozen(self.shards):
            out = self._snapshot_all(target_dir)
            if target_dir:
                self.state.save(target_dir, fsync=True)
            out.update(epoch=self.state.epoch, data_dir=target_dir or self.cfg.data_dir)
            return out

    def _snapshot_all(self, target_dir: str | None = None) -> dict:
        import ray

        res = ray.get([h.snapshot.remote(target_dir) for h in self.shards.values()], timeout=3600)
        return {"bytes_written": sum(r["bytes"] for r in res), "lsn": {sid: r["lsn"] for sid, r in zip(self.shards, res)}}

    def restore(self, source_dir: str) -> dict:
        """Replace every table's rows, optimizer state and keys by the checkpoint in source_dir
        (written by `checkpoint`), whatever shard count wrote it. Tables the checkpoint has and the
        cluster has not are created. Writes wait while it runs."""
        import ray

        src = ClusterState.load(source_dir)
        if src is None:
            raise InvalidArgument(f"{source_dir} holds no checkpoint (no cluster.json)")
        with self._lock:
            for name, t in src.tables.items():
                if name not in self.state.tables:
                    self.create_table(t.spec.to_dict(), t.optimizer.to_dict())
                elif self.state.tables[name].spec != t.spec:
                    raise InvalidArgument(f"checkpoint table {name!r} is {t.spec}; the cluster's is "
                                          f"{self.state.tables[name].spec}")
            with self.sup.frozen(self.shards):
                self.state.epoch += 1
                for name, t in src.tables.items():
                    self.state.tables[name].optimizer = t.optimizer
                jobs = []
                for sid, h in self.shards.items():
                    tables = [{"spec": t.spec.to_dict(), "optimizer": t.optimizer.to_dict(),
                               "uid": self.state.tables[name].uid,
                               "slots": np.nonzero(self.state.tables[name].placement == sid)[0],
                               "source": t.placement}
                              for name, t in src.tables.items()]
                    jobs.append(h.restore_from.remote(source_dir, tables, self.state.epoch))
                stats = ray.get(jobs, timeout=3600)
                self._save()
                self._set_epoch_all()
            ray.get([h.resync.remote("") for hs in self.replicas.values() for h in hs], timeout=60)
            return {"slots_restored": sum(s["slots_restored"] for s in stats), "epoch": self.state.epoch}
