"""Configuration for the Engram-MoE model and its training: three dataclasses, sizes in JSON.

    from engram_model.config import load_config
    model_cfg, train_cfg = load_config("small")         # engram_model/configs/small.json, or a path

A config file holds {"model": {...ModelConfig, "engram": {...EngramConfig} or null}, "train": {...}}.
Every dataclass validates itself in __post_init__ and raises ValueError with a sentence naming
the field, so a bad JSON file fails when it is loaded, not forty minutes into a run.

Vocabulary fields (`vocab_size`, `compressed_vocab_size`, `pad_id`) describe the tokenizer. A
config file gives the BPE target size; `ModelConfig.for_tokenizer(tok)` fills in the real values
once the tokenizer exists, and checkpoints store the resolved config.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(slots=True)
class EngramConfig:
    """Hashed n-gram memory at a few layers (the paper's Engram module)."""

    layer_ids: list[int] = field(default_factory=lambda: [1, 3])
    max_ngram_size: int = 3              # n-grams of orders 2..max_ngram_size
    n_head_per_ngram: int = 4            # hash heads per order; each head has its own prime-sized range
    head_dim: int = 32                   # width of one row (the per-head memory dim)
    engram_vocab_size: list[int] = field(default_factory=lambda: [40_000, 40_000])  # per order; primes start here
    kernel_size: int = 4                 # ShortConv kernel; its dilation is max_ngram_size
    hc_mult: int = 1                     # hyper-connection branches (the backbone here has one)
    seed: int = 0                        # hash multipliers and table init
    table_dtype: str = "float32"         # storage dtype of the rows: float32 | bfloat16 | float16 | fp8_e4m3
    table_block: int = 0                 # fp8_e4m3: values per ue8m0 scale (V4.1-Flash: 32); else 0
    short_conv: bool = True              # False: V4.1's variant, the gated value is the output (no ShortConv)
    init_std: float = 1.0                # rows start as N(0, init_std^2), like nn.Embedding

    def __post_init__(self):
        _check(len(self.layer_ids) > 0, "engram.layer_ids must name at least one layer")
        _check(len(set(self.layer_ids)) == len(self.layer_ids), f"engram.layer_ids has duplicates: {self.layer_ids}")
        _check(all(int(x) >= 0 for x in self.layer_ids), f"engram.layer_ids must be >= 0, got {self.layer_ids}")
        _check(self.max_ngram_size >= 2, f"engram.max_ngram_size must be >= 2, got {self.max_ngram_size}")
        _check(self.n_head_per_ngram >= 1, f"engram.n_head_per_ngram must be >= 1, got {self.n_head_per_ngram}")
        _check(self.head_dim >= 1, f"engram.head_dim must be >= 1, got {self.head_dim}")
        _check(len(self.engram_vocab_size) == self.max_ngram_size - 1,
               f"engram.engram_vocab_size needs one size per order 2..{self.max_ngram_size} "
               f"({self.max_ngram_size - 1} values), got {self.engram_vocab_size}")
        _check(all(v >= 2 for v in self.engram_vocab_size), f"engram.engram_vocab_size must be >= 2, got {self.engram_vocab_size}")
        _check(self.kernel_size >= 1, f"engram.kernel_size must be >= 1, got {self.kernel_size}")
        _check(self.hc_mult >= 1, f"engram.hc_mult must be >= 1, got {self.hc_mult}")
        _check(0 <= self.seed < 2**32, f"engram.seed must be in [0, 2**32), got {self.seed}")
        _check(self.table_dtype in ("float32", "bfloat16", "float16", "fp8_e4m3"),
               f"engram.table_dtype must be float32, bfloat16, float16 or fp8_e4m3, got {self.table_dtype!r}")
        _check((self.table_dtype == "fp8_e4m3") == (self.table_block > 0)
               and (self.table_block == 0 or self.head_dim % self.table_block == 0),
               f"engram.table_block must divide head_dim {self.head_dim} for fp8_e4m3 tables and be 0 otherwise, "
               f"got {self.table_block}")
        _check(self.init_std >= 0 and math.isfinite(self.init_std), f"engram.init_std must be finite and >= 0, got {self.init_std}")
        self.layer_ids = [int(x) for x in self.layer_ids]
        self.engram_vocab_size = [int(x) for x in self.engram_vocab_size]

    @property
    def n_orders(self) -> int:
        return self.max_ngram_size - 1

    @property
    def heads_per_layer(self) -> int:
        """K: rows fetched per token per Engram layer."""
        return self.n_orders * self.n_head_per_ngram

    @property
    def memory_dim(self) -> int:
        """Width of one token's concatenated rows, the value projection's input."""
        return self.heads_per_layer * self.head_dim


@dataclass(slots=True)
class ModelConfig:
    """A decoder-only MoE transformer, with Engram at `engram.layer_ids` (engram=None: pure MoE)."""

    vocab_size: int = 8192
    compressed_vocab_size: int | None = None   # None: no compression (identity map)
    pad_id: int = 0                            # compressed id used before the sequence start when hashing
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None              # grouped-query attention; None: = n_heads
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    # Feed-forward: the first n_dense_layers use a dense SwiGLU, the rest an MoE.
    n_dense_layers: int = 0
    dense_inter_dim: int = 768
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    shared_inter_dim: int | None = None        # None: n_shared_experts * moe_inter_dim (the shared experts as one MLP)
    n_activated_experts: int = 2               # top-k
    moe_inter_dim: int = 256
    score_func: str = "sigmoid"                # softmax | sigmoid (DeepSeek-V3)
    route_scale: float = 1.0
    bias_update_speed: float = 1e-3            # auxiliary-loss-free balancing; 0 turns it off
    aux_loss_coef: float = 1e-4                # batch-level balance loss; 0 turns it off
    tie_embeddings: bool = False
    init_std: float = 0.02
    engram: EngramConfig | None = None

    def __post_init__(self):
        if isinstance(self.engram, dict):
            self.engram = EngramConfig(**self.engram)
        if self.compressed_vocab_size is None:
            self.compressed_vocab_size = self.vocab_size
        _check(self.vocab_size >= 2, f"vocab_size must be >= 2, got {self.vocab_size}")
        _check(1 <= self.compressed_vocab_size <= self.vocab_size,
               f"compressed_vocab_size must be in [1, vocab_size={self.vocab_size}], got {self.compressed_vocab_size}")
        _check(0 <= self.pad_id < self.compressed_vocab_size,
               f"pad_id is a compressed id and must be in [0, {self.compressed_vocab_size}), got {self.pad_id}")
        _check(self.dim >= 2 and self.n_layers >= 1, f"dim and n_layers must be positive, got {self.dim}, {self.n_layers}")
        _check(self.n_heads >= 1 and self.dim % self.n_heads == 0,
               f"dim={self.dim} must be a multiple of n_heads={self.n_heads}")
        _check((self.dim // self.n_heads) % 2 == 0, f"head dim {self.dim // self.n_heads} must be even for rotary embeddings")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        _check(self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads == 0,
               f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        _check(self.max_seq_len >= 1, f"max_seq_len must be >= 1, got {self.max_seq_len}")
        _check(self.rope_theta > 0 and self.norm_eps > 0, "rope_theta and norm_eps must be > 0")
        _check(0 <= self.n_dense_layers <= self.n_layers,
               f"n_dense_layers must be in [0, n_layers={self.n_layers}], got {self.n_dense_layers}")
        if self.n_dense_layers < self.n_layers:
            _check(self.n_routed_experts >= 1, f"n_routed_experts must be >= 1, got {self.n_routed_experts}")
            _check(1 <= self.n_activated_experts <= self.n_routed_experts,
                   f"n_activated_experts must be in [1, n_routed_experts={self.n_routed_experts}], got {self.n_activated_experts}")
            _check(self.n_shared_experts >= 0 and self.moe_inter_dim >= 1, "n_shared_experts must be >= 0 and moe_inter_dim >= 1")
        if self.shared_inter_dim is None:
            self.shared_inter_dim = self.n_shared_experts * self.moe_inter_dim
        _check(self.shared_inter_dim >= 0, f"shared_inter_dim must be >= 0, got {self.shared_inter_dim}")
        if self.n_dense_layers > 0:
            _check(self.dense_inter_dim >= 1, f"dense_inter_dim must be >= 1, got {self.dense_inter_dim}")
        _check(self.score_func in ("softmax", "sigmoid"), f"score_func must be softmax or sigmoid, got {self.score_func!r}")
        _check(self.route_scale > 0, f"route_scale must be > 0, got {self.route_scale}")
        _check(self.bias_update_speed >= 0 and self.aux_loss_coef >= 0, "bias_update_speed and aux_loss_coef must be >= 0")
        _check(self.init_std > 0, f"init_std must be > 0, got {self.init_std}")
        if self.engram is not None:
            bad = [x for x in self.engram.layer_ids if x >= self.n_layers]
            _check(not bad, f"engram.layer_ids {bad} are not layers of a {self.n_layers}-layer model")
            # The backbone keeps one residual stream; with hc_mult > 1 the Engram module gates G copies
            # of it separately over one shared value and averages them back (engram.py).

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def engram_layers(self) -> list[int]:
        return sorted(self.engram.layer_ids) if self.engram is not None else []

    def for_tokenizer(self, tok) -> "ModelConfig":
        """A copy whose vocabulary fields describe `tok` (a CompressedTokenizer)."""
        return dataclasses.replace(self, vocab_size=tok.vocab_size, compressed_vocab_size=tok.compressed_vocab_size,
                                   pad_id=tok.compressed_pad_id)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        _unknown(cls, d, "model")
        if d.get("engram") is not None:
            _unknown(EngramConfig, d["engram"], "model.engram")
            d["engram"] = EngramConfig(**d["engram"])
        return cls(**d)


@dataclass(slots=True)
class TrainConfig:
    """One training run: data, optimizer, schedule, precision, evaluation and checkpoints."""

    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-3                      # peak dense learning rate (AdamW)
    min_lr_ratio: float = 0.1             # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1             # dense matrices only; norms, biases and the tables get none
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0                # global norm over dense parameters; 0 turns it off
    table_lr_mult: float = 5.0            # Engram tables: Adam at this multiple of the dense lr (the paper: 5)
    dtype: str = "fp32"                   # fp32 | bf16 (autocast; weights and tables stay in their dtype)
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    checkpoint_every: int = 0             # 0: only at the end
    val_fraction: float = 0.05            # fraction of stdlib files held out for validation
    tokenizer_vocab: int = 8192           # BPE target size when a tokenizer has to be trained
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "log_every"):
            _check(getattr(self, name) >= 1, f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            _check(getattr(self, name) >= 0, f"train.{name} must be >= 0, got {getattr(self, name)}")
        _check(self.lr > 0 and math.isfinite(self.lr), f"train.lr must be > 0, got {self.lr}")
        _check(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.weight_decay >= 0 and self.grad_clip >= 0, "train.weight_decay and train.grad_clip must be >= 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"train.betas must be two values in [0, 1), got {self.betas}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        _check(self.table_lr_mult > 0, f"train.table_lr_mult must be > 0, got {self.table_lr_mult}")
        _check(self.dtype in ("fp32", "bf16"), f"train.dtype must be fp32 or bf16, got {self.dtype!r}")
        _check(0 < self.val_fraction < 1, f"train.val_fraction must be in (0, 1), got {self.val_fraction}")
        _check(256 + 2 <= self.tokenizer_vocab <= 1 << 20, f"train.tokenizer_vocab out of range: {self.tokenizer_vocab}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        _unknown(cls, d, "train")
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


def _unknown(cls, d: dict, where: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(set(d) - names)
    _check(not extra, f"unknown {where} field(s) {extra}; known: {sorted(names)}")


def config_path(name_or_path: str | Path) -> Path:
    """A bare name ("small") means engram_model/configs/<name>.json; anything else is a path."""
    p = Path(name_or_path)
    if p.suffix != ".json" and not p.exists():
        p = CONFIG_DIR / f"{name_or_path}.json"
    if not p.exists():
        known = sorted(x.stem for x in CONFIG_DIR.glob("*.json"))
        raise ValueError(f"config {str(name_or_path)!r} not found; give a path or one of {known}")
    return p


def load_config(name_or_path: str | Path) -> tuple[ModelConfig, TrainConfig]:
    d = json.loads(config_path(name_or_path).read_text())
    _check(set(d) <= {"model", "train", "comment"}, f"a config file holds 'model' and 'train', got {sorted(d)}")
    return ModelConfig.from_dict(d.get("model", {})), TrainConfig.from_dict(d.get("train", {}))
