"""The same-node tier: read rows of the shards on this node straight from their shared memory.

A shard keeps its rows in a file in /dev/shm (shard.py). A worker on the same Ray node maps that
file read-only and gathers rows with plain loads: no request, no copy through a socket. This is
the model of a CXL load/store path: the memory belongs to the pool, the worker reads it in place.

The frame layout (which frame holds which slot) comes from the shard's Describe RPC, and a
seqlock in shared memory says whether it still holds: a read counts only if the layout version is
the same, and even, before and after it. Otherwise the caller falls back to gRPC (and the next
read re-reads the layout). Rows that a shard is updating during the read can be seen half
updated, exactly as through the shard's own gather.

    tier = NodeLocalTier(client)            # finds the shards on this node
    rows = tier.read("t", rank, ids)        # None if that shard is not on this node or its layout moved
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from dataclasses import dataclass, field

import numpy as np


log = logging.getLogger("engram_mem.worker.nodelocal")


@dataclass
class _TableMap:
    rows: np.ndarray        # [frames * slot_rows, dim], read-only mapping of the shard's file
    frame_of: np.ndarray    # int32 [n_slots]
    slot_rows: int
    path: str


@dataclass
class _ShardMap:
    address: str
    version: int
    layout: np.ndarray      # uint64 [1], read-only mapping of the seqlock word
    tables: dict[str, _TableMap] = field(default_factory=dict)


def _map_rows(path: str, dtype: np.dtype, n_rows: int, dim: int) -> np.ndarray:
    """Map a shard's rows read-only, with the page tables filled at once (MAP_POPULATE): a worker's
    first read of each page would otherwise take a page fault, which is most of the cost of random
    row reads from a table this process has not touched yet. A disk-backed file (storage.py) is
    mapped without it (populating would read the whole table from disk) and with no read-ahead."""
    nbytes = n_rows * dim * dtype.itemsize
    on_disk = not os.path.realpath(path).startswith("/dev/shm/")
    with open(path, "rb") as f:
        flags = mmap.MAP_SHARED | (0 if on_disk else getattr(mmap, "MAP_POPULATE", 0))
        mm = mmap.mmap(f.fileno(), nbytes, flags=flags, prot=mmap.PROT_READ)
    if on_disk:
        mm.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mm, dtype=dtype, count=n_rows * dim).reshape(n_rows, dim)


class NodeLocalTier:
    def __init__(self, client, node_id: str | None = None):
        self.client = client
        if node_id is None:
            import ray

            node_id = ray.get_runtime_context().get_node_id()
        self.node_id = node_id
        self._maps: dict[str, _ShardMap] = {}   # by shard address
        self._lock = threading.Lock()
        self.stats = {"rows": 0, "reads": 0, "fallbacks": 0}

    def local_ranks(self) -> list[int]:
        view = self.client.view
        return [r for r in range(len(view.shard_ids)) if self._member_here(view, r) is not None]

    def _member_here(self, view, rank: int) -> dict | None:
        """The member of shard `rank` on this node: its primary, or (for a client that reads replicas)
        a replica not marked down."""
        members = view.members(rank) if self.client.read_replicas else view.members(rank)[:1]
        return next((m for m in members if m.get("node_id") == self.node_id and self.client.member_up(m["address"])),
                    None)

    def _load(self, address: str) -> _ShardMap | None:
        d = self.client.describe_shard(address)
        if not d.layout_path:
            return None
        layout = np.memmap(d.layout_path, dtype="<u8", mode="r", shape=(1,))
        m = _ShardMap(address, d.layout_version, layout)
        tables = self.client.view.tables
        for t in d.tables:
            if not t.shm_path or t.frames == 0 or t.name not in tables:
                continue
            spec = tables[t.name].spec  # its stored row width (fp8 rows: values + scale bytes)
            rows = _map_rows(t.shm_path, spec.storage_dtype, t.frames * t.slot_rows, spec.storage_dim)
            m.tables[t.name] = _TableMap(rows, np.frombuffer(t.frame_of, "<i4"), t.slot_rows, t.shm_path)
        return m

    def read(self, name: str, rank: int, ids: np.ndarray) -> np.ndarray | None:
        """Rows of `ids` (all owned by the shard at `rank`) if that shard is on this node, else None."""
        info = self._member_here(self.client.view, rank)
        if info is None:
            return None
        address = info["address"]
        for attempt in range(2):
            with self._lock:
                m = self._maps.get(address)
                if m is None or int(m.layout[0]) != m.version or (name not in m.tables and attempt == 0):
                    try:
                        m = self._load(address)
                    except Exception as e:  # noqa: BLE001 - the shard may be restarting: use gRPC
                        log.debug("node-local describe of %s failed: %s", address, e)
                        m = None
                    if m is None:
                        self._maps.pop(address, None)
                        self.stats["fallbacks"] += 1
                        return None
                    self._maps[address] = m
            t = m.tables.get(name)
            if t is None:
                self.stats["fallbacks"] += 1
                return None
            v1 = int(m.layout[0])
            if v1 != m.version:
                continue
            frames = t.frame_of[ids // t.slot_rows]
            if ids.size and frames.min() < 0:  # not this shard's slots at this layout
                self.stats["fallbacks"] += 1
                return None
            local = frames.astype(np.int64) * t.slot_rows + ids % t.slot_rows
            rows = np.take(t.rows, local, axis=0)
            if int(m.layout[0]) == v1:
                self.stats["rows"] += int(ids.size)
                self.stats["reads"] += 1
                return rows
        self.stats["fallbacks"] += 1
        return None

    def close(self) -> None:
        with self._lock:
            self._maps.clear()
