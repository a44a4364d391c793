"""RowSource: where the model gets Engram table rows, and where their gradients go.

    specs = table_specs(cfg)                     # {layer: TableSpec("engram.l{layer}", rows, head_dim)}
    rows = LocalRows(specs, device="cpu")        # in-process tables, row-wise Adam from engram_mem.optim
    model = EngramModel(cfg, rows=rows)
    loss.backward(); rows.step(lr=5 * dense_lr, step=step)

One table per Engram layer. Its rows are all of that layer's hash heads concatenated (n=2 heads
first), a row id = head-local index + head offset, its width the per-head memory dim. The model
calls, per forward and in layer order, `prefetch(layer, ids)` for every Engram layer right after
hashing, then `get(layer, ids)` inside each Engram layer. A remote source starts the fetch in
prefetch and overlaps it with the blocks before the Engram layer; LocalRows has nothing to hide.

Gradients: when autograd is on, get() returns a leaf [B, T, K, D] with requires_grad=True and
remembers it with the batch's unique ids; step() sums each leaf's gradient per unique row and
applies the row-wise optimizer (LocalRows) or pushes it (a remote source). Dense-parameter
machinery (clipping, weight decay, AdamW) never sees the tables.

This file imports neither Ray nor gRPC, and must not: a remote RowSource lives in its own file.
"""

from __future__ import annotations

import abc
from collections import defaultdict

import torch

from engram_mem.errors import NonFiniteGradient, ReadOnlyTable
from engram_mem.table import rows_to_float
from engram_mem.optim import make_optimizer
from engram_mem.table import TableSpec, as_torch
from engram_mem.validate import all_finite
from engram_model.config import ModelConfig
from engram_model.hashing import NgramHasher

