"""ClusterRows: Engram rows from the memory cluster, fetched one layer ahead.

The model does not change between a local table and a remote one; only its RowSource does.

    mem = engram_mem.connect(address)                       # the memory cluster (see engram_mem.client.api)
    rows = ClusterRows(mem, table_specs(cfg), device="cuda")   # creates the tables if missing
    model = EngramModel(cfg, rows=rows)

Per forward, the model hashes the batch for every Engram layer and calls prefetch(layer, ids) for
each, in layer order, before any block runs: each fetch starts on the fetcher's thread at once and
is in flight while the blocks before its Engram layer compute; a small one (decode: at most
stagger_ids ids) for a later layer starts when the layer before it has its rows instead, so it
does not delay the first. get(layer, ids) then waits only for whatever is left (`wait_s` adds
that exposed wait up).

Batches ahead: row ids depend only on the tokens, so a caller that knows its next batch (the
engine's next prefill chunk, a queue of prompts) calls EngramModel.prefetch(next_tokens) while
the current batch computes; that batch's forward then finds its fetches in flight (a prefetch of
ids equal to one already in flight posts nothing; `prefetched_ahead` counts these) and layer 1
gets a whole step of window instead of one block. Up to `ahead` fetches a layer wait in flight
beyond the current one, oldest dropped first. Training drops them at step(): rows fetched before
a push may not hold it (staleness 0 holds). A fetch reads the worker's hot-row cache,
then the shards on this node straight from shared memory, then remote shards over gRPC
(engram_mem.worker.fetcher). It de-duplicates the batch's ids; only the distinct rows travel, and they are
expanded on the model's device (pinned host memory and a non-blocking copy where CUDA exists).

Training: step() sums each row's gradient over the batch and pushes it to the shards, where the
row-wise optimizer (Adam at 5x the dense lr, no weight decay, as in the paper) applies it. The push
is asynchronous: it overlaps the dense optimizer step and the next batch's preparation, and the
next fetch of that table waits until it has been applied. So a step always reads rows that include
every update this worker made (staleness 0); with several data-parallel workers, another worker's
update of the same step may land before or after (staleness <= 1 step).

Inference workers pass train=False: no leaves, no pushes, tables read-only from this worker.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import torch

from engram_mem.errors import NonFiniteGradient
from engram_mem.worker.fetcher import RowFetcher
from engram_mem.table import rows_to_float
from engram_mem.table import TableSpec, as_torch
from engram_mem.validate import all_finite
from engram_model.rows import TABLE_OPTIMIZER, RowSource, table_name, table_specs


# A decode step's fetches are small and their data path is shared: the first layer's rows come
# sooner when the later layers' fetches do not go out with it (bench_decode, through the agent
# from another node: a lower exposed wait in each paired round, not a shorter step; see
# docs/benchmarks.md). A later layer then has one layer's window, which a small fetch fits;
# larger fetches (prefill, training) all go out at the forward's start.
STAGGER_IDS = 4096


class ClusterRows(RowSource):
    def __init__(self, client, specs: dict[int, TableSpec], device: torch.device | str = "cpu", *,
                 train: bool = True, prefetch: bool = True, cache_bytes: int = 0, node_local: bool = True,
                 optimizer: dict | None = TABLE_OPTIMIZER, create: bool = True, grad_scale: float = 1.0,
                 agent: bool = True, stagger_ids: int = STAGGER_IDS, ahead: int = 2):
        """prefetch: fetch every Engram layer's rows ahead from prefetch(); False fetches each at
        get(). cache_bytes: hot-row cache per table for rows of remote shards (0 = none; through
        the agent, the node's shared cache is at least this big); grad_scale: multiplies pushed
        gradients (1/world_size under data parallelism, so the pushes add up to the global-batch
        gradient). agent: read and push through this node's fetch agent (engram_mem/agent/: the
        read path runs in its process, one cache for every worker of the node); False runs the
        read path in this process (RowFetcher), as before the agent. Both give the same rows.
        stagger_ids: a later layer's prefetch of at most this many ids goes out once the layer
        before it has its rows, not at the forward's start (0: every prefetch at the start).
        ahead: fetches a layer keeps in flight for later batches (EngramModel.prefetch) beside
        the current one; a fetch nobody read goes once more than this many wait behind it."""
        if ahead < 0:
            raise ValueError(f"ahead counts fetches kept in flight for later batches and must be >= 0, got {ahead}")
        self.client = client
        self.specs = dict(specs)
        self.device = torch.device(device)
        self.train_mode, self.prefetch_enabled, self.grad_scale = train, prefetch, grad_scale
        if create:
            for spec in self.specs.values():
                client.create_table_spec(spec, optimizer=optimizer, exist_ok=True)
        have = client.tables()
        for layer, spec in self.specs.items():
            got = have.get(spec.name)
            # Tables the model did not create (e.g. imported: engram-mem import) need only the same geometry.
            same_shape = got is not None and (got.rows, got.dim, got.dtype, got.block) == \
                (spec.rows, spec.dim, spec.dtype, spec.block)
            if got != spec and (create or not same_shape):
                raise ValueError(f"layer {layer}: the cluster's table {spec.name!r} is {have.get(spec.name)}, "
                                 f"the model needs {spec}")
        caches = {s.name: cache_bytes for s in self.specs.values()}
        if agent:
            from engram_mem.agent import AgentReader

            self.fetcher = AgentReader(client, cache_bytes=caches, node_local=node_local)
        else:
            self.fetcher = RowFetcher(client, cache_bytes=caches, node_local=node_local)
        self.agent = agent
        self._inflight: dict[int, list[tuple[torch.Tensor, object]]] = {}  # layer -> fetches, oldest first
        self.stagger_ids, self.ahead = stagger_ids, ahead
        self.prefetched_ahead = 0   # prefetches that found the same ids already in flight (posted ahead)
        self._held: dict[int, torch.Tensor] = {}  # small prefetches waiting for the layer before theirs
        self._leaves: list[tuple[int, np.ndarray, torch.Tensor, torch.Tensor]] = []  # layer, uniq, inv, leaf
        self._pushes: list = []
        self.wait_s = 0.0       # time get() spent waiting for or reading rows (the exposed fetch latency)
        self.fetches = 0

    # ---- rows in ---------------------------------------------------------------------------
    def _check_layer(self, layer: int) -> None:
        if layer not in self.specs:
            raise ValueError(f"no Engram table for layer {layer}; tables: {sorted(self.specs)}")

    def _ids(self, layer: int, row_ids: torch.Tensor) -> np.ndarray:
        self._check_layer(layer)
        self.fetches += 1
        return row_ids.detach().reshape(-1).to("cpu", non_blocking=False).numpy()

    def prefetch(self, layer: int, row_ids: torch.Tensor) -> None:
        self._check_layer(layer)  # bad input is an error, prefetching or not
        if not self.prefetch_enabled or self._on_its_way(layer, row_ids):
            return
        self._held.pop(layer, None)
        if row_ids.numel() <= self.stagger_ids and any(earlier < layer for earlier in self._inflight):
            self._held[layer] = row_ids   # goes out when the layer before it has its rows (get)
            return
        self._post(layer, row_ids)

    def prefetch_ahead(self, layer: int, row_ids: torch.Tensor) -> None:
        """A later batch's rows: out at once (a step ahead, no layer's fetch is in its way)."""
        self._check_layer(layer)
        if self.prefetch_enabled and not self._in_flight(layer, row_ids):
            self._post(layer, row_ids)

    def _in_flight(self, layer: int, row_ids: torch.Tensor) -> bool:
        return any(_same(ids, row_ids) for ids, _ in self._inflight.get(layer, ()))

    def _on_its_way(self, layer: int, row_ids: torch.Tensor) -> bool:
        """These ids are in flight or held already (posted ahead by EngramModel.prefetch)."""
        held = self._held.get(layer)
        if (held is not None and _same(held, row_ids)) or self._in_flight(layer, row_ids):
            self.prefetched_ahead += 1
            return True
        return False

    def _post(self, layer: int, row_ids: torch.Tensor) -> None:
        ids = self._ids(layer, row_ids)
        queue = self._inflight.setdefault(layer, [])
        while len(queue) > self.ahead:
            self._drop(queue.pop(0))
        queue.append((row_ids, self.fetcher.fetch_async(self.specs[layer].name, ids)))

    def _take(self, layer: int, row_ids: torch.Tensor):
        """The in-flight fetch of these ids, if any; fetches posted before it are dropped (never read)."""
        queue = self._inflight.get(layer, [])
        for i, (ids, fut) in enumerate(queue):
            if _same(ids, row_ids):
                for older in queue[:i]:
                    self._drop(older)
                del queue[:i + 1]
                if not queue:
                    del self._inflight[layer]
                return fut
        return None

    def _drop(self, entry) -> None:
        """A prefetch nobody will read: its slot goes back to the agent's reader once it is answered."""
        if entry is not None and self.agent:
            entry[1].release()

    def _drop_all(self) -> None:
        for layer in list(self._inflight):
            for entry in self._inflight.pop(layer):
                self._drop(entry)
        self._held.clear()

    def get(self, layer: int, row_ids: torch.Tensor) -> torch.Tensor:
        if layer in self._held:  # asked for before the layer before it: it goes out now
            self._post(layer, self._held.pop(layer))
        lease = self._take(layer, row_ids)
        t0 = time.perf_counter()
        if lease is not None:
            uniq, rows_np, inverse = lease.result()
        else:  # not prefetched (or other ids): fetch here, on the caller's thread
            ids = self._ids(layer, row_ids)
            uniq, rows_np, inverse = self.fetcher.fetch(self.specs[layer].name, ids)
        self.wait_s += time.perf_counter() - t0
        if self._held:  # the next layer's fetch goes out now, this one's out of its way
            nxt = min(self._held)
            self._post(nxt, self._held.pop(nxt))
        try:
            return self._rows(layer, row_ids, uniq, rows_np, inverse, leased=lease is not None and self.agent)
        finally:
            if lease is not None and self.agent:
                lease.release()  # the rows were copied out of the agent's slot (expanded, converted or pinned)

    def _rows(self, layer: int, row_ids: torch.Tensor, uniq, rows_np, inverse, leased: bool) -> torch.Tensor:
        if leased:  # these two outlive the slot (the gradient's scatter and push use them)
            uniq, inverse = uniq.copy(), inverse.copy()
        spec = self.specs[layer]
        rows_u = as_torch(rows_np, spec.dtype)                               # [U, D] host (fp8: [U, D + D/block] bytes)
        if self.device.type == "cuda":
            rows_u = rows_u.pin_memory().to(self.device, non_blocking=True)
            inv = torch.from_numpy(inverse).pin_memory().to(self.device, non_blocking=True)
        else:
            inv = torch.from_numpy(inverse)
        rows = rows_to_float(rows_u, spec)[inv].view(*row_ids.shape, spec.dim)  # [B, T, K, D], fp8 dequantized here
        if self.train_mode and torch.is_grad_enabled():
            rows = rows.detach().requires_grad_(True)
            self._leaves.append((layer, uniq, inv, rows))
        return rows

    # ---- gradients out ---------------------------------------------------------------------
    def step(self, lr: float, step: int) -> None:
        if not self.train_mode:
            if self._leaves:
                raise RuntimeError("ClusterRows(train=False) is read-only and cannot be stepped")
            return
        by_layer: dict[int, list[tuple[np.ndarray, torch.Tensor]]] = defaultdict(list)
        for layer, uniq, inv, leaf in self._leaves:
            if leaf.grad is None:
                continue
            g = leaf.grad.reshape(-1, leaf.shape[-1]).float()                 # [B*T*K, D]
            summed = torch.zeros(uniq.size, g.shape[1], dtype=torch.float32, device=g.device)
            by_layer[layer].append((uniq, summed.index_add_(0, inv, g)))      # [U, D]
        self._leaves.clear()
        self._drop_all()   # fetched (or on their way) before this push: they may miss its update
        self._pushes = [p for p in self._pushes if not p.done()]
        for layer, parts in by_layer.items():
            ids = np.concatenate([p[0] for p in parts])
            grads = torch.cat([p[1] for p in parts]).cpu()
            if self.grad_scale != 1.0:
                grads = grads * self.grad_scale
            if not all_finite(grads):
                raise NonFiniteGradient(f"table {table_name(layer)}: gradient holds NaN or Inf; nothing pushed")
            # Duplicates across micro-batches are summed by the client before sending.
            self._pushes.append(self.fetcher.push_async(self.specs[layer].name, ids, grads, lr=lr, step=step))

    def flush(self) -> None:
        """Wait for every push this worker sent (raises a push's error, if any)."""
        for p in self._pushes:
            p.result()
        self._pushes.clear()

    def zero_grad(self) -> None:
        self._leaves.clear()

    def stats(self) -> dict:
        return dict(self.fetcher.summary(), wait_s=self.wait_s, row_fetches=self.fetches,
                    prefetched_ahead=self.prefetched_ahead)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}  # the tables live in the cluster; a checkpoint takes their cut with save_cut

    def save_cut(self, path: str) -> None:
        """A consistent cut of the cluster's tables (rows, Adam state, idempotency keys) into path,
        after this worker's pushes landed. The shards write it: path must be reachable from them."""
        self.flush()
        self.client.checkpoint(str(path))

    def restore_cut(self, path: str) -> None:
        """Put the cluster's tables back to a cut taken by save_cut (any shard count)."""
        self.flush()
        self.client.restore(str(path))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Import tables (e.g. a LocalRows checkpoint's "<table>.weight") into the cluster with Write.
        Optimizer state in `state` is not imported: the shards start it fresh. An empty state (the
        checkpoint of a run whose tables lived in the cluster) leaves the cluster's rows as they are."""
        if not state:
            return
        for layer, spec in self.specs.items():
            w = state.get(f"{spec.name}.weight")
            if w is None:
                raise ValueError(f"no rows for table {spec.name!r} in the state (keys: {sorted(state)[:6]}...)")
            if tuple(w.shape) != (spec.rows, spec.storage_dim):
                raise ValueError(f"{spec.name}.weight has shape {tuple(w.shape)}; the table is "
                                 f"({spec.rows}, {spec.storage_dim})")
            per = max(1, (64 << 20) // spec.row_bytes)
            for a in range(0, spec.rows, per):
                b = min(a + per, spec.rows)
                self.client.write(spec.name, np.arange(a, b), w[a:b].detach().cpu())

    def close(self) -> None:
        self._drop_all()
        self.flush()
        self.fetcher.close()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.device == b.device and torch.equal(a, b))


def load_for_inference(checkpoint: str, client, device: torch.device | str = "cpu", cache_bytes: int = 64 << 20,
                       import_tables: bool = False):
    """(model in eval mode, tokenizer) from a checkpoint, its Engram rows served by the memory cluster.

    import_tables: write the checkpoint's own tables (tables.safetensors) into the cluster first,
    for a model trained with in-process tables; otherwise the cluster must already hold them."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from engram_model.checkpoint import load_model
    from engram_model.config import ModelConfig

    manifest = json.loads((Path(checkpoint) / "config.json").read_text())
    cfg = ModelConfig.from_dict(manifest["model"])
    specs = table_specs(cfg)
    if import_tables:
        writer = ClusterRows(client, specs, train=False, node_local=False)
        writer.load_state_dict(load_file(str(Path(checkpoint) / "tables.safetensors")))
        writer.close()
    rows = ClusterRows(client, specs, device=device, train=False, cache_bytes=cache_bytes, create=False)
    return load_model(checkpoint, device=device, rows=rows)

