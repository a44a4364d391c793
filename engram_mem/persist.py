"""lmdb snapshots of shard slots, so a restarted shard (or a restarted cluster) keeps its rows.

One lmdb environment per shard under the cluster's data directory:

    <data_dir>/shard-0003/data.mdb    keys  rows/<table>/<slot:08d>          raw rows of one slot
                                            state/<table>/<slot:08d>/<name>  optimizer state
    <data_dir>/cluster.json           tables, optimizers, shard count (the controller writes it)

Keys are per slot, not per shard, so a snapshot does not depend on placement: a slot restores
from whichever shard's environment holds it (restore() looks at the shard's own first, then at
the others under data_dir), even after the shard count changed. A snapshot writes only the slots
changed since the last one. Updates after the last snapshot are lost when a shard dies; the
controller snapshots every `snapshot_interval_s` and on `checkpoint`.

The data directory must be on storage the restarted shard can read: node-local disk when shards
are pinned to nodes, or a path every node sees (one writer per environment, so no lmdb locking
across machines is needed).
"""

from __future__ import annotations

import glob
import os

import lmdb
import numpy as np
import torch

_MAP_SIZE = 1 << 40  # 1 TiB of address space; lmdb files are sparse, disk use is what is written


def _key(kind: str, table: str, slot: int, name: str = "") -> bytes:
    return f"{kind}/{table}/{slot:08d}{'/' + name if name else ''}".encode()


class SlotStore:
    def __init__(self, data_dir: str, shard_id: int):
        self.data_dir = data_dir
        self.path = os.path.join(data_dir, f"shard-{shard_id:04d}")
        os.makedirs(self.path, exist_ok=True)
        self.env = lmdb.open(self.path, map_size=_MAP_SIZE, subdir=True, max_dbs=0, writemap=False,
                             metasync=False, sync=True, lock=True)

    def save(self, ts, slots) -> int:
        """Write the rows (and optimizer state) of `slots` of a TableShard. Returns bytes written."""
        spec, written = ts.spec, 0
        with ts.lock, self.env.begin(write=True) as txn:
            for slot in slots:
                frame = int(ts.frame_of[slot])
                if frame < 0:
                    continue
                a, b = spec.slot_range(int(slot))
                lo = frame * spec.slot_rows
                rows = ts.rows[lo: lo + b - a]
                txn.put(_key("rows", spec.name, int(slot)), memoryview(np.ascontiguousarray(rows)).cast("B"))
                written += rows.nbytes
                for name, v in ts.state.items():
                    part = v[lo: lo + b - a].contiguous().numpy()
                    txn.put(_key("state", spec.name, int(slot), name), memoryview(part).cast("B"))
                    written += part.nbytes
                ts.dirty[slot] = False
        return written

    def delete(self, table: str, slots=None) -> None:
        """Forget slots of a table (all of them if slots is None)."""
        prefixes = [f"rows/{table}/".encode(), f"state/{table}/".encode()]
        wanted = None if slots is None else {f"{int(s):08d}" for s in slots}
        with self.env.begin(write=True) as txn:
            cur = txn.cursor()
            for prefix in prefixes:
                if not cur.set_range(prefix):
                    continue
                keys = []
                for k in cur.iternext(keys=True, values=False):
                    if not k.startswith(prefix):
                        break
                    if wanted is None or k[len(prefix):len(prefix) + 8].decode() in wanted:
                        keys.append(bytes(k))
                for k in keys:
                    txn.delete(k)

    def close(self) -> None:
        self.env.close()


def _load_from(env: lmdb.Environment, ts, slot: int, out: np.ndarray, frame: int) -> bool:
    spec = ts.spec
    with env.begin(buffers=True) as txn:
        buf = txn.get(_key("rows", spec.name, slot))
        if buf is None or len(buf) != out.nbytes:
            return False
        out[:] = np.frombuffer(buf, dtype=out.dtype).reshape(out.shape)
        names = list(ts.optimizer.init_state(1, spec.dim))
        parts = {n: txn.get(_key("state", spec.name, slot, n)) for n in names}
        if names and all(p is not None for p in parts.values()):
            if not ts.state:
                ts.state = ts.optimizer.init_state(ts.buffer.frames * spec.slot_rows, spec.dim)
            lo = frame * spec.slot_rows
            for n, p in parts.items():
                dst = ts.state[n][lo: lo + out.shape[0]]
                dst.copy_(torch.from_numpy(np.frombuffer(p, dtype=dst.numpy().dtype).reshape(dst.shape).copy()))
    return True


class Restorer:
    """restore(ts, slot, frame, out) for ShardStore: this shard's snapshot first, then other shards'."""

    def __init__(self, own: SlotStore, store):
        self.own, self.store = own, store
        self._others: list[lmdb.Environment] | None = None

    def _other_envs(self) -> list[lmdb.Environment]:
        if self._others is None:
            self._others = []
            for path in sorted(glob.glob(os.path.join(self.own.data_dir, "shard-*"))):
                if os.path.abspath(path) != os.path.abspath(self.own.path) and os.path.exists(os.path.join(path, "data.mdb")):
                    self._others.append(lmdb.open(path, readonly=True, lock=False, map_size=_MAP_SIZE))
        return self._others

    def __call__(self, ts, slot: int, frame: int, out: np.ndarray) -> bool:
        return any(_load_from(env, ts, slot, out, frame) for env in [self.own.env, *self._other_envs()])

    def close(self) -> None:
        for env in self._others or []:
            env.close()
        self._others = None
