"""ClusterState: what a memory cluster is, persisted so that any process can die.

    state = ClusterState.load(data_dir)      # None for a new data directory
    state.tables["emb"].placement            # int32 [n_slots]: shard id of each slot
    state.save(data_dir)                      # <data_dir>/cluster.json, atomic, with a crc32c

The controller writes it whenever tables, placement or epoch change (before the change is
visible to clients); a restarted shard reads it to know its slots, and a restarted controller
to know the cluster. A data directory that holds shard directories but no cluster.json, or a
cluster.json that fails its checksum, is damage: CorruptData names the file.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

import numpy as np

from engram_mem.errors import CorruptData
from engram_mem.optim import OptimizerSpec
from engram_mem.storage.snapshot import read_json_checked, write_json_atomic
from engram_mem.table import TableSpec

CLUSTER_FILE = "cluster.json"


@dataclass
class TableRecord:
    spec: TableSpec
    optimizer: OptimizerSpec
    uid: str
    placement: np.ndarray  # int32 [n_slots]: shard id of each slot
    meta: dict = field(default_factory=dict)  # what tools record with the table (an import: layout, identity)

    def to_doc(self) -> dict:
        return {"spec": self.spec.to_dict(), "optimizer": self.optimizer.to_dict(), "uid": self.uid,
                "placement": self.placement.astype(int).tolist(), "meta": self.meta}

    @classmethod
    def from_doc(cls, d: dict) -> "TableRecord":
        return cls(TableSpec.from_dict(d["spec"]), OptimizerSpec.from_dict(d["optimizer"]), d["uid"],
                   np.asarray(d["placement"], dtype=np.int32), d.get("meta") or {})


@dataclass
class ClusterState:
    cluster_id: str
    shards: int
    epoch: int = 0
    tables: dict[str, TableRecord] = field(default_factory=dict)

    def to_doc(self) -> dict:
        return {"version": 1, "cluster_id": self.cluster_id, "shards": self.shards, "epoch": self.epoch,
                "tables": [t.to_doc() for t in self.tables.values()]}

    @classmethod
    def from_doc(cls, d: dict) -> "ClusterState":
        tables = {t["spec"]["name"]: TableRecord.from_doc(t) for t in d.get("tables", [])}
        return cls(d["cluster_id"], int(d["shards"]), int(d["epoch"]), tables)

    def save(self, data_dir: str, fsync: bool = False) -> None:
        os.makedirs(data_dir, exist_ok=True)
        write_json_atomic(os.path.join(data_dir, CLUSTER_FILE), self.to_doc(), fsync)

    @classmethod
    def load(cls, data_dir: str, missing_ok: bool = False) -> "ClusterState | None":
        """The persisted state, or None for a directory that never held a cluster."""
        path = os.path.join(data_dir, CLUSTER_FILE)
        if not os.path.exists(path):
            shards = sorted(glob.glob(os.path.join(data_dir, "shard-*")))
            if shards and not missing_ok:
                raise CorruptData(f"cluster file {path} is missing, but {data_dir} holds {len(shards)} shard "
                                  f"directories ({os.path.basename(shards[0])}, ...): the tables and placement "
                                  f"are unknown; restore the file, or start with --reinit-missing to discard them")
            return None
        doc = read_json_checked(path, "cluster file")
        try:
            return cls.from_doc(doc)
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptData(f"cluster file {path} is not a cluster description ({type(e).__name__}: {e})") from None
