"""ShardActor: the Ray actor that owns one ShardStore and serves it over gRPC on its node.

A thin wrapper: the controller calls these methods (control plane, through Ray); clients call the
gRPC server (data plane). The actor starts the server on its node's address and reports it.

    actor = ray.remote(ShardActor).options(...).remote(shard_id=0, cluster=cfg.to_dict(), cluster_id="ab12")
    info = ray.get(actor.info.remote())       # {"address": "127.0.0.2:PORT", "node_id": ..., ...}
"""

from __future__ import annotations

import os
import time

import numpy as np

from engram_mem.config import ClusterConfig
from engram_mem.optim import OptimizerSpec
from engram_mem.shard import ShardStore
from engram_mem.table import TableSpec


class ShardActor:
    def __init__(self, shard_id: int, cluster: dict, cluster_id: str):
        import ray

        cfg = ClusterConfig(**cluster)
        self.cfg, self.shard_id = cfg, shard_id
        shm_dir = os.path.join(cfg.shm_dir, cluster_id) if cfg.shm_dir else None
        self.store = ShardStore(shard_id, shm_dir=shm_dir, max_request_bytes=cfg.max_request_bytes)
        self.store.set_ready(False, "loading tables")
        self.persist = self.restorer = None
        if cfg.data_dir:
            from engram_mem.persist import Restorer, SlotStore

            self.persist = SlotStore(cfg.data_dir, shard_id)
            self.restorer = Restorer(self.persist, self.store)
        from engram_mem.server import ShardServer

        ctx = ray.get_runtime_context()
        self.node_id = ctx.get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.server = ShardServer(self.store, host=self.node_ip, node_id=self.node_id, security=cfg.security)
        self.address = self.server.start()

    # ---- control plane, called by the controller ------------------------------------------
    def info(self) -> dict:
        return {"shard_id": self.shard_id, "address": self.address, "node_id": self.node_id,
                "node_ip": self.node_ip, "pid": os.getpid(), "ready": self.store.ready,
                "epoch": self.store.epoch, "shm_dir": self.store.shm_dir or "",
                "metrics_address": self.server.metrics_address}

    def __repr__(self) -> str:  # how the Ray dashboard and log prefixes name this actor
        return f"ShardActor({self.cfg.name} shard {self.shard_id})"

    def add_table(self, spec: dict, optimizer: dict, slots: np.ndarray, epoch: int) -> int:
        t0 = time.time()
        self.store.add_table(TableSpec.from_dict(spec), slots, OptimizerSpec.from_dict(optimizer),
                             epoch=epoch, restore=self.restorer)
        if self.restorer:
            self.restorer.close()
        return int(time.time() - t0)

    def drop_table(self, name: str) -> None:
        self.store.drop_table(name)
        if self.persist:
            self.persist.delete(name)

    def set_optimizer(self, name: str, optimizer: dict) -> None:
        self.store.set_optimizer(name, optimizer)

    def export_slots(self, name: str, slots) -> dict:
        return self.store.export_slots(name, slots)

    def add_slots(self, name: str, data: dict) -> None:
        self.store.add_slots(name, data)

    def remove_slots(self, name: str, slots) -> None:
        self.store.remove_slots(name, slots)
        if self.persist:
            self.persist.delete(name, slots)

    def set_credentials(self, security: dict) -> None:
        self.server.set_credentials(security)

    def set_epoch(self, epoch: int) -> None:
        self.store.set_epoch(epoch)

    def set_ready(self, ready: bool, reason: str = "") -> None:
        self.store.set_ready(ready, reason)

    def freeze_writes(self, frozen: bool) -> None:
        self.store.freeze_writes(frozen)

    def snapshot(self) -> int:
        """Write changed slots to lmdb; returns bytes written."""
        if not self.persist:
            return 0
        written = 0
        for ts in list(self.store.tables.values()):
            dirty = np.nonzero(ts.dirty)[0]
            if dirty.size:
                written += self.persist.save(ts, dirty)
        return written

    def stop(self, grace: float = 2.0) -> None:
        self.server.stop(grace)
        self.store.close()
        if self.persist:
            self.persist.close()
