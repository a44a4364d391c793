"""EngramLayout: a published checkpoint's Engram tables as its config.json describes them.

    layout = EngramLayout.from_config(read_config("/models/DeepSeek-V4.1-Flash"))
    layout.tables[0].rows, layout.tables[0].sizes, layout.tables[0].offsets   # layer 1: 384,006,168 rows
    layout.tables[0].to_dict()     # what describe() / `engram-mem status` show for the table

The fields (DeepSeek-V4.1-Flash; at the top of config.json or under "text_config"):
engram_layer_ids, engram_num_embeddings (rows of each layer's table), engram_vocab_size (one
start for every n-gram order, or one per order), engram_n_heads (hash heads per order),
engram_max_ngram_size (orders 2..max), engram_head_dim (values a row), and the FP8 block
(quantization_config.weight_block_size[-1], else 32). Every (order, head) owns a prime-sized
bucket range at a cumulative offset; the primes are drawn as the reference computes them
(engram_model.hashing.bucket_primes: the smallest unused primes above engram_vocab_size - 1,
layer by layer, order by order, head by head, never reused). A table may hold rows past its last
bucket, never fewer: a config whose buckets need more rows than engram_num_embeddings is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from engram_mem.errors import InvalidArgument

FIELDS = ("engram_layer_ids", "engram_num_embeddings", "engram_vocab_size", "engram_n_heads",
          "engram_max_ngram_size", "engram_head_dim")


def read_config(directory: str) -> dict:
    """config.json of a checkpoint directory: its Engram fields (top level or text_config) plus the
    block size; {} when the file has no Engram fields."""
    path = os.path.join(directory, "config.json")
    try:
        doc = json.loads(open(path).read())
    except FileNotFoundError:
        raise InvalidArgument(f"{directory}: no config.json (a published checkpoint has one)") from None
    except ValueError as e:
        raise InvalidArgument(f"{path}: not valid JSON ({e})") from None
    for part in (doc, doc.get("text_config") or {}):
        if "engram_layer_ids" in part:
            cfg = dict(part)
            block = (part.get("quantization_config") or doc.get("quantization_config") or {}).get("weight_block_size")
            cfg.setdefault("engram_block_size", int(block[-1]) if block else 32)
            cfg["_path"] = path
            return cfg
    return {}


@dataclass(frozen=True)
class LayerTable:
    """One layer's table: `rows` rows of `head_dim` values; bucket j is rows [offsets[j], offsets[j] + sizes[j])."""
    layer: int
    rows: int
    head_dim: int
    block: int
    orders: tuple[int, ...]
    n_heads: int
    sizes: tuple[int, ...]      # prime bucket sizes, order-major: (order 2 heads..., order 3 heads..., ...)
    offsets: tuple[int, ...]
    vocab_size: tuple[int, ...] = ()   # engram_vocab_size of each order (where its primes start)

    @property
    def bucket_rows(self) -> int:
        return sum(self.sizes)

    def to_dict(self) -> dict:
        return {"layer": self.layer, "rows": self.rows, "head_dim": self.head_dim, "block": self.block,
                "orders": list(self.orders), "n_heads": self.n_heads, "bucket_sizes": list(self.sizes),
                "bucket_offsets": list(self.offsets), "rows_past_buckets": self.rows - self.bucket_rows,
                "vocab_size": list(self.vocab_size)}


def config_fields(tables: list[dict]) -> dict:
    """config.json's Engram fields for tables given as LayerTable.to_dict()s (what export writes
    when it has no original config.json to copy)."""
    t0 = tables[0]
    vocab = t0["vocab_size"]
    return {"engram_layer_ids": [t["layer"] for t in tables], "engram_num_embeddings": [t["rows"] for t in tables],
            "engram_vocab_size": vocab[0] if len(set(vocab)) == 1 else vocab, "engram_n_heads": t0["n_heads"],
            "engram_max_ngram_size": t0["orders"][-1], "engram_head_dim": t0["head_dim"],
            "quantization_config": {"weight_block_size": [t0["block"], t0["block"]]}}


@dataclass(frozen=True)
class EngramLayout:
    tables: tuple[LayerTable, ...]
    source: str = ""

    def table(self, layer: int) -> LayerTable:
        for t in self.tables:
            if t.layer == layer:
                return t
        raise KeyError(layer)

    @classmethod
    def from_config(cls, cfg: dict) -> "EngramLayout":
        from engram_model.hashing import bucket_primes

        where = cfg.get("_path", "config.json")
        missing = [f for f in FIELDS if f not in cfg]
        if missing:
            raise InvalidArgument(f"{where}: Engram fields {missing} are missing")
        layers = [int(x) for x in cfg["engram_layer_ids"]]
        rows = [int(x) for x in cfg["engram_num_embeddings"]]
        if len(rows) != len(layers):
            raise InvalidArgument(f"{where}: engram_num_embeddings has {len(rows)} entries for "
                                  f"{len(layers)} engram_layer_ids {layers}")
        max_n, heads, dim = int(cfg["engram_max_ngram_size"]), int(cfg["engram_n_heads"]), int(cfg["engram_head_dim"])
        if max_n < 2 or heads < 1 or dim < 1:
            raise InvalidArgument(f"{where}: engram_max_ngram_size {max_n} must be >= 2, engram_n_heads {heads} "
                                  f"and engram_head_dim {dim} >= 1")
        vocab = cfg["engram_vocab_size"]
        vocab = [int(v) for v in vocab] if isinstance(vocab, list) else [int(vocab)] * (max_n - 1)
        if len(vocab) != max_n - 1:
            raise InvalidArgument(f"{where}: engram_vocab_size {vocab} needs one value per order 2..{max_n}")
        block = int(cfg.get("engram_block_size", 32))
        if block < 1 or dim % block:
            raise InvalidArgument(f"{where}: the FP8 block {block} does not divide engram_head_dim {dim}")
        primes = bucket_primes(vocab, max_n, heads, layers)
        out = []
        for layer, n in zip(layers, rows):
            sizes = [p for order in primes[layer] for p in order]
            offsets = [sum(sizes[:j]) for j in range(len(sizes))]
            if sum(sizes) > n:
                raise InvalidArgument(f"{where}: layer {layer}'s {len(sizes)} buckets need {sum(sizes)} rows, but "
                                      f"engram_num_embeddings gives it {n}")
            out.append(LayerTable(layer, n, dim, block, tuple(range(2, max_n + 1)), heads, tuple(sizes), tuple(offsets),
                                  tuple(vocab)))
        return cls(tuple(out), where)
