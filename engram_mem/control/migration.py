"""SlotMigration: the slot moves of one scale, copied while writes flow (pre-copy migration).

The controller's `scale()` drives it:

    mig = SlotMigration(shards, tables, plans, batch_bytes)   # plans: {table: rebalance(...)}
    mig.precopy()                 # every moved slot, then again those changed meanwhile; writes go on
    with sup.frozen(shards):
        mig.finish()              # writes wait: only the slots changed since their last copy
        ...                       # switch the placement, persist it, drop the slots at the sources

Each copy is a cut at the source: rows, optimizer state and idempotency keys of a batch of slots,
exact as of one lsn of the source's log (`ShardStore.copy_slots`). It travels source to
destination through the object store (only the lsn comes back here), and the destination
installs it and logs it whole (an INSTALL record), overwriting the slot if it holds an older
copy. The source keeps the lsn of the last change to every slot (`mod_lsn`), so one call per
source tells which moved slots changed after their cut (`changed_since`); with writes frozen that
answer is final, and copying those slots again makes every destination exact. A push applied at
the source after the first copy reaches the destination with its key, so a retry of it is
skipped there as everywhere.

Rounds before the freeze: the first copies every moved slot; another follows while the slots
changed meanwhile hold more than SMALL_FRACTION of the moved bytes and at most half of what the
round before copied (the changed set shrinks), up to PRECOPY_ROUNDS. Pushes that touch every slot
all the time keep every slot changed: then the freeze copies them all again, as a migration
without pre-copy would (but into slots already allocated at the destination, which is faster).

A copy installed before its move is published is never served: clients route by the placement,
which still names the source, and a destination that restarts holds only the slots the cluster
file gives it (its INSTALL records are replayed only into slots it holds). A shard that restarted
during the pre-copy (its process changed) has all its moves copied again under the freeze. If the
scale fails before the switch, `abandon()` drops the copies from the destinations.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger("engram_mem.control.migration")

PRECOPY_ROUNDS = 3       # copy rounds before the freeze at most (the first copies every moved slot)
SMALL_FRACTION = 0.125   # freeze once the slots changed since their copy hold at most this part of the moved bytes


class SlotMigration:
    def __init__(self, shards: dict[int, object], tables: dict, plans: dict[str, tuple], batch_bytes: int):
        """shards: {shard id: actor handle}, old and new; tables: {name: TableRecord};
        plans: {name: (new placement, {(src, dst): slots})} from placement.rebalance."""
        self.shards = dict(shards)
        self.moves = {name: moves for name, (_, moves) in plans.items() if moves}
        self.specs = {name: tables[name].spec for name in self.moves}
        self.batch_bytes = batch_bytes
        # lsn of each moved slot's last copy, in its source's log (-1: not copied yet)
        self.cuts = {name: np.full(spec.n_slots, -1, dtype=np.int64) for name, spec in self.specs.items()}
        self.moved_bytes = self._bytes(self.moves)
        self.precopied_bytes = 0   # copied before the freeze, all rounds
        self.recopied_bytes = 0    # copied again under the freeze
        self.rounds = 0
        self._pids: dict[int, int] = {}

    def _slot_bytes(self, name: str) -> int:
        spec = self.specs[name]
        return spec.slot_rows * spec.row_bytes

    def _bytes(self, moves: dict[str, dict]) -> int:
        return sum(slots.size * self._slot_bytes(name) for name, m in moves.items() for slots in m.values())

    # ---- the phases --------------------------------------------------------------------------
    def precopy(self, rounds: int = PRECOPY_ROUNDS, small: float = SMALL_FRACTION) -> None:
        """Copy every moved slot, then again those changed meanwhile while that converges (writes flow)."""
        self._pids = self._incarnations()
        todo, last = self.moves, self.moved_bytes
        while True:
            self._copy(todo)
            self.precopied_bytes += last
            self.rounds += 1
            if self.rounds >= rounds:
                break
            todo = self._changed()
            n = self._bytes(todo)
            if n <= small * self.moved_bytes or n > last / 2:  # few changed, or as many as it copied: freeze
                break
            last = n
        log.info("pre-copy: %d round(s), %.1f MB copied for %.1f MB moved", self.rounds, self.precopied_bytes / 1e6,
                 self.moved_bytes / 1e6)

    def finish(self) -> None:
        """With writes frozen: copy again the slots changed since their last copy, and every move of a
        shard that restarted since the pre-copy began. Afterwards every destination is exact."""
        todo = self._changed(restarts=True)
        self._copy(todo)
        self.recopied_bytes = self._bytes(todo)

    def abandon(self) -> None:
        """The scale failed before its placement switched: drop the copies from the destinations
        (best effort; a destination that keeps one never serves it, and a restart does not load it)."""
        import ray

        refs = []
        for name, moves in self.moves.items():
            for (_src, dst), slots in moves.items():
                copied = slots[self.cuts[name][slots] >= 0]
                if copied.size:
                    refs.append(self.shards[dst].remove_slots.remote(name, copied))
        try:
            ray.get(refs, timeout=120)
        except Exception as e:  # noqa: BLE001 - the scale's own error is the one raised
            log.warning("abandoned scale: dropping pre-copied slots failed: %s: %s", type(e).__name__, e)

    # ---- copies and the changed set ------------------------------------------------------------
    def _copy(self, moves: dict[str, dict]) -> None:
        """Copy slots source to destination in batches of about batch_bytes; note each batch's cut."""
        import ray

        for name, pairs in moves.items():
            per_batch = max(1, self.batch_bytes // max(1, self._slot_bytes(name)))
            for (src, dst), slots in pairs.items():
                for i in range(0, slots.size, per_batch):
                    part = slots[i:i + per_batch]
                    # The rows travel shard to shard through the object store, not through here.
                    lsn, data = self.shards[src].copy_slots.options(num_returns=2).remote(name, part)
                    cut, _ = ray.get([lsn, self.shards[dst].add_slots.remote(name, data)])
                    self.cuts[name][part] = cut

    def _changed(self, restarts: bool = False) -> dict[str, dict]:
        """The moves still to copy: slots changed at their source since their cut (one call per
        source); with `restarts`, every move from or to a shard whose process changed."""
        import ray

        asks: dict[int, dict] = {}
        for name, pairs in self.moves.items():
            for src in {s for s, _ in pairs}:
                slots = np.concatenate([v for (s, _), v in pairs.items() if s == src])
                asks.setdefault(src, {})[name] = (slots, self.cuts[name][slots])
        refs = {src: self.shards[src].changed_slots.remote(q) for src, q in asks.items()}
        pids = self._incarnations() if restarts else self._pids
        got = dict(zip(refs, ray.get(list(refs.values()))))
        restarted = {sid for sid, pid in pids.items() if self._pids.get(sid) != pid}
        if restarted:
            log.warning("shards %s restarted during the pre-copy: their moves are copied again whole", sorted(restarted))
        out: dict[str, dict] = {}
        for name, pairs in self.moves.items():
            for (src, dst), slots in pairs.items():
                sel = slots if {src, dst} & restarted else np.intersect1d(slots, got[src][name])
                if sel.size:
                    out.setdefault(name, {})[(src, dst)] = sel
        return out

    def _incarnations(self) -> dict[int, int]:
        """{shard id: process id}: a shard that Ray restarted runs in a new process."""
        import ray

        infos = ray.get([h.info.remote() for h in self.shards.values()], timeout=300)
        return {sid: i["pid"] for sid, i in zip(self.shards, infos)}
