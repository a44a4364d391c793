"""Causal self-attention with rotary position embeddings and a KV cache.

    attn = Attention(cfg)
    y = attn(x, cos, sin)                                  # training / full forward: x [B, T, D]
    cache = KVCache(B, max_len, cfg.n_kv_heads, cfg.head_dim, device)
    y = attn(x_prompt, cos, sin, cache=cache, pos=0)       # prefill
    y = attn(x_next, cos, sin, cache=cache, pos=T)         # decode one (or a few) tokens
    y = attn(x, cos, sin, mask=mask)                       # left-padded batch: cos, sin [B, T, hd/2] per row

Legend: B batch, T new positions, S cached + new positions, H query heads, Hkv key/value heads
(grouped-query attention when Hkv < H), hd head dim, D model dim.
RoPE rotates the two halves of each head (GPT-NeoX layout); cos/sin are sliced to the absolute
positions [pos, pos + T), so cached keys keep the rotation they were written with. A left-padded
batch (see model.LeftPadding) passes per-row tables [B, T, hd/2], so each row's first real token
sits at rotary position 0, and a boolean mask [B, 1, T, S] that hides the padding keys; it then
replaces the causal rule, which the mask already contains.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from engram_model.config import ModelConfig


def rope_tables(head_dim: int, max_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: float32 [max_len, head_dim // 2]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, hd]; cos, sin [T, hd/2] (shared by the batch) or [B, T, hd/2] (per row)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)                              # [(B,) T, 1, hd/2]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class KVCache:
    """Keys and values of one layer for positions [0, S_max): [B, Hkv, S_max, hd] each."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.k = torch.zeros(batch, n_kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, Hkv, T, hd] at [pos, pos+T); return all keys/values so far [B, Hkv, pos+T, hd]."""
        end = pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; writing up to {end}")
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, pos: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D]; cos, sin [(B,) T, hd/2] for positions [pos, pos+T).

        mask: bool [B, 1, T, S], True where a query may attend a key; None means plain causal.
        """
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin)       # [B, T, H, hd]
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)    # [B, T, Hkv, hd]
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)                 # [B, H(kv), T, hd]
        if cache is not None:
            k, v = cache.update(pos, k, v)                                                 # [B, Hkv, S, hd]
            k, v = k.to(q.dtype), v.to(q.dtype)
        S = k.shape[2]
        causal = False
        if mask is not None:
            assert mask.shape[-2:] == (T, S), f"mask {tuple(mask.shape)} does not cover {T} queries x {S} keys"
        elif S == T:
            causal = T > 1
        elif T > 1:
            # New queries at positions pos..pos+T-1 see every cached key and the new ones up to themselves.
            mask = torch.arange(T, device=x.device)[:, None] + (S - T) >= torch.arange(S, device=x.device)[None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)    # [B, H, T, hd]
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))
