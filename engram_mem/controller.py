"""The controller: a named Ray actor that owns the cluster spec and supervises the shards.

It holds the tables (spec + optimizer), the placement of every table's slots with its epoch, and
the shards' addresses. It creates shards in a placement group (SPREAD: one per node where the
cluster has the nodes), scales the shard count by moving the fewest slots, restarts shards that
die (restoring their slots from the last lmdb snapshot, or from the deterministic initial values
when the cluster has no data directory), and takes snapshots.

Clients read `describe()` once, and again when a shard answers "stale epoch" or cannot be reached.

    ctl = start_controller(ClusterConfig(shards=4), detached=True)
    ray.get(ctl.create_table.remote(TableSpec("t", 10**6, 256).to_dict(), {"name": "adam"}))
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np

from engram_mem.config import NAMESPACE, ClusterConfig
from engram_mem.errors import InvalidArgument, TableExists, UnknownTable
from engram_mem.optim import OptimizerSpec
from engram_mem.placement import initial_placement, rebalance, shard_slots
from engram_mem.table import TableSpec

log = logging.getLogger("engram_mem.controller")


@dataclass
class _Shard:
    actor: object
    info: dict
    pg_index: int      # which of the controller's placement groups holds its bundle
    bundle: int
    restarts: int = 0


@dataclass
class _Table:
    spec: TableSpec
    optimizer: OptimizerSpec
    placement: np.ndarray  # int32 [n_slots]: shard of each slot


class ClusterController:
    def __init__(self, cluster: dict, cluster_id: str | None = None):
        self.cfg = ClusterConfig(**cluster)
        self.cluster_id = cluster_id or uuid.uuid4().hex[:8]
        self.epoch = 0
        self.shards: dict[int, _Shard] = {}
        self.tables: dict[str, _Table] = {}
        self.pgs: list = []
        self.restarts = 0
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self._last_snapshot = time.time()

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> dict:
        with self._lock:
            if self.shards:
                return self.describe()
            self._add_shards(self.cfg.shards)
            self._restore_cluster_file()
            self._monitor = threading.Thread(target=self._watch, name="engram-controller-monitor", daemon=True)
            self._monitor.start()
            return self.describe()

    def shutdown(self, snapshot: bool = True) -> None:
        import ray

        self._stop.set()
        with self._lock:
            if snapshot and self.cfg.data_dir:
                self._snapshot_all()
            ray.get([s.actor.stop.remote() for s in self.shards.values()], timeout=60)
            for s in self.shards.values():
                ray.kill(s.actor, no_restart=True)
            self.shards.clear()
            for pg in self.pgs:
                if pg is not None:
                    ray.util.remove_placement_group(pg)
            self.pgs.clear()
            if self.cfg.shm_dir:
                shutil.rmtree(os.path.join(self.cfg.shm_dir, self.cluster_id), ignore_errors=True)

    def ping(self) -> str:
        return self.cluster_id

    def client_security(self, read_only: bool = False) -> dict:
        """The credential (and TLS files) a client attaching through Ray uses; Ray's token auth guards this call."""
        from engram_mem.auth import Security

        return Security.from_dict(self.cfg.security).client(read_only)

    def rotate_credentials(self, credentials: list | None = None, read_only_credentials: list | None = None,
                           finish: bool = False) -> dict:
        """Credential rotation (auth.rotated): start = new credentials first, old ones still accepted;
        finish = only the current ones. Shards apply it at once; restarted shards get it from the config."""
        import dataclasses

        import ray

        from engram_mem.auth import Security, rotated

        with self._lock:
            sec = rotated(Security.from_dict(self.cfg.security), credentials, read_only_credentials, finish)
            self.cfg = dataclasses.replace(self.cfg, security=sec.to_dict())
            ray.get([s.actor.set_credentials.remote(self.cfg.security) for s in self.shards.values()], timeout=60)
            return {"accepted": len(sec.credentials), "read_only_accepted": len(sec.read_only_credentials)}

    def metrics_endpoints(self) -> dict:
        """Prometheus endpoints of the shards: {shard_id: "host:port"} (see engram_mem/metrics.py)."""
        with self._lock:
            return {sid: s.info.get("metrics_address", "") for sid, s in self.shards.items()}

    # ---- what clients read -----------------------------------------------------------------
    def describe(self) -> dict:
        with self._lock:
            return {
                "name": self.cfg.name,
                "cluster_id": self.cluster_id,
                "epoch": self.epoch,
                "config": self.cfg.public_dict(),
                "shards": {i: dict(s.info, restarts=s.restarts) for i, s in self.shards.items()},
                "tables": {n: {"spec": t.spec.to_dict(), "optimizer": t.optimizer.to_dict(),
                               "placement": t.placement.copy()} for n, t in self.tables.items()},
            }

    # ---- tables ----------------------------------------------------------------------------
    def create_table(self, spec: dict, optimizer: dict | None = None, exist_ok: bool = False) -> dict:
        import ray

        spec_obj = TableSpec.from_dict(spec)
        opt = OptimizerSpec.from_dict(optimizer)
        with self._lock:
            if spec_obj.name in self.tables:
                have = self.tables[spec_obj.name].spec
                if exist_ok and have == spec_obj:
                    return self.describe()
                raise TableExists(f"table {spec_obj.name!r} already exists with {have}")
            placement = initial_placement(spec_obj.n_slots, len(self.shards))
            self.epoch += 1
            ids = sorted(self.shards)
            ray.get([self.shards[s].actor.add_table.remote(spec_obj.to_dict(), opt.to_dict(),
                                                           shard_slots(placement, k), self.epoch)
                     for k, s in enumerate(ids)])
            self.tables[spec_obj.name] = _Table(spec_obj, opt, placement)
            self._set_epoch_all()
            self._save_cluster_file()
            return self.describe()

    def drop_table(self, name: str) -> dict:
        import ray

        with self._lock:
            if name not in self.tables:
                raise UnknownTable(f"unknown table {name!r}")
            ray.get([s.actor.drop_table.remote(name) for s in self.shards.values()])
            del self.tables[name]
            self.epoch += 1
            self._set_epoch_all()
            self._save_cluster_file()
            return self.describe()

    def set_optimizer(self, name: str, optimizer: dict) -> dict:
        import ray

        with self._lock:
            if name not in self.tables:
                raise UnknownTable(f"unknown table {name!r}")
            opt = OptimizerSpec.from_dict(optimizer)
            ray.get([s.actor.set_optimizer.remote(name, opt.to_dict()) for s in self.shards.values()])
            self.tables[name].optimizer = opt
            self._save_cluster_file()
            return self.describe()

    # ---- shards ----------------------------------------------------------------------------
    def _new_shard_actor(self, shard_id: int, pg, bundle: int):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from engram_mem.actor import ShardActor

        return ray.remote(ShardActor).options(
            name=f"{self.cfg.name}-shard-{shard_id}-{uuid.uuid4().hex[:4]}", namespace=NAMESPACE,
            num_cpus=self.cfg.cpus_per_shard, max_restarts=0, max_concurrency=1,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle),
        ).remote(shard_id, self.cfg.to_dict(), self.cluster_id)

    def _add_shards(self, n: int) -> list[int]:
        """Start n more shards, spread over nodes by a new placement group."""
        import ray
        from ray.util.placement_group import placement_group

        bundle = {"CPU": max(self.cfg.cpus_per_shard, 0.001), **(self.cfg.shard_resources or {})}  # never empty
        pg = placement_group([bundle] * n, strategy=self.cfg.placement_strategy,
                             name=f"{self.cfg.name}-{self.cluster_id}-pg{len(self.pgs)}")
        ray.get(pg.ready(), timeout=120)
        self.pgs.append(pg)
        start = max(self.shards, default=-1) + 1
        new = {start + i: self._new_shard_actor(start + i, pg, i) for i in range(n)}
        infos = ray.get([a.info.remote() for a in new.values()], timeout=120)
        # A new shard has no tables yet, so it is ready at once (a restarted one becomes ready in _restart).
        ray.get([a.set_ready.remote(True) for a in new.values()])
        for (sid, actor), info in zip(new.items(), infos):
            self.shards[sid] = _Shard(actor, dict(info, ready=True), len(self.pgs) - 1, sid - start)
        return list(new)

    def scale(self, shards: int) -> dict:
        """Change the shard count. Reads keep being served; writes and pushes wait while slots move."""
        import ray

        if int(shards) < 1:
            raise InvalidArgument(f"shards must be >= 1, got {shards}")
        with self._lock:
            old_ids = sorted(self.shards)
            if shards == len(old_ids):
                return self.describe()
            ray.get([s.actor.freeze_writes.remote(True) for s in self.shards.values()])
            try:
                if shards > len(old_ids):
                    for sid in self._add_shards(shards - len(old_ids)):
                        ray.get([self.shards[sid].actor.add_table.remote(t.spec.to_dict(), t.optimizer.to_dict(),
                                                                         np.zeros(0, np.int64), self.epoch)
                                 for t in self.tables.values()])
                ids = sorted(self.shards)  # placement indexes shards by rank
                new_placements, all_moves = {}, {}
                for name, t in self.tables.items():
                    new_p, moves = rebalance(t.placement, shards)
                    new_placements[name], all_moves[name] = new_p, moves
                    per_batch = max(1, self.cfg.move_batch_bytes // max(1, t.spec.slot_rows * t.spec.row_bytes))
                    for (src, dst), slots in moves.items():
                        a, b = self.shards[ids[src]].actor, self.shards[ids[dst]].actor
                        for i in range(0, slots.size, per_batch):
                            # The rows travel shard to shard through the object store, not through here.
                            ray.get(b.add_slots.remote(name, a.export_slots.remote(name, slots[i:i + per_batch])))
                self.epoch += 1
                for name, t in self.tables.items():
                    t.placement = new_placements[name]
                self._set_epoch_all()
                for name, moves in all_moves.items():
                    for (src, _dst), slots in moves.items():
                        if src < shards:
                            ray.get(self.shards[ids[src]].actor.remove_slots.remote(name, slots))
                for sid in ids[shards:]:
                    s = self.shards.pop(sid)
                    ray.get(s.actor.stop.remote(), timeout=60)
                    ray.kill(s.actor, no_restart=True)
                self._drop_empty_pgs()
            finally:
                ray.get([s.actor.freeze_writes.remote(False) for s in self.shards.values()])
            self._save_cluster_file()
            if self.cfg.data_dir:
                self._snapshot_all()
            return self.describe()

    def _drop_empty_pgs(self) -> None:
        import ray

        used = {s.pg_index for s in self.shards.values()}
        for i, pg in enumerate(self.pgs):
            if pg is not None and i not in used:
                ray.util.remove_placement_group(pg)
                self.pgs[i] = None

    def _set_epoch_all(self) -> None:
        import ray

        ray.get([s.actor.set_epoch.remote(self.epoch) for s in self.shards.values()])
        for s in self.shards.values():
            s.info["epoch"] = self.epoch

    # ---- supervision -----------------------------------------------------------------------
    def check_shards(self) -> dict:
        """Restart shards that do not answer. Clients call this when a shard is unreachable."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        with self._lock:
            for sid, s in list(self.shards.items()):
                try:
                    ray.get(s.actor.info.remote(), timeout=10)
                except (RayActorError, GetTimeoutError) as e:
                    log.warning("shard %d is down (%s); restarting it", sid, type(e).__name__)
                    self._restart(sid)
            return self.describe()

    def _restart(self, sid: int) -> None:
        import ray

        old = self.shards[sid]
        try:
            ray.kill(old.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        actor = self._new_shard_actor(sid, self.pgs[old.pg_index], old.bundle)
        ids = sorted(self.shards)
        rank = ids.index(sid)
        ray.get([actor.add_table.remote(t.spec.to_dict(), t.optimizer.to_dict(), shard_slots(t.placement, rank),
                                        self.epoch) for t in self.tables.values()], timeout=600)
        ray.get(actor.set_epoch.remote(self.epoch))
        ray.get(actor.set_ready.remote(True))
        info = ray.get(actor.info.remote())
        self.shards[sid] = _Shard(actor, info, old.pg_index, old.bundle, old.restarts + 1)
        self.restarts += 1

    def _watch(self) -> None:
        while not self._stop.wait(self.cfg.health_interval_s):
            try:
                self.check_shards()
                if (self.cfg.data_dir and self.cfg.snapshot_interval_s
                        and time.time() - self._last_snapshot >= self.cfg.snapshot_interval_s):
                    self._snapshot_all()
            except Exception:  # noqa: BLE001 - the monitor must outlive any one failure
                log.exception("controller monitor")

    # ---- persistence -----------------------------------------------------------------------
    def checkpoint(self) -> dict:
        """A consistent snapshot of every shard: writes wait while it is taken."""
        import ray

        if not self.cfg.data_dir:
            raise InvalidArgument("this cluster has no data_dir; start it with one to checkpoint")
        with self._lock:
            ray.get([s.actor.freeze_writes.remote(True) for s in self.shards.values()])
            try:
                written = self._snapshot_all()
            finally:
                ray.get([s.actor.freeze_writes.remote(False) for s in self.shards.values()])
            return {"bytes_written": written, "epoch": self.epoch, "data_dir": self.cfg.data_dir}

    def _snapshot_all(self) -> int:
        import ray

        with self._lock:
            written = sum(ray.get([s.actor.snapshot.remote() for s in self.shards.values()], timeout=3600))
            self._last_snapshot = time.time()
            return written

    def _cluster_file(self) -> str | None:
        return os.path.join(self.cfg.data_dir, "cluster.json") if self.cfg.data_dir else None

    def _save_cluster_file(self) -> None:
        path = self._cluster_file()
        if not path:
            return
        os.makedirs(self.cfg.data_dir, exist_ok=True)
        doc = {"tables": [{"spec": t.spec.to_dict(), "optimizer": t.optimizer.to_dict()} for t in self.tables.values()]}
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)

    def _restore_cluster_file(self) -> None:
        path = self._cluster_file()
        if not path or not os.path.exists(path):
            return
        with open(path) as f:
            doc = json.load(f)
        for t in doc.get("tables", []):
            self.create_table(t["spec"], t["optimizer"])
        log.info("restored %d tables from %s", len(doc.get("tables", [])), path)


def start_controller(cfg: ClusterConfig, detached: bool = False):
    """Create the controller actor and its shards; returns the actor handle once all serve."""
    import ray

    opts = dict(name=cfg.controller_name, namespace=NAMESPACE, num_cpus=0, max_concurrency=16,
                max_restarts=0)
    if detached:
        opts["lifetime"] = "detached"
    ctl = ray.remote(ClusterController).options(**opts).remote(cfg.to_dict())
    ray.get(ctl.start.remote())
    return ctl


def get_controller(name: str):
    """The controller of the memory cluster called `name` in the connected Ray cluster, or None."""
    import ray

    try:
        return ray.get_actor(f"{name}-controller", namespace=NAMESPACE)
    except ValueError:
        return None
