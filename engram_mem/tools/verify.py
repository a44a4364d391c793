"""`engram-mem verify`: check a cluster's imported rows against the digests their import recorded.

    engram-mem verify [--table engram.l1] [--sample 64 | --full] [--seed 0]
    verify_tables(mem, sample=64)      # {table: {"slots_checked", "bad_slots", "first_bad", ...}}

An import (importer.py) digests every slot's stored rows as they stream (sha256, cut to 128 bits) and records
the digests with the table. Verify asks each shard to digest its own slots in place
(ShardActor.slot_digests -> digest_slots), so only digests travel: all of them (full) or a seeded
random sample of slots per table. The first slot that differs is then pinned to its first
differing row and byte: its rows are read from the shard and compared with the same rows read
again from the import's source files; when those are gone or changed (their rows no longer have
the recorded digest) the report names the slot's row range instead.
"""

from __future__ import annotations

import os

import numpy as np

from engram_mem.errors import InvalidArgument
from engram_mem.tools.importer import assemble_rows, digest_rows, slot_item


def _slot_bytes(image, row_bytes: int) -> np.ndarray:
    return np.ascontiguousarray(image.rows).view(np.uint8).reshape(-1, row_bytes)   # [rows, row bytes]


def digest_slots(store, table: str, slots) -> dict[int, str]:
    """Runs in a shard: {slot: digest of its stored rows}, one slot copied at a time."""
    row_bytes = store._table(table).spec.row_bytes
    return {int(s): digest_rows(_slot_bytes(store.export_slots(table, [int(s)])[int(s)], row_bytes)) for s in slots}


def verify_tables(client, tables: list[str] | None = None, *, sample: int = 0, seed: int = 0) -> dict:
    """Check `tables` (default: every table with a recorded identity); sample: slots per table
    (0: all). Returns per table {"slots_checked", "slots", "bad_slots", "first_bad"} where first_bad
    is None or {"slot", "rows": [a, b), "row", "byte", "reason"}."""
    import ray

    d = client.describe()
    names = tables or [n for n, t in d["tables"].items() if (t.get("meta") or {}).get("identity")]
    if not names:
        raise InvalidArgument("no table in the cluster has a recorded identity: import one first")
    actors = ray.get(client.controller.shard_actors.remote())
    view = client.refresh()
    out = {}
    for name in names:
        if name not in d["tables"]:
            raise InvalidArgument(f"unknown table {name!r}")
        meta = ray.get(client.controller.table_meta.remote(name))
        recorded = {int(s): h for s, h in (meta.get("_digests") or {}).items()}
        if not recorded:
            raise InvalidArgument(f"table {name!r} has no recorded digests: it was not imported, or its import "
                                  f"did not finish")
        t = view.table(name)
        slots = sorted(recorded)
        if sample and sample < len(slots):
            slots = sorted(np.random.default_rng(seed).choice(slots, sample, replace=False).tolist())
        by_rank: dict[int, list[int]] = {}
        for s in slots:
            by_rank.setdefault(int(t.placement[s]), []).append(s)
        got: dict[int, str] = {}
        for part in ray.get([actors[view.shard_ids[r]].slot_digests.remote(name, ss) for r, ss in by_rank.items()]):
            got.update(part)
        bad = [s for s in slots if got[s] != recorded[s]]
        first = _locate(actors[view.shard_ids[int(t.placement[bad[0]])]], t.spec, name, meta, bad[0],
                        recorded[bad[0]]) if bad else None
        out[name] = {"slots_checked": len(slots), "slots": t.spec.n_slots, "bad_slots": bad, "first_bad": first}
    return out


def _locate(actor, spec, name: str, meta: dict, slot: int, want: str) -> dict:
    """The first differing row and byte of a slot whose digest differs, from the source files."""
    import ray

    a, b = spec.slot_range(slot)
    have = _slot_bytes(ray.get(actor.export_slots.remote(name, [slot]))[slot], spec.row_bytes)
    item = slot_item(meta.get("_pieces") or [], slot, a, b)
    fds: dict[str, int] = {}
    try:
        src, _ = assemble_rows(item, spec.row_bytes, fds)
    except (OSError, InvalidArgument) as e:
        return {"slot": slot, "rows": [a, b], "row": None, "byte": None,
                "reason": f"rows [{a}, {b}) differ from the import; its source files cannot be read again ({e})"}
    finally:
        for fd in fds.values():
            os.close(fd)
    if digest_rows(src) != want:
        return {"slot": slot, "rows": [a, b], "row": None, "byte": None,
                "reason": f"rows [{a}, {b}) differ from the import; its source files have changed since"}
    r, c = np.argwhere(have != src)[0]
    return {"slot": slot, "rows": [a, b], "row": a + int(r), "byte": int(c),
            "reason": f"row {a + int(r)} differs from the import at byte {int(c)} "
                      f"({int(have[r, c])} in the cluster, {int(src[r, c])} in {_file_at(item, a + int(r), int(c))})"}


def _file_at(item: dict, row: int, col: int) -> str:
    for file, _, _, row0, col0, width, _ in item["pieces"]:
        if col0 <= col < col0 + width and row >= row0:
            return os.path.basename(file)
    return "the source"
