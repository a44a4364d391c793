"""Recovery: rebuild a shard's slots from snapshot generations and write-ahead logs on disk.

    restore_tables(store, data_dir, tables, reinit_missing=False)

`tables` lists, for every table, the slots this shard must hold and, for each slot, the shard
whose directory holds that slot's newest history (`source[slot]`): its current snapshot
generation, then the records of its log after the lsn the slot was copied at. Normally the
source is the shard itself (a restarted shard); after a change of shard count, or when a cluster
is restored from a checkpoint directory, it is whichever shard held the slot then. Slots of a
shard that a placement no longer gives it are never read, so stale copies from earlier layouts
cannot come back.

Replay applies a record only to the slots it is restoring from that source and only if the
record is newer than the slot's snapshot. Row-wise optimizers update each row from its own
state alone, so replaying the part of a push that falls in some slots gives those rows exactly
what the whole push gave them.

Anything missing or damaged (manifest, generation file, a value's checksum, a log record before
the log's end) raises CorruptData naming the file, unless `reinit_missing`, in which case the
slots it would have given start from their initial values (and that is logged loudly).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from engram_mem.errors import CorruptData
from engram_mem.optim import OptimizerSpec
from engram_mem.storage.snapshot import SnapshotReader, shard_dir
from engram_mem.table import TableSpec
from engram_mem.storage.wal import WriteAheadLog

log = logging.getLogger("engram_mem.storage.recovery")


@dataclass
class TablePlan:
    spec: TableSpec
    optimizer: OptimizerSpec
    uid: str
    slots: np.ndarray       # int64: the slots this shard holds
    source: np.ndarray      # int32 [n_slots]: the shard directory each slot comes from (-1: initial values)


def wal_dir(data_dir: str, shard_id: int) -> str:
    return os.path.join(shard_dir(data_dir, shard_id), "wal")


def restore_tables(store, data_dir: str | None, tables: list[TablePlan], epoch: int = 0,
                   reinit_missing: bool = False) -> dict:
    """Add each table to `store` with its slots restored. Returns {"slots_restored", "records_replayed"}."""
    readers: dict[int, SnapshotReader | None] = {}

    def reader(src: int) -> SnapshotReader | None:
        if src not in readers:
            try:
                readers[src] = SnapshotReader(data_dir, src)
            except CorruptData:
                if not reinit_missing:
                    raise
                log.error("shard directory %s is damaged; its slots start from initial values "
                          "(--reinit-missing)", shard_dir(data_dir, src))
                readers[src] = None
        return readers[src]

    restored = 0

    def restore(ts, slot, frame, out) -> bool:
        nonlocal restored
        src = int(plan_of[ts.spec.name].source[slot])
        r = reader(src) if (data_dir and src >= 0) else None
        if r is None:
            return False
        try:
            got = r.get(ts.spec.name, slot)
        except CorruptData:
            if not reinit_missing:
                raise
            log.error("table %r slot %d: damaged snapshot value; initial values (--reinit-missing)",
                      ts.spec.name, slot)
            return False
        if got is None:
            return False
        lsn, parts = got
        store.load_slot(ts, slot, frame, out, lsn, parts)
        restored += 1
        return True

    plan_of = {t.spec.name: t for t in tables}
    try:
        for t in tables:
            if t.spec.name in store.tables:
                store.drop_table(t.spec.name)
            store.add_table(t.spec, t.slots, t.optimizer, epoch=epoch, restore=restore, uid=t.uid)
        replayed = 0
        sources = sorted({int(s) for t in tables for s in np.unique(t.source[t.slots]) if s >= 0}) if data_dir else []
        for src in sources:
            if reader(src) is None:
                continue
            replayed += _replay_from(store, data_dir, src, plan_of, reader(src).manifest, reinit_missing)
    finally:
        for r in readers.values():
            if r is not None:
                r.close()
    own = readers.get(store.shard_id)
    if own is not None:
        store.lsn = max(store.lsn, own.last_lsn)
    return {"slots_restored": restored, "records_replayed": replayed}


def _replay_from(store, data_dir: str, src: int, plan_of: dict[str, TablePlan], manifest: dict,
                 reinit_missing: bool = False) -> int:
    """Replay shard src's log into the slots sourced from it. Returns records applied."""
    path = wal_dir(data_dir, src)
    if not os.path.isdir(path):
        if manifest.get("log") and not reinit_missing:
            raise CorruptData(f"write-ahead log directory {path} is missing, but its snapshot manifest says shard "
                              f"{src} logged its changes there: those after lsn {manifest['last_lsn']} are lost; "
                              f"restore the directory, or start with --reinit-missing")
        if manifest.get("log"):
            log.error("write-ahead log directory %s is missing: shard %d restarts from its snapshot alone "
                      "(--reinit-missing)", path, src)
        return 0
    masks = {}
    for name, t in plan_of.items():
        m = np.zeros(t.spec.n_slots, dtype=bool)
        m[t.slots] = t.source[t.slots] == src
        masks[name] = m
    after = min((int(store.tables[n].slot_lsn[m].min()) for n, m in masks.items() if m.any()), default=0)
    wal = WriteAheadLog(path, policy="process")
    n, prev = 0, None
    own = src == store.shard_id
    for rec in wal.replay(after=after):
        if prev is not None and rec.lsn != prev + 1:
            raise CorruptData(f"write-ahead log {wal.path} skips from lsn {prev} to {rec.lsn}: "
                              f"a segment is missing")
        prev = rec.lsn
        if own:
            store.lsn = max(store.lsn, rec.lsn)
        store.replay(rec, wanted=lambda ts: masks[ts.spec.name])
        n += 1
    return n
