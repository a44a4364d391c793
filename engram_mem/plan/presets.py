"""Model shapes and compute devices the planner knows by name.

    from engram_mem.plan.presets import MODEL_PRESETS, DEVICE_PRESETS, shape_from_config
    m = MODEL_PRESETS["v4.1-flash"]; m.table_bytes          # ~189 GiB of Engram tables
    shape_from_config("engram_model/configs/serving.json")          # this repo's benchmark models

A ModelShape is what the planner needs of a model: its backbone (hidden size, layers, parameters
a block reads per token), where the Engram layers sit, and the tables (rows per layer, rows each
token reads per layer, bytes per row). A Device is what computes the blocks: peak FLOP/s, the
fraction of it reached (MFU), memory bandwidth for the weights a small batch streams, and a fixed
cost per block (kernel launches; on this CPU, Python dispatch). Figures the public sources do not
give are marked "assumed" in `notes`: they set the prefetch window, so change them with flags or
a JSON file (`engram-mem plan --model-file`) when you know better.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from engram_mem.plan.tiers import PlanInputError

ROW_FORMATS = {  # bytes per row for a row of `dim` values
    "fp32": lambda dim: 4 * dim,
    "bf16": lambda dim: 2 * dim,
    "fp8": lambda dim: dim + math.ceil(dim / 32),  # E4M3 values + one ue8m0 scale byte per 32 (V4.1: 256 + 8 B)
}


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    layers: int
    engram_layers: tuple[int, ...]      # 0-based block indices holding an Engram module
    rows_per_token: int                 # rows read per token per Engram layer (heads x n-gram orders)
    row_bytes: int                      # bytes of one row as stored (fp32 / bf16 / FP8 + scales)
    table_rows: int                     # rows per Engram layer's table
    block_dense_params: float           # per block: attention + shared expert + dense FFN
    expert_params: float = 0.0          # one routed expert
    n_routed: int = 0
    n_active: int = 0
    param_bytes: int = 2                # bytes per backbone weight (bf16)
    vocab: int = 0                      # output head (0: leave the head out of the compute time)
    row_dim: int = 0                    # values per row (gradients travel as fp32: 4 * row_dim B/row)
    notes: str = ""

    def __post_init__(self):
        for f in ("hidden", "layers", "rows_per_token", "row_bytes", "table_rows"):
            if int(getattr(self, f)) < 1:
                raise PlanInputError(f"model {self.name!r}: {f} must be >= 1, got {getattr(self, f)}")
        if not self.engram_layers or any(not 0 <= l < self.layers for l in self.engram_layers):
            raise PlanInputError(f"model {self.name!r}: engram_layers {list(self.engram_layers)} must be within "
                                 f"[0, {self.layers}) and not empty")
        if list(self.engram_layers) != sorted(set(self.engram_layers)):
            raise PlanInputError(f"model {self.name!r}: engram_layers must be increasing, got {list(self.engram_layers)}")
        if self.n_active > self.n_routed:
            raise PlanInputError(f"model {self.name!r}: n_active {self.n_active} > n_routed {self.n_routed}")

    @property
    def table_bytes(self) -> float:
        return len(self.engram_layers) * self.table_rows * self.row_bytes

    @property
    def grad_row_bytes(self) -> int:
        return 4 * self.row_dim if self.row_dim else 2 * self.row_bytes

    @property
    def rows_per_token_all(self) -> int:
        return self.rows_per_token * len(self.engram_layers)

    @property
    def active_params_per_block(self) -> float:
        return self.block_dense_params + self.n_active * self.expert_params

    def touched_params_per_block(self, tokens: float) -> float:
        """Weights a block reads for a batch of `tokens` (routed experts hit by at least one token)."""
        if self.n_routed == 0:
            return self.block_dense_params
        hit = self.n_routed * (1 - (1 - self.n_active / self.n_routed) ** max(tokens, 0))
        return self.block_dense_params + hit * self.expert_params

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelShape:
        d = dict(d)
        if "row_format" in d:   # {"row_format": "fp8", "row_dim": 256} instead of row_bytes
            fmt, dim = d.pop("row_format"), d.pop("row_dim", None)
            if fmt not in ROW_FORMATS or dim is None:
                raise PlanInputError(f"model {d.get('name')!r}: row_format must be one of {sorted(ROW_FORMATS)} "
                                     f"with row_dim, got {fmt!r}, row_dim={dim}")
            d["row_bytes"] = ROW_FORMATS[fmt](int(dim))
        known = {f.name for f in dataclasses.fields(cls)}
        if set(d) - known:
            raise PlanInputError(f"model {d.get('name', '?')!r}: unknown fields {sorted(set(d) - known)}; known: {sorted(known)}")
        d["engram_layers"] = tuple(d.get("engram_layers", ()))
        try:
            return cls(**d)
        except TypeError as e:
            raise PlanInputError(f"model {d.get('name', '?')!r}: {e}") from None


@dataclass(frozen=True)
class Device:
    name: str
    peak_flops: float          # dense FLOP/s at the model's dtype
    mfu: float                 # fraction of peak a large batch reaches
    mem_gbps: float            # weight-streaming bandwidth (HBM; DRAM on a CPU)
    block_fixed_s: float = 0.0 # per block per forward (launches, dispatch)
    measured: bool = False
    source: str = ""

    def __post_init__(self):
        if self.peak_flops <= 0 or not 0 < self.mfu <= 1 or self.mem_gbps <= 0 or self.block_fixed_s < 0:
            raise PlanInputError(f"device {self.name!r}: need peak_flops > 0, 0 < mfu <= 1, mem_gbps > 0, "
                                 f"block_fixed_s >= 0; got {self}")


# Backbone sizes not given by the public sources are "assumed" (a DeepSeek-V3-style MoE of the
# stated total/activated size); the Engram table figures are the sources' own.
MODEL_PRESETS: dict[str, ModelShape] = {m.name: m for m in [
    # Engram paper: 5.7B Engram params at layers 2 and 15, n-grams {2,3} x 8 heads = 16 rows/token/layer,
    # memory dim 1280 -> 80 values per row; bf16. 5.7e9 / 2 layers / 80 = 35.6M rows per layer.
    ModelShape(name="engram-27b", hidden=2560, layers=30, engram_layers=(1, 14), rows_per_token=16, row_bytes=160,
               table_rows=35_625_000, block_dense_params=4 * 2560**2 + 3 * 2560 * 1536 * 2, expert_params=3 * 2560 * 1536,
               n_routed=55, n_active=6, vocab=129_280,
               notes="tables: paper (5.7B params, layers 2 and 15 1-based, 8 heads x {2,3}, dim 1280); backbone assumed"),
    # Engram-40B: the same backbone with 18.5B Engram params: 115.6M rows per layer.
    ModelShape(name="engram-40b", hidden=2560, layers=30, engram_layers=(1, 14), rows_per_token=16, row_bytes=160,
               table_rows=115_625_000, block_dense_params=4 * 2560**2 + 3 * 2560 * 1536 * 2,
               expert_params=3 * 2560 * 1536, n_routed=55, n_active=6, vocab=129_280,
               notes="tables: paper (18.5B params); backbone assumed as engram-27b"),
    # The paper's host-memory experiment: a 100B-param table in host DRAM, Engram at block 2 (index 1),
    # 4B dense backbone; rows laid out as the 27B's (16 x 80 bf16): 1.25B rows. One H800.
    ModelShape(name="engram-100b-host", hidden=3072, layers=36, engram_layers=(1,), rows_per_token=16, row_bytes=160,
               table_rows=1_250_000_000, block_dense_params=4e9 / 36, vocab=129_280,
               notes="paper: 100B-param table in host DRAM, 4B dense backbone, Engram at block 2; "
                     "row layout and backbone shape assumed"),
    # DeepSeek-V4.1-Flash: Engram at layers 1 and 14, ~384M rows each, 256 FP8 + 8 B scales = 264 B,
    # 24 rows/token/layer (~189 GiB of tables). Backbone assumed: 43 layers, hidden 4096, ~13B active.
    ModelShape(name="v4.1-flash", hidden=4096, layers=43, engram_layers=(1, 14), rows_per_token=24, row_bytes=264,
               table_rows=384_000_000, block_dense_params=4 * 4096**2 + 3 * 4096 * 2048, expert_params=3 * 4096 * 2048,
               n_routed=256, n_active=8, param_bytes=1, vocab=129_280,
               notes="tables: public docs (2 x ~384M x 264 B, 24 rows/token/layer); backbone assumed (~13B active, FP8)"),
]}

DEVICE_PRESETS: dict[str, Device] = {d.name: d for d in [
    Device(name="h800", peak_flops=989e12, mfu=0.4, mem_gbps=3350, block_fixed_s=20e-6,
           source="H800/H100 SXM datasheet: 989 TFLOP/s dense bf16, 3.35 TB/s; MFU 0.4 and 20 us/block assumed"),
    Device(name="h100", peak_flops=989e12, mfu=0.4, mem_gbps=3350, block_fixed_s=20e-6,
           source="H100 SXM datasheet; MFU and per-block cost assumed"),
    Device(name="b200", peak_flops=2250e12, mfu=0.4, mem_gbps=8000, block_fixed_s=20e-6,
           source="B200 datasheet: ~2.25 PFLOP/s dense bf16, 8 TB/s; MFU assumed"),
    # This machine (2-core VM, torch on CPU): refit by --calibrate from timed blocks of the benchmark models.
    Device(name="here-cpu", peak_flops=60e9, mfu=1.0, mem_gbps=10, block_fixed_s=1e-3, measured=True,
           source="measured here (bench model blocks, fp32, 2 threads); refit by --calibrate"),
]}


def shape_from_config(path_or_cfg, table_rows: int | None = None) -> ModelShape:
    """A ModelShape from an engram_model config (a JSON path or a ModelConfig-like dict/obj)."""
    if isinstance(path_or_cfg, str):
        with open(path_or_cfg) as f:
            m = json.load(f)["model"]
    elif isinstance(path_or_cfg, dict):
        m = path_or_cfg
    else:
        m = path_or_cfg.to_dict()
    e = m.get("engram")
    if not e:
        raise PlanInputError("this model config has no Engram layers (model.engram is null)")
    dim, inter = m["dim"], m["moe_inter_dim"]
    orders = e["max_ngram_size"] - 1
    k = orders * e["n_head_per_ngram"]
    rows = table_rows if table_rows is not None else sum(e["engram_vocab_size"]) // len(e["engram_vocab_size"]) * k
    rb = {"float32": 4, "bfloat16": 2, "float16": 2}[e.get("table_dtype", "float32")] * e["head_dim"]
    # Per block: attention (q, k, v, o) + shared experts + router; the Engram module's projections too.
    mem_dim = k * e["head_dim"]
    engram_params = (mem_dim * dim * 2 + dim * dim) * len(e["layer_ids"]) / m["n_layers"]
    dense = 4 * dim * dim + m.get("n_shared_experts", 1) * 3 * dim * inter + dim * m["n_routed_experts"] + engram_params
    return ModelShape(name="config", hidden=dim, layers=m["n_layers"], engram_layers=tuple(e["layer_ids"]),
                      rows_per_token=k, row_bytes=rb, table_rows=rows, block_dense_params=dense,
                      expert_params=3 * dim * inter, n_routed=m["n_routed_experts"], n_active=m["n_activated_experts"],
                      param_bytes=4, vocab=m["vocab_size"], row_dim=e["head_dim"], notes="from an engram_model config")


def resolve_model(name_or_shape, overrides: dict | None = None) -> ModelShape:
    if isinstance(name_or_shape, ModelShape):
        base = name_or_shape
    elif name_or_shape in MODEL_PRESETS:
        base = MODEL_PRESETS[name_or_shape]
    else:
        raise PlanInputError(f"unknown model preset {name_or_shape!r}; known: {sorted(MODEL_PRESETS)}")
    return ModelShape.from_dict({**base.to_dict(), **(overrides or {})}) if overrides else base


def resolve_device(name_or_device, extra: dict[str, Device] | None = None) -> Device:
    if isinstance(name_or_device, Device):
        return name_or_device
    pool = {**DEVICE_PRESETS, **(extra or {})}
    if name_or_device not in pool:
        raise PlanInputError(f"unknown device {name_or_device!r}; known: {sorted(pool)}")
    return pool[name_or_device]


__all__ = ["ModelShape", "Device", "MODEL_PRESETS", "DEVICE_PRESETS", "ROW_FORMATS", "shape_from_config",
           "resolve_model", "resolve_device"]
