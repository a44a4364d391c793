"""EngramModel: a decoder-only MoE transformer with Engram memory at a few layers.

    model = EngramModel(cfg, rows=LocalRows(table_specs(cfg)), compress_lookup=tok.lookup)
    logits, aux = model(tokens)                   # tokens int64 [B, T] -> logits [B, T, V], aux loss []
    cache = model.new_cache(batch_size=B)         # decoding: prefill, then one token at a time
    logits, _ = model(prompt, cache=cache); logits, _ = model(next_token, cache=cache)
    logits, _ = model(padded, n_pad=n_pad)        # left padding: row b's first n_pad[b] tokens are pads

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

Left padding lets prompts of different lengths share a batch: n_pad int64 [B] says that row b's
first n_pad[b] positions are padding (given with the first call of a cache, which keeps it). Each
row then computes what it would alone, up to float summation order: no query attends a padding
key, rotary positions count from 0 at the row's first real token, hashing sees the pad_id before
it (as before any sequence start), the ShortConv sees zeros there, and the MoE leaves padding out
of its load statistics. Padding positions still get row ids (hashed from pad_id) and outputs,
both meaningless and harmless. Without n_pad nothing of this runs: training is unchanged.
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
class LeftPadding:
    """Row b's first n[b] positions are padding; its real tokens sit at n[b], n[b] + 1, ..."""

    n: torch.Tensor                         # int64 [B]
    lo: int                                 # min(n) and max(n) as ints, so that per-step
    hi: int                                 # checks need no device sync

    @classmethod
    def of(cls, n_pad: torch.Tensor, batch: int) -> LeftPadding | None:
        """Validated padding, or None when no row is padded (then the unpadded path runs)."""
        if n_pad.shape != (batch,) or n_pad.dtype.is_floating_point or n_pad.dtype == torch.bool:
            raise ValueError(f"n_pad must be an integer tensor of shape [{batch}], got {n_pad.dtype} {tuple(n_pad.shape)}")
        lo, hi = int(n_pad.min()), int(n_pad.max())
        if lo < 0:
            raise ValueError(f"n_pad counts padding positions and must be >= 0, got {lo}")
        return cls(n_pad.to(torch.int64), lo, hi) if hi > 0 else None

    def real(self, pos: int, T: int) -> torch.Tensor | None:
        """bool [B, T], True at real tokens among positions [pos, pos+T); None when all are real."""
        if pos >= self.hi:
            return None
        t = torch.arange(pos, pos + T, device=self.n.device)
        return t[None, :] >= self.n[:, None]

    def positions(self, pos: int, T: int) -> torch.Tensor:
        """Rotary positions int64 [B, T] of positions [pos, pos+T): 0 at each row's first real token."""
        t = torch.arange(pos, pos + T, device=self.n.device)
        return (t[None, :] - self.n[:, None]).clamp_min(0)          # padding: 0 (its value never matters)

    def attn_mask(self, pos: int, T: int) -> torch.Tensor:
        """bool [B, 1, T, pos+T]: causal, and no padding key, except that a padding query sees itself
        (a row of only False would make softmax NaN, and NaN values poison even weight-0 sums)."""
        q = torch.arange(pos, pos + T, device=self.n.device)[:, None]             # [T, 1]
        k = torch.arange(pos + T, device=self.n.device)[None, :]                  # [1, S]
        real_key = k[None] >= self.n[:, None, None]                               # [B, 1, S]
        return ((k <= q) & (real_key | (k == q)))[:, None]                        # [B, 1, T, S]


