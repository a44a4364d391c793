"""The controller: a named Ray actor that holds the cluster's tables and placement and changes them.

It owns the ClusterState (tables, the placement of every table's slots, the epoch; persisted in
cluster.json when the cluster has a data directory) and drives the shards through the
Supervisor: create and drop tables, scale the shard count by moving the fewest slots, take
coordinated checkpoints and restore them. It is not on the data path: clients gather and push
straight to the shards with the placement they hold, and a shard restarts and restores itself
without it. Ray restarts the controller when its process dies (`max_restarts=-1`); the new one
rebuilds its state from cluster.json and the live shards, which outlive it (detached actors).

Clients read `describe()` once, and again when a shard answers "stale epoch".

    ctl = start_controller(ClusterConfig(shards=4), detached=True)
    ray.get(ctl.create_table.remote(TableSpec("t", 10**6, 256).to_dict(), {"name": "adam"}))
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid

import numpy as np

from engram_mem.config import NAMESPACE, ClusterConfig
from engram_mem.control.cluster_state import ClusterState, TableRecord
from engram_mem.control.placement import initial_placement
from engram_mem.control.resharding import Resharding
from engram_mem.control.supervisor import Supervisor
from engram_mem.errors import TableExists, UnknownTable
from engram_mem.optim import OptimizerSpec
from engram_mem.table import TableSpec


log = logging.getLogger("engram_mem.control.controller")


def _public_meta(meta: dict) -> dict:
    """describe()'s view of a table's meta: keys starting with "_" (bulky: per-slot digests) stay out."""
    return {k: v for k, v in meta.items() if not k.startswith("_")}


class ClusterController(Resharding):
    def __init__(self, cluster: dict, cluster_id: str):
        self.cfg = ClusterConfig(**cluster)
        self.sup = Supervisor(self.cfg, cluster_id)
        self.state = ClusterState(cluster_id, self.cfg.shards)
        self.shards: dict[int, object] = {}     # shard id -> actor handle (ids are 0..n-1)
        self.infos: dict[int, dict] = {}
        self.replicas: dict[int, list] = {}     # shard id -> its replicas' handles (replicas > 1)
        self.replica_infos: dict[int, list[dict]] = {}
        self.last_scale: dict = {}
        self._lock = threading.RLock()
        self._adopt()

    @property
    def cluster_id(self) -> str:
        return self.state.cluster_id

    # ---- lifecycle -------------------------------------------------------------------------
    def _adopt(self) -> None:
        """After a restart: take over the live shards and the persisted state."""
        live = self.sup.find_all()
        if not live:
            return
        import ray

        infos = ray.get([h.info.remote() for h in live.values()], timeout=300)
        self.shards, self.infos = live, {i["shard_id"]: i for i in infos}
        self.replicas = self.sup.find_replicas(live)
        self._refresh_replica_infos()
        self._adopt_credentials()
        persisted = ClusterState.load(self.cfg.data_dir, missing_ok=True) if self.cfg.data_dir else None
        if persisted is not None:
            self.state = persisted
        else:  # no data directory: the shards know their tables and slots
            self.state.epoch = max(i["epoch"] for i in infos)
            for sid, i in self.infos.items():
                for name, t in i["tables"].items():
                    rec = self.state.tables.get(name)
                    if rec is None:
                        spec = TableSpec.from_dict(t["spec"])
                        rec = self.state.tables[name] = TableRecord(spec, OptimizerSpec.from_dict(t["optimizer"]),
                                                                    t["uid"], np.zeros(spec.n_slots, np.int32))
                    rec.placement[np.asarray(t["slots"], dtype=np.int64)] = sid
        self.state.shards = len(self.shards)
        log.warning("controller restarted: adopted %d live shards, %d tables, epoch %d",
                    len(self.shards), len(self.state.tables), self.state.epoch)

    def start(self) -> dict:
        """Start the shards (restoring the data directory's tables, if it holds any)."""
        with self._lock:
            if self.shards:
                return self.describe()
            persisted = None
            if self.cfg.data_dir:
                persisted = ClusterState.load(self.cfg.data_dir, missing_ok=self.cfg.reinit_missing)
                if persisted is None and self.cfg.reinit_missing:
                    self._discard_data_dir()
            if persisted is not None:
                persisted.cluster_id = self.cluster_id
                self.state = persisted
            n_start = persisted.shards if persisted is not None else self.cfg.shards
            if self.cfg.data_dir and persisted is None:  # a new data directory: its cluster file comes first
                self.state.shards = n_start
                self.state.save(self.cfg.data_dir, fsync=self.cfg.durability == "fsync")
            self.shards = self.sup.start_shards(list(range(n_start)))
            self.replicas = self.sup.start_replicas(list(self.shards))
            self._refresh_infos()
            self._save()
            if n_start != self.cfg.shards:  # the data directory was written by a cluster of another size
                self.scale(self.cfg.shards)
            return self.describe()

    def _discard_data_dir(self) -> None:
        import glob

        for p in glob.glob(os.path.join(self.cfg.data_dir, "shard-*")):
            log.error("--reinit-missing: discarding %s (no cluster file describes it)", p)
            shutil.rmtree(p, ignore_errors=True)

    def _refresh_infos(self) -> None:
        import ray

        infos = ray.get([h.info.remote() for h in self.shards.values()], timeout=300)
        self.infos = {i["shard_id"]: i for i in infos}
        self._refresh_replica_infos()

    def _refresh_replica_infos(self, timeout: float = 10) -> None:
        """Replicas' addresses and readiness; one that does not answer in time is listed as not ready."""
        import ray

        out = {}
        for sid, hs in self.replicas.items():
            refs = [h.info.remote() for h in hs]
            infos = []
            for k, ref in enumerate(refs, start=1):
                try:
                    infos.append(ray.get(ref, timeout=timeout))
                except Exception as e:  # noqa: BLE001 - restarting: clients skip it until it is back
                    old = next((i for i in self.replica_infos.get(sid, []) if i.get("member") == k), {})
                    infos.append(dict(old, shard_id=sid, member=k, ready=False, error=f"{type(e).__name__}"))
            out[sid] = infos
        self.replica_infos = out

    def _members(self) -> list:
        """Every shard actor: primaries, then replicas (control-plane changes go to all of them)."""
        return list(self.shards.values()) + [h for hs in self.replicas.values() for h in hs]

    def resync_replicas(self, wait: bool = True, timeout: float = 600) -> dict:
        """Every replica rebuilds from its primary (after rows changed without the log: import, restore)."""
        import ray

        with self._lock:
            hs = [h for hs in self.replicas.values() for h in hs]
            ray.get([h.resync.remote("") for h in hs], timeout=60)
            time.sleep(0.2)
            if wait and hs:
                self.sup.wait_ready(hs, timeout)
            self._refresh_replica_infos()
            return self.describe()

    def shutdown(self, snapshot: bool = True) -> None:
        with self._lock:
            if snapshot and self.cfg.data_dir and self.shards:
                self._snapshot_all()
            self.sup.stop(dict(enumerate(self._members())))
            self.shards.clear()
            self.replicas.clear()
            self.sup.remove_unused_groups(set())
            if self.cfg.shm_dir:
                shutil.rmtree(os.path.join(self.cfg.shm_dir, self.cluster_id), ignore_errors=True)

    def ping(self) -> str:
        return self.cluster_id

    def shard_actors(self) -> dict:
        """{shard id: actor handle}, for bulk transfers that go to each shard directly (importer.py)."""
        with self._lock:
            return dict(self.shards)

    def _save(self) -> None:
        self.state.shards = len(self.shards)
        if self.cfg.data_dir:
            self.state.save(self.cfg.data_dir, fsync=self.cfg.durability == "fsync")

    def _adopt_credentials(self) -> None:
        """A restarted controller takes the live shards' credentials (a rotation may have changed them)."""
        import dataclasses

        import ray

        sec = ray.get(next(iter(self.shards.values())).credentials.remote(), timeout=60)
        self.cfg = self.sup.cfg = dataclasses.replace(self.cfg, security=sec)

    def shard_security(self) -> dict:
        """The current credentials for a shard that Ray restarted with its startup config (actor.py)."""
        return self.cfg.security

    def client_security(self, read_only: bool = False) -> dict:
        """The credential (and TLS files) a client attaching through Ray uses; Ray's token auth guards this call."""
        from engram_mem.security import Security

        return Security.from_dict(self.cfg.security).client(read_only)

    def rotate_credentials(self, credentials: list | None = None, read_only_credentials: list | None = None,
                           finish: bool = False) -> dict:
        """Credential rotation (auth.rotated): start = new credentials first, old ones still accepted;
        finish = only the current ones. Shards apply it at once; restarted shards get it from the config."""
        import dataclasses

        import ray

        from engram_mem.security import Security, rotated

        with self._lock:
            sec = rotated(Security.from_dict(self.cfg.security), credentials, read_only_credentials, finish)
            self.cfg = self.sup.cfg = dataclasses.replace(self.cfg, security=sec.to_dict())
            ray.get([h.set_credentials.remote(self.cfg.security) for h in self._members()], timeout=60)
            return {"accepted": len(sec.credentials), "read_only_accepted": len(sec.read_only_credentials)}

    def metrics_endpoints(self) -> dict:
        """Prometheus endpoints of the shards: {shard_id: "host:port"} (see engram_mem/shard/metrics.py)."""
        with self._lock:
            self._refresh_infos()  # a restarted shard serves its metrics on a new port
            return {sid: i.get("metrics_address", "") for sid, i in self.infos.items()}

    # ---- what clients read -----------------------------------------------------------------
    def describe(self) -> dict:
        # No lock: a restarting shard asks for this while the controller may be waiting on it.
        return {
            "name": self.cfg.name,
            "cluster_id": self.cluster_id,
            "epoch": self.state.epoch,
            "config": self.cfg.public_dict(),
            "shards": {sid: {k: v for k, v in i.items() if k != "tables"} | {
                "actor": self.sup.shard_name(sid),
                "replicas": [{k: v for k, v in r.items() if k != "tables"} | {"actor": self.sup.shard_name(sid, m)}
                             for m, r in enumerate(self.replica_infos.get(sid, []), start=1)]}
                       for sid, i in list(self.infos.items())},
            "tables": {n: {"spec": t.spec.to_dict(), "optimizer": t.optimizer.to_dict(), "uid": t.uid,
                           "placement": t.placement.copy(), "meta": _public_meta(t.meta)}
                       for n, t in self.state.tables.items()},
            "last_scale": self.last_scale,
        }

    def member_started(self, info: dict) -> None:
        """A shard or replica that Ray restarted announces its new process (pid, address, restarts).
        No lock, like describe(): it must not wait behind a scale that waits on this shard."""
        sid, m = info["shard_id"], info.get("member", 0)
        if m == 0:
            if sid in self.infos:
                self.infos = dict(self.infos) | {sid: info}
        else:
            reps = list(self.replica_infos.get(sid, []))
            if 0 < m <= len(reps):
                reps[m - 1] = info
                self.replica_infos = dict(self.replica_infos) | {sid: reps}

    def check_shards(self) -> dict:
        """Re-read every shard's address (a restarted shard listens on a new port)."""
        with self._lock:
            self._refresh_infos()
            return self.describe()

    # ---- tables ----------------------------------------------------------------------------
    def create_table(self, spec: dict, optimizer: dict | None = None, exist_ok: bool = False) -> dict:
        import ray

        spec_obj = TableSpec.from_dict(spec)
        opt = OptimizerSpec.from_dict(optimizer)
        with self._lock:
            if spec_obj.name in self.state.tables:
                have = self.state.tables[spec_obj.name].spec
                if exist_ok and have == spec_obj:
                    return self.describe()
                raise TableExists(f"table {spec_obj.name!r} already exists with {have}")
            placement = initial_placement(spec_obj.n_slots, len(self.shards))
            rec = TableRecord(spec_obj, opt, uuid.uuid4().hex[:12], placement)
            self.state.epoch += 1
            ray.get([h.add_table.remote(spec_obj.to_dict(), opt.to_dict(), np.nonzero(placement == sid)[0],
                                        self.state.epoch, rec.uid)
                     for sid, hs in self._by_shard().items() for h in hs])
            self.state.tables[spec_obj.name] = rec
            self._save()
            self._set_epoch_all()
            return self.describe()

    def drop_table(self, name: str) -> dict:
        import ray

        with self._lock:
            if name not in self.state.tables:
                raise UnknownTable(f"unknown table {name!r}")
            del self.state.tables[name]
            self.state.epoch += 1
            self._save()
            ray.get([h.drop_table.remote(name) for h in self._members()])
            self._set_epoch_all()
            return self.describe()

    def set_table_meta(self, name: str, meta: dict) -> dict:
        """Replace what tools record with table `name` (an import: its layout and identity), persisted
        with the table (cluster.json) and shown by describe() but for keys starting with "_"."""
        with self._lock:
            rec = self.state.tables.get(name)
            if rec is None:
                raise UnknownTable(f"unknown table {name!r}")
            rec.meta = dict(meta)
            self._save()
            return rec.meta

    def table_meta(self, name: str) -> dict:
        """All that is recorded with table `name`, describe()'s part and the rest (per-slot digests)."""
        rec = self.state.tables.get(name)
        if rec is None:
            raise UnknownTable(f"unknown table {name!r}")
        return rec.meta

    def set_optimizer(self, name: str, optimizer: dict) -> dict:
        import ray

        with self._lock:
            if name not in self.state.tables:
                raise UnknownTable(f"unknown table {name!r}")
            opt = OptimizerSpec.from_dict(optimizer)
            ray.get([h.set_optimizer.remote(name, opt.to_dict()) for h in self._members()])
            self.state.tables[name].optimizer = opt
            self._save()
            return self.describe()


    # ---- checkpoints -----------------------------------------------------------------------


def start_controller(cfg: ClusterConfig, detached: bool = False, cluster_id: str | None = None):
    """Create the controller actor and its shards; returns the actor handle once all serve.
    `cluster_id` (names the /dev/shm directory): `up` picks it first, to record it before the start."""
    import ray

    opts = dict(name=cfg.controller_name, namespace=NAMESPACE, num_cpus=0, max_concurrency=16,
                max_restarts=-1, max_task_retries=-1)
    if detached:
        opts["lifetime"] = "detached"
    ctl = ray.remote(ClusterController).options(**opts).remote(cfg.to_dict(), cluster_id or uuid.uuid4().hex[:8])
    try:
        ray.get(ctl.start.remote())
    except BaseException:
        ray.kill(ctl, no_restart=True)
        raise
    return ctl


def get_controller(name: str):
    """The controller of the memory cluster called `name` in the connected Ray cluster, or None."""
    import ray

    try:
        return ray.get_actor(f"{name}-controller", namespace=NAMESPACE)
    except ValueError:
        return None
