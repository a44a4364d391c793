"""Record the Engram row ids a real run reads, for `engram-mem plan --trace`.

    engram-train --config small --steps 50 --record-ids runs/ids.npz
    engram-generate --checkpoint runs/small/ckpt --prompt "def f(" --record-ids runs/gen-ids.npz
    engram-mem plan --model v4.1-flash --trace runs/ids.npz       # cache sizes, hit rates from real traffic

    rows = IdRecorder(rows, "runs/ids.npz")     # any RowSource; model.rows = rows; ...; rows.save()

IdRecorder wraps a RowSource and keeps a copy of the ids of every prefetch (the model calls
prefetch once per Engram layer per forward, with all of the batch's ids, duplicates included),
then saves them as one .npz: per layer the ids in call order (`l{layer}.ids`, the smallest
unsigned dtype that holds the table), the ids per call (`l{layer}.calls`) and the distinct ids per
call (`l{layer}.distinct`), plus the table sizes. It stops keeping ids (and says so in the file)
after `max_ids`, so a long run cannot fill memory. Everything else is passed to the wrapped source.
numpy only: the planner reads traces without torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np


class IdRecorder:
    """A RowSource that records the ids it is asked for and delegates everything to `inner`."""

    def __init__(self, inner, path: str, max_ids: int = 50_000_000):
        self.inner, self.path, self.max_ids = inner, str(path), int(max_ids)
        self._ids: dict[int, list[np.ndarray]] = {}
        self.kept, self.truncated = 0, False
        specs = getattr(inner, "specs", {}) or {}
        self.table_rows = {int(l): int(s.rows) for l, s in specs.items()}

    # ---- RowSource -------------------------------------------------------------------------
    def prefetch(self, layer: int, row_ids) -> None:
        self.record(layer, row_ids)
        self.inner.prefetch(layer, row_ids)

    def get(self, layer: int, row_ids):
        return self.inner.get(layer, row_ids)

    def step(self, lr: float, step: int) -> None:
        self.inner.step(lr, step)

    def zero_grad(self) -> None:
        self.inner.zero_grad()

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state) -> None:
        self.inner.load_state_dict(state)

    def close(self) -> None:
        self.save()
        self.inner.close()

    def __getattr__(self, name):  # wait_s, stats(), flush(), fetcher, ... of the wrapped source
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    # ---- recording -------------------------------------------------------------------------
    def record(self, layer: int, row_ids) -> None:
        ids = np.asarray(row_ids.detach().reshape(-1).cpu().numpy() if hasattr(row_ids, "detach") else row_ids,
                         dtype=np.int64).reshape(-1)
        if self.kept + ids.size > self.max_ids:
            self.truncated = True
            return
        self._ids.setdefault(int(layer), []).append(ids.copy())
        self.kept += ids.size

    def save(self, path: str | None = None) -> str:
        """Write the trace (.npz); returns its path. Safe to call more than once."""
        path = str(path or self.path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        out = {}
        for layer, parts in self._ids.items():
            ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            top = max(int(ids.max()) if ids.size else 0, self.table_rows.get(layer, 0))
            dtype = np.uint32 if top < 2**32 else np.uint64
            out[f"l{layer}.ids"] = ids.astype(dtype)
            out[f"l{layer}.calls"] = np.array([p.size for p in parts], np.int64)
            out[f"l{layer}.distinct"] = np.array([np.unique(p).size for p in parts], np.int64)
        meta = {"version": 1, "layers": sorted(self._ids), "table_rows": self.table_rows,
                "truncated": self.truncated, "max_ids": self.max_ids}
        out["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        np.savez_compressed(path, **out)
        return path if path.endswith(".npz") else path + ".npz"


@dataclass
class Trace:
    layers: list[int]
    table_rows: dict[int, int]
    truncated: bool
    _data: dict

    def ids(self, layer: int) -> np.ndarray:
        return self._data[f"l{layer}.ids"].astype(np.int64)

    def calls(self, layer: int) -> int:
        return int(self._data[f"l{layer}.calls"].size)

    def call_sizes(self, layer: int) -> np.ndarray:
        return self._data[f"l{layer}.calls"]

    def distinct_per_call(self, layer: int) -> float:
        d = self._data[f"l{layer}.distinct"]
        return float(d.mean()) if d.size else 0.0


def load_trace(path: str) -> Trace:
    """Read a trace IdRecorder saved; ValueError naming the file if it is not one."""
    try:
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise ValueError(f"id trace {path!r} does not exist; record one with engram-train --record-ids {path}") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path!r} is not an id trace (.npz written by --record-ids): {e}") from None
    if "meta" not in data:
        raise ValueError(f"{path!r} is not an id trace: no 'meta' entry (write traces with --record-ids)")
    meta = json.loads(bytes(data.pop("meta")).decode())
    return Trace(layers=[int(l) for l in meta["layers"]], table_rows={int(k): v for k, v in meta["table_rows"].items()},
                 truncated=bool(meta["truncated"]), _data=data)
