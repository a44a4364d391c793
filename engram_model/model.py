"""EngramModel: a decoder-only MoE transformer with Engram memory at a few layers.

    model = EngramModel(cfg, rows=LocalRows(table_specs(cfg)), compress_lookup=tok.lookup)
    logits, aux = model(tokens)                   # tokens int64 [B, T] -> logits [B, T, V], aux loss []
    cache = model.new_cache(batch_size=B)         # decoding: prefill, then one token at a time
    logits, _ = model(prompt, cache=cache); logits, _ = model(next_token, cache=cache)

Legend: B batch, T time, D model dim, V vocabulary, K rows per token per Engram layer, d row width.

A block: [h += Engram(h, rows)] -> h += Attn(RMSNorm(h)) -> h += FFN(RMSNorm(h)), the FFN an MoE
(or a dense SwiGLU for the first n_dense_layers). cfg.engram = None gives the pure MoE baseline.

Memory access follows one fixed pattern, which a remote RowSource relies on to hide its latency:
at the start of each forward the tokens are compressed and hashed, and rows.prefetch(layer, ids)
is called for every Engram layer in layer order; rows.get(layer, ids) is called inside that
layer's block. Row ids depend only on tokens, so they are known before any block runs. The model
holds the RowSource as a plain attribute (`model.rows`, not a module): its tables are not model
parameters, and which kind of source it is never matters here.

At decode, the new token's n-grams use the previous max_n - 1 tokens (kept in the cache), and the
Engram ShortConv and attention continue from cached state, so decoding equals the full forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from engram_model.attention import Attention, KVCache, rope_tables
from engram_model.config import ModelConfig
from engram_model.engram import Engram
from engram_model.moe import MLP, MoE
from engram_model.rows import RowSource, make_hasher, table_specs


@dataclass
class Cache:
    """Decoding state of one batch: KV per layer, ShortConv inputs per Engram layer, last tokens."""

    kv: list[KVCache]
    conv: dict[int, torch.Tensor | None] = field(default_factory=dict)
    tail: torch.Tensor | None = None        # last max_n-1 compressed ids [B, <= max_n-1]
    pos: int = 0                            # positions written so far


class Block(nn.Module):
    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        self.layer_id = layer_id
        self.engram = Engram(cfg.dim, cfg.engram, cfg.norm_eps) if layer_id in cfg.engram_layers else None
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = MLP(cfg.dim, cfg.dense_inter_dim) if layer_id < cfg.n_dense_layers else MoE(cfg)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: RowSource | None,
                row_ids: torch.Tensor | None, cache: Cache | None) -> tuple[torch.Tensor, torch.Tensor]:
        pos = cache.pos if cache is not None else 0
        if self.engram is not None:
            memory = rows.get(self.layer_id, row_ids)                                 # [B, T, K, d]
            state = cache.conv.get(self.layer_id) if cache is not None else None
            out, state = self.engram(h, memory, state)
            if cache is not None:
                cache.conv[self.layer_id] = state
            h = h + out
        h = h + self.attn(self.attn_norm(h), cos, sin, cache.kv[self.layer_id] if cache is not None else None, pos)
        if isinstance(self.ffn, MoE):
            y, aux = self.ffn(self.ffn_norm(h))
        else:
            y, aux = self.ffn(self.ffn_norm(h)), h.new_zeros((), dtype=torch.float32)
        return h + y, aux


class EngramModel(nn.Module):
    def __init__(self, cfg: ModelConfig, rows: RowSource | None = None, compress_lookup=None):
        super().__init__()
        self.cfg = cfg
        self.rows = rows
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList([Block(i, cfg) for i in range(cfg.n_layers)])
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)                      # [S_max, hd/2]
        self.register_buffer("rope_sin", sin, persistent=False)
        self.hasher = make_hasher(cfg) if cfg.engram is not None else None
        # token id -> compressed id; saved with the weights so a checkpoint hashes like it trained.
        if compress_lookup is None and cfg.compressed_vocab_size != cfg.vocab_size:
            raise ValueError("cfg.compressed_vocab_size != vocab_size: pass compress_lookup (tokenizer.lookup)")
        lookup = np.arange(cfg.vocab_size) if compress_lookup is None else np.asarray(compress_lookup)
        if lookup.shape != (cfg.vocab_size,) or lookup.min() < 0 or lookup.max() >= cfg.compressed_vocab_size:
            raise ValueError(f"compress_lookup must map {cfg.vocab_size} ids into [0, {cfg.compressed_vocab_size})")
        lookup = torch.tensor(lookup, dtype=torch.int64)
        self.register_buffer("compress_lookup", lookup)
        self.apply(self._init_weights)
        # Residual writers get a smaller init, so the stream's scale does not grow with depth (GPT-2).
        for name, p in self.named_parameters():
            if name.endswith(("attn.wo.weight", "w2.weight")):
                nn.init.normal_(p, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))
        for block in self.blocks:
            if block.engram is not None:
                block.engram.init_weights(cfg.init_std)        # starts silent; see Engram.init_weights

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.cfg.init_std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    # ---- forward ---------------------------------------------------------------------------
    def row_ids(self, tokens: torch.Tensor, cache: Cache | None = None) -> dict[int, torch.Tensor]:
        """tokens [B, T] -> {layer: global row ids [B, T, K]}; at decode the cache supplies the past."""
        if self.hasher is None:
            return {}
        T = tokens.shape[1]
        cids = self.compress_lookup[tokens]                                           # [B, T]
        window = cids if cache is None or cache.tail is None else torch.cat([cache.tail, cids], dim=1)
        if cache is not None:
            cache.tail = window[:, -(self.cfg.engram.max_ngram_size - 1):]
        return {layer: ids[:, -T:] for layer, ids in self.hasher.row_ids(window).items()}

    def forward(self, tokens: torch.Tensor, cache: Cache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens int64 [B, T] -> (logits float [B, T, V], aux balance loss [])."""
        B, T = tokens.shape
        pos = cache.pos if cache is not None else 0
        if pos + T > self.cfg.max_seq_len:
            raise ValueError(f"positions up to {pos + T} exceed max_seq_len={self.cfg.max_seq_len}")
        row_ids = self.row_ids(tokens, cache)
        if row_ids and self.rows is None:
            raise ValueError("this model has Engram layers: give it a RowSource (EngramModel(cfg, rows=...))")
        for layer in self.cfg.engram_layers:               # prefetch all, in layer order, before any block
            self.rows.prefetch(layer, row_ids[layer])
        h = self.embed(tokens)                                                        # [B, T, D]
        cos, sin = self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]
        aux = h.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            h, a = block(h, cos, sin, self.rows, row_ids.get(block.layer_id), cache)
            aux = aux + a
        if cache is not None:
            cache.pos += T
        return self.head(self.norm(h)), aux

    def new_cache(self, batch_size: int, max_len: int | None = None) -> Cache:
        max_len = max_len or self.cfg.max_seq_len
        p = self.embed.weight
        kv = [KVCache(batch_size, max_len, self.cfg.n_kv_heads, self.cfg.head_dim, p.device, p.dtype)
              for _ in range(self.cfg.n_layers)]
        return Cache(kv=kv)

    # ---- training helpers ------------------------------------------------------------------
    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]

    def update_router_bias(self) -> None:
        for moe in self.moe_layers():
            moe.update_bias()

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay matrices and embeddings, not norms, biases or conv kernels."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.ndim == 2 else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts from a config (built on the meta device, so free for any size).

    total = dense + engram tables. activated = what one token touches, without the input
    embedding (a lookup): attention, norms, routers, shared experts, k of E routed experts,
    the output head, Engram projections/conv, and the K rows it reads per Engram layer.
    """
    with torch.device("meta"):
        model = EngramModel(cfg, compress_lookup=np.arange(cfg.vocab_size) % cfg.compressed_vocab_size)
    dense = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for m in model.moe_layers() for e in m.experts for p in e.parameters())
    routed_active = sum(p.numel() for m in model.moe_layers() for p in m.experts[0].parameters()) * cfg.n_activated_experts
    embed = model.embed.weight.numel() if not cfg.tie_embeddings else 0
    engram_dense = sum(p.numel() for b in model.blocks if b.engram is not None for p in b.engram.parameters())
    tables = sum(s.params for s in table_specs(cfg).values())
    rows_read = len(cfg.engram_layers) * (cfg.engram.memory_dim if cfg.engram else 0)
    return {
        "total": dense + tables,
        "dense": dense,
        "engram_tables": tables,
        "engram_dense": engram_dense,
        "routed_experts": routed,
        "activated": dense - embed - routed + routed_active + rows_read,
    }