# The paper's table optimizer: Adam, no weight decay (its lr, 5x the dense lr, comes with step()).
TABLE_OPTIMIZER = {"name": "adam", "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}


def table_name(layer: int) -> str:
    return f"engram.l{layer}"


def make_hasher(cfg: ModelConfig) -> NgramHasher:
    e = cfg.engram
    if e is None:
        raise ValueError("this model config has no Engram layers")
    return NgramHasher(engram_vocab_size=e.engram_vocab_size, max_ngram_size=e.max_ngram_size,
                       n_head_per_ngram=e.n_head_per_ngram, layer_ids=e.layer_ids, seed=e.seed,
                       pad_id=cfg.pad_id, compressed_vocab_size=cfg.compressed_vocab_size)


def table_specs(cfg: ModelConfig, hasher: NgramHasher | None = None) -> dict[int, TableSpec]:
    """{layer: TableSpec} of a model's Engram tables, in layer order; {} for a pure MoE."""
    if cfg.engram is None:
        return {}
    e, hasher = cfg.engram, hasher or make_hasher(cfg)
    # A distinct init seed per layer, so two layers' tables do not start identical.
    return {layer: TableSpec(name=table_name(layer), rows=hasher.table_rows(layer), dim=e.head_dim,
                             dtype=e.table_dtype, seed=e.seed * 1_000_003 + layer + 1, init_std=e.init_std,
                             block=e.table_block)
            for layer in cfg.engram_layers}


class RowSource(abc.ABC):
    """Rows in, gradients out. One instance serves all Engram layers of one model."""

    prefetch_enabled = False   # prefetch() starts a fetch (a remote source): EngramModel.prefetch hashes for it

    @abc.abstractmethod
    def prefetch(self, layer: int, row_ids: torch.Tensor) -> None:
        """row_ids int64 [B, T, K] global row ids; may start an asynchronous fetch."""

    def prefetch_ahead(self, layer: int, row_ids: torch.Tensor) -> None:
        """The row ids of a later forward, known before it (EngramModel.prefetch); its own prefetch
        of the same ids then finds them on their way."""
        self.prefetch(layer, row_ids)

    @abc.abstractmethod
    def get(self, layer: int, row_ids: torch.Tensor) -> torch.Tensor:
        """-> rows float32 [B, T, K, D] on row_ids' device; a remembered grad leaf when autograd is on."""

    @abc.abstractmethod
    def step(self, lr: float, step: int) -> None:
        """After backward: one optimizer update per unique row of each layer, with the gradient summed
        over every remembered leaf of that layer (all micro-batches), at this lr; then forget leaves.
        Leaves without a gradient are dropped. lr is the table lr (the trainer passes 5x dense)."""

    @abc.abstractmethod
    def zero_grad(self) -> None:
        """Forget remembered leaves without applying them."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {len(state)} tensors")

    def close(self) -> None:
        """Release connections or threads; a no-op for in-process tables."""


class LocalRows(RowSource):
    """In-process tables on one device, updated with engram_mem.optim's row-wise optimizer."""

    def __init__(self, specs: dict[int, TableSpec], device: torch.device | str = "cpu",
                 optimizer: dict | None = TABLE_OPTIMIZER):
        """optimizer=None: read-only tables (generation), no optimizer state allocated."""
        self.specs = dict(specs)
        self.device = torch.device(device)
        self.optimizer = make_optimizer(optimizer) if optimizer is not None else None
        self.weights: dict[int, torch.Tensor] = {}            # layer -> [R, D] in the storage dtype
        self.opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for layer, spec in self.specs.items():
            # The same deterministic init as a table created in the memory cluster.
            self.weights[layer] = as_torch(spec.init_range(0, spec.rows), spec.dtype).to(self.device)
            # fp8 tables are read-only (quantized rows take no gradient): no optimizer state.
            self.opt_state[layer] = self.optimizer.init_state(spec.rows, spec.dim, self.device) \
                if self.optimizer and not spec.is_bytes else {}
        self._leaves: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (layer, uniq, inv, leaf)

    def prefetch(self, layer: int, row_ids: torch.Tensor) -> None:
        pass

    def get(self, layer: int, row_ids: torch.Tensor) -> torch.Tensor:
        if layer not in self.weights:
            raise ValueError(f"no Engram table for layer {layer}; tables: {sorted(self.weights)}")
        w = self.weights[layer]                                           # [R, D]
        uniq, inv = torch.unique(row_ids.reshape(-1), return_inverse=True)  # [U], [B*T*K]
        if uniq.numel() and (int(uniq[0]) < 0 or int(uniq[-1]) >= w.shape[0]):
            raise ValueError(f"layer {layer}: row ids must be in [0, {w.shape[0]}), got [{int(uniq[0])}, {int(uniq[-1])}]")
        spec = self.specs[layer]
        rows = rows_to_float(w[uniq.to(w.device)], spec).to(row_ids.device)[inv]  # [B*T*K, D]; fp8 dequantized
        rows = rows.view(*row_ids.shape, spec.dim)                        # [B, T, K, D]
        if torch.is_grad_enabled():
            rows = rows.detach().requires_grad_(True)
            self._leaves.append((layer, uniq, inv, rows))
        return rows

    def step(self, lr: float, step: int) -> None:
        if self.optimizer is None and self._leaves:
            raise RuntimeError("these tables were made read-only (optimizer=None) and cannot be stepped")
        by_layer: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        for layer, uniq, inv, leaf in self._leaves:
            if leaf.grad is None:
                continue
            g = leaf.grad.reshape(-1, leaf.shape[-1]).float()               # [B*T*K, D]
            summed = torch.zeros(uniq.numel(), g.shape[1], dtype=torch.float32, device=g.device)
            by_layer[layer].append((uniq, summed.index_add_(0, inv, g)))   # [U, D]
        self._leaves.clear()
        for layer, parts in by_layer.items():
            ids, grads = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            if len(parts) > 1:   # several micro-batches: merge rows seen more than once
                ids, inv = torch.unique(ids, return_inverse=True)
                grads = torch.zeros(ids.numel(), grads.shape[1], device=grads.device).index_add_(0, inv, grads)
            if not all_finite(grads):
                raise NonFiniteGradient(f"table {table_name(layer)}: gradient holds NaN or Inf; nothing applied")
            if self.specs[layer].is_bytes:
                raise ReadOnlyTable(f"table {table_name(layer)} holds {self.specs[layer].dtype} rows, which take no "
                                    f"gradient; train with a float32/bfloat16 table_dtype")
            w = self.weights[layer]
            self.optimizer.apply(w, self.opt_state[layer], ids.to(w.device), grads.to(w.device), lr)

    def zero_grad(self) -> None:
        self._leaves.clear()

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for layer, w in self.weights.items():
            name = table_name(layer)
            out[f"{name}.weight"] = w
            for k, v in self.opt_state[layer].items():
                out[f"{name}.{k}"] = v
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.state_dict()
        if self.optimizer is None:   # read-only tables take the rows and ignore optimizer state
            state = {k: v for k, v in state.items() if k.endswith(".weight")}
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or extra:
            raise ValueError(f"table state mismatch: missing {missing}, unexpected {extra}")
        for key, cur in expected.items():
            new = state[key]
            if new.shape != cur.shape or new.dtype != cur.dtype:
                raise ValueError(f"{key}: expected {tuple(cur.shape)} {cur.dtype}, got {tuple(new.shape)} {new.dtype}")
            cur.copy_(new.to(cur.device))

    @property
    def num_params(self) -> int:
        return sum(s.params for s in self.specs.values())
