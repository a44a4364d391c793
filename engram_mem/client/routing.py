"""Request routing: the cluster as a client sees it, and how a request is cut into per-shard parts.

    view = ClusterView(controller.describe())
    grouped, parts, order = split_by_shard(view.table("t"), sorted_distinct_ids, len(view.shard_ids))
    for a, b in slot_aligned_chunks(ids, slot_rows, max_ids): ...   # never cut a slot (idempotency keys)
    send, dest, dups = repeat_plan(ids)      # which ids a gather asks for, and where repeats come from

Nothing here does I/O: it is arithmetic over the placement (slot -> shard rank).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engram_mem.errors import StaleEpoch, UnknownTable
from engram_mem.optim import OptimizerSpec
from engram_mem.table import TableSpec


@dataclass(frozen=True)
class TableView:
    spec: TableSpec
    optimizer: OptimizerSpec
    placement: np.ndarray  # int32 [n_slots]: shard rank of each slot


class ClusterView:
    """An immutable snapshot of the controller's describe()."""

    def __init__(self, d: dict):
        self.raw = d
        self.epoch: int = d["epoch"]
        self.shard_ids: list[int] = sorted(d["shards"])         # rank -> shard id
        self.shards: dict[int, dict] = d["shards"]
        self.tables = {n: TableView(TableSpec.from_dict(t["spec"]), OptimizerSpec.from_dict(t["optimizer"]),
                                    np.asarray(t["placement"], dtype=np.int32)) for n, t in d["tables"].items()}

    def table(self, name: str) -> TableView:
        t = self.tables.get(name)
        if t is None:
            known = ", ".join(sorted(self.tables)) or "none"
            raise UnknownTable(f"unknown table {name!r} (the cluster has: {known})")
        return t

    def address(self, rank: int) -> str:
        """The address of the shard's primary (writes and pushes go there)."""
        return self.shards[self.shard_ids[rank]]["address"]

    def primary(self, rank: int) -> dict:
        """The shard's primary member (address, data_address, node_id, actor, ...)."""
        return self.shards[self.shard_ids[rank]]

    def members(self, rank: int) -> list[dict]:
        """The shard's primary, then its replicas (each: address, node_id, member, actor, ...)."""
        primary = self.shards[self.shard_ids[rank]]
        return [primary, *primary.get("replicas", [])]

    def with_shard(self, info: dict) -> "ClusterView":
        """The same view with one member's address (and pid, node) replaced: a restarted shard or replica."""
        raw = dict(self.raw, shards=dict(self.raw["shards"]))
        sid, member = info["shard_id"], info.get("member", 0)
        fresh = {k: v for k, v in info.items() if k != "tables"}
        if member == 0:
            raw["shards"][sid] = dict(raw["shards"][sid], **fresh)
        else:
            reps = [dict(r, **fresh) if r.get("member") == member else r
                    for r in raw["shards"][sid].get("replicas", [])]
            raw["shards"][sid] = dict(raw["shards"][sid], replicas=reps)
        return ClusterView(raw)


DEDUP_SHARE = 8  # a gather whose repeats are more than 1/8 of its ids asks for each distinct id once


def repeat_plan(flat: np.ndarray):
    """How a gather of `flat` (int64, any order, repeats allowed) handles its repeated ids:
    (send, dest, dups). The rows of `send` land at out[dest] (out[:len(send)] if dest is None);
    then out[dups[0]] = out[dups[1]] (dups None: nothing to copy).

    Few repeats (at most 1/DEDUP_SHARE of the ids, as uniform traffic has): every id is asked for
    as it is, so one shard's rows land straight in place, in request order; the repeats' rows are
    then copied from one occurrence each, so every copy of an id in a result holds the same row
    even if a push lands between two blocks of the reply. Many repeats (Zipf traffic): each
    distinct id is asked for once, at one of its positions. One sort either way (np.unique's
    index and inverse cost 4x as much)."""
    n = flat.size
    if n < 2:
        return flat, None, None
    order = np.argsort(flat)
    s = flat[order]
    first = np.empty(n, dtype=bool)
    first[0] = True
    np.not_equal(s[1:], s[:-1], out=first[1:])
    repeats = n - int(np.count_nonzero(first))
    if not repeats:
        return flat, None, None
    group_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    rest = ~first
    dups = (order[rest], order[group_start[rest]])
    if repeats * DEDUP_SHARE <= n:
        return flat, None, dups
    dest = np.sort(order[first])
    return flat[dest], dest, dups