@dataclass
class Cache:
    """Decoding state of one batch: KV per layer, ShortConv inputs per Engram layer, last tokens."""

    kv: list[KVCache]
    conv: dict[int, torch.Tensor | None] = field(default_factory=dict)
    tail: torch.Tensor | None = None        # last max_n-1 compressed ids [B, <= max_n-1]
    pos: int = 0                            # positions written so far
    pad: LeftPadding | None = None          # set by the first call when the batch is left-padded


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
                row_ids: torch.Tensor | None, cache: Cache | None, real: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """h [B, T, D]; real bool [B, T] and attn_mask bool [B, 1, T, S] only for a left-padded batch."""
        pos = cache.pos if cache is not None else 0
        if self.engram is not None:
            memory = rows.get(self.layer_id, row_ids)                                 # [B, T, K, d]
            state = cache.conv.get(self.layer_id) if cache is not None else None
            out, state = self.engram(h, memory, state, mask=real)
            if cache is not None:
                cache.conv[self.layer_id] = state
            h = h + out
        kv = cache.kv[self.layer_id] if cache is not None else None
        h = h + self.attn(self.attn_norm(h), cos, sin, kv, pos, mask=attn_mask)
        if isinstance(self.ffn, MoE):
            y, aux = self.ffn(self.ffn_norm(h), mask=real)
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
    def row_ids(self, tokens: torch.Tensor, cache: Cache | None = None,
                real: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """tokens [B, T] -> {layer: global row ids [B, T, K]}; at decode the cache supplies the past.

        real bool [B, T]: padding positions (False) hash as the hasher's pad_id, the id it puts
        before a sequence start, so a row's real tokens get the row ids they would get alone.
        """
        if self.hasher is None:
            return {}
        T = tokens.shape[1]
        cids = self.compress_lookup[tokens]                                           # [B, T]
        if real is not None:
            cids = cids.masked_fill(~real, self.hasher.pad_id)
        window = cids if cache is None or cache.tail is None else torch.cat([cache.tail, cids], dim=1)
        if cache is not None:
            cache.tail = window[:, -(self.cfg.engram.max_ngram_size - 1):]
        return {layer: ids[:, -T:] for layer, ids in self.hasher.row_ids(window).items()}

    def prefetch(self, tokens: torch.Tensor, n_pad: torch.Tensor | None = None,
                 before: torch.Tensor | None = None) -> None:
        """Start fetching the Engram rows a later forward of `tokens` reads, while other work computes.

        tokens int64 [B, T]: a batch known ahead (the next prompt chunk, the next queued batch).
        before [B, P]: the tokens this batch's rows already fed to the cache that forward will use
        (for a later chunk of a prompt: prompt[:, :start]); None when tokens start their sequences.
        n_pad [B]: the left padding of the whole sequences, as forward's first call gets it.
        That forward then finds its fetches in flight: the row ids are the ones it computes itself.
        A RowSource that does not prefetch (LocalRows) makes this a no-op.
        """
        if self.hasher is None or self.rows is None or not self.rows.prefetch_enabled:
            return
        B, T = tokens.shape
        keep = self.cfg.engram.max_ngram_size - 1                  # the past tokens an n-gram reaches
        ctx = before[:, max(0, before.shape[1] - keep):] if before is not None else tokens[:, :0]
        start = before.shape[1] if before is not None else 0
        pad = LeftPadding.of(n_pad.to(tokens.device), B) if n_pad is not None else None
        window = torch.cat([ctx, tokens], dim=1)
        real = pad.real(start - ctx.shape[1], window.shape[1]) if pad is not None else None
        for layer, ids in self.row_ids(window, None, real).items():
            self.rows.prefetch_ahead(layer, ids[:, -T:])

    def forward(self, tokens: torch.Tensor, cache: Cache | None = None, n_pad: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens int64 [B, T] -> (logits float [B, T, V], aux balance loss []).

        n_pad int64 [B]: left padding, row b's first n_pad[b] positions are pads (see the module
        docstring). With a cache it goes with the first call only; the cache keeps it for the rest.
        """
        B, T = tokens.shape
        pos = cache.pos if cache is not None else 0
        pad = cache.pad if cache is not None else None
        if n_pad is not None:
            if pos > 0:
                raise ValueError("n_pad (left padding) goes with the first call of a cache, which then keeps it")
            pad = LeftPadding.of(n_pad.to(tokens.device), B)
            if cache is not None:
                cache.pad = pad
        # A padded row's rotary positions run n_pad behind its cache positions: the longest row counts.
        end = pos + T - (pad.lo if pad is not None else 0)
        if end > self.cfg.max_seq_len:
            raise ValueError(f"positions up to {end} exceed max_seq_len={self.cfg.max_seq_len}")
        real = pad.real(pos, T) if pad is not None else None                          # [B, T] or None
        row_ids = self.row_ids(tokens, cache, real)
        if row_ids and self.rows is None:
            raise ValueError("this model has Engram layers: give it a RowSource (EngramModel(cfg, rows=...))")
        for layer in self.cfg.engram_layers:               # prefetch all, in layer order, before any block
            self.rows.prefetch(layer, row_ids[layer])
        h = self.embed(tokens)                                                        # [B, T, D]
        if pad is None:
            cos, sin = self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]          # [T, hd/2]
            attn_mask = None                                                          # plain causal
        else:
            p = pad.positions(pos, T)                                                 # [B, T]
            cos, sin = self.rope_cos[p], self.rope_sin[p]                             # [B, T, hd/2]
            attn_mask = pad.attn_mask(pos, T)                                         # [B, 1, T, pos+T]
        aux = h.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            h, a = block(h, cos, sin, self.rows, row_ids.get(block.layer_id), cache, real, attn_mask)
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