def split_by_shard(t: TableView, uniq: np.ndarray, n_shards: int):
    """Group ids (distinct, or with repeat_plan's few repeats) by shard rank: (ids[order], [(rank, start, stop)], order or None if identity)."""
    ranks = t.placement[uniq // t.spec.slot_rows]
    if uniq.size and int(ranks.max()) >= n_shards:  # never drop a part: re-read the cluster instead
        raise StaleEpoch(f"table {t.spec.name!r}: the placement names shard {int(ranks.max())}, but this client "
                         f"knows {n_shards} shard(s); re-read the cluster")
    if n_shards == 1 or uniq.size == 0:
        return uniq, [(int(ranks[0]) if uniq.size else 0, 0, uniq.size)], None
    counts = np.bincount(ranks, minlength=n_shards)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    parts = [(r, int(bounds[r]), int(bounds[r + 1])) for r in range(n_shards) if counts[r]]
    order = None if len(parts) == 1 else _rank_order(ranks)   # one shard: rows land contiguously
    return (uniq, parts, None) if order is None else (uniq[order], parts, order)


def _rank_order(ranks: np.ndarray) -> np.ndarray | None:
    """The stable order grouping ids by shard rank; None when they are grouped already."""
    return None if bool(np.all(ranks[1:] >= ranks[:-1])) else np.argsort(ranks, kind="stable")


def shard_grouped(t: TableView, uniq: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Sorted distinct ids grouped by shard rank, each shard's still sorted: (grouped, order or
    None if they already were). A fetch that keeps its distinct ids in this order gets each
    shard's rows contiguously (split_by_shard: no scatter), and a push of them is not re-sorted."""
    order = _rank_order(t.placement[uniq // t.spec.slot_rows]) if uniq.size > 1 else None
    return (uniq, None) if order is None else (uniq[order], order)


def is_shard_grouped(t: TableView, ids: np.ndarray) -> bool:
    """Distinct ids, grouped by shard rank and increasing within each shard (shard_grouped's
    order; plain sorted distinct ids on one shard)."""
    if ids.size < 2:
        return True
    ranks = t.placement[ids // t.spec.slot_rows]
    dr, di = np.diff(ranks), np.diff(ids)
    return bool(np.all((dr > 0) | ((dr == 0) & (di > 0))))


def dest_rows(dest: np.ndarray | None, order: np.ndarray | None, a: int, b: int) -> np.ndarray | None:
    """Output rows of send[order[a:b]] (None: the contiguous rows a:b)."""
    if order is None:
        return None if dest is None else dest[a:b]
    return order[a:b] if dest is None else dest[order[a:b]]


def slot_aligned_chunks(ids: np.ndarray, slot_rows: int, max_ids: int):
    """(start, stop) ranges of sorted ids, at most max_ids long where a slot allows, never cutting a
    slot: a key is remembered per slot, so one slot's rows of a request must travel together."""
    if ids.size <= max_ids:
        yield 0, ids.size
        return
    slots = ids // slot_rows
    bounds = np.concatenate([[0], np.nonzero(np.diff(slots))[0] + 1, [ids.size]])
    a = 0
    for i in range(1, bounds.size):
        if bounds[i] - a > max_ids and bounds[i - 1] > a:
            yield a, int(bounds[i - 1])
            a = int(bounds[i - 1])
    yield a, ids.size
