"""NgramHasher: compressed token ids -> hashed n-gram indices per Engram layer.

Bit-compatible with the reference Engram algorithm (DeepSeek's engram_demo_v1 NgramHashMapping),
so tables trained elsewhere can be served here and the other way round:

    hasher = NgramHasher(engram_vocab_size=[40000, 40000], max_ngram_size=3, n_head_per_ngram=4,
                         layer_ids=[1, 3], seed=0, pad_id=pad, compressed_vocab_size=cv)
    hasher.table_sizes[1]          # [[p, p', ...] for n=2, [...] for n=3]: prime head sizes
    hasher.hash(ids)               # ids int64 [B, T] (numpy or torch) -> {layer: [B, T, K]} head-local
    hasher.row_ids(ids)            # same, plus each head's offset: row ids of the layer's one table

K = (max_ngram_size - 1) * n_head_per_ngram, heads of n=2 first. The algorithm:
  multipliers[L] = 2 * default_rng(seed + 10007 L).integers(0, half_bound, max_n) + 1,
      half_bound = max(1, (int64_max // compressed_vocab_size) // 2)
  mix_n[t] = XOR_{k<n} token[t-k] * multipliers[L][k]   (int64; token before the start = pad_id)
  index[t, head j of order n] = mix_n[t] mod prime_j
Head sizes are the smallest primes above engram_vocab_size[n-2] - 1 (then above the previous
prime) never used before, walking layers in layer_ids order, then n = 2..max_n, then heads.

Because token ids are < compressed_vocab_size and multipliers < int64_max // compressed_vocab_size,
every product fits in int64 and the XOR stays non-negative: numpy and torch give the same bits.
"""

from __future__ import annotations

import numpy as np
import torch

_I64_MAX = np.iinfo(np.int64).max
_LAYER_PRIME = 10007
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)  # deterministic for n < 3.3e24


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for any n that fits in 64 bits."""
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def next_prime(start: int, used: set[int]) -> int:
    """Smallest prime > start that is not in `used`."""
    c = start + 1
    while not (is_prime(c) and c not in used):
        c += 1
    return c


def bucket_primes(engram_vocab_size: list[int], max_ngram_size: int, n_head_per_ngram: int,
                  layer_ids: list[int]) -> dict[int, list[list[int]]]:
    """{layer: [[prime of each head] for each order 2..max_n]}: every (order, head) gets the smallest
    prime above engram_vocab_size[order - 2] - 1 (then above its previous head's) that no earlier
    layer, order or head took. V4.1-Flash's config gives one engram_vocab_size for every order."""
    used: set[int] = set()
    out: dict[int, list[list[int]]] = {}
    for layer in layer_ids:
        per_order = []
        for n in range(2, max_ngram_size + 1):
            start, heads = int(engram_vocab_size[n - 2]) - 1, []
            for _ in range(n_head_per_ngram):
                start = next_prime(start, used)
                used.add(start)
                heads.append(start)
            per_order.append(heads)
        out[int(layer)] = per_order
    return out


class NgramHasher:
    def __init__(self, engram_vocab_size: list[int], max_ngram_size: int, n_head_per_ngram: int,
                 layer_ids: list[int], seed: int, pad_id: int, compressed_vocab_size: int):
        if max_ngram_size < 2:
            raise ValueError(f"max_ngram_size must be >= 2, got {max_ngram_size}")
        if len(engram_vocab_size) < max_ngram_size - 1:
            raise ValueError(f"engram_vocab_size needs a size for each order 2..{max_ngram_size}, got {engram_vocab_size}")
        if n_head_per_ngram < 1:
            raise ValueError(f"n_head_per_ngram must be >= 1, got {n_head_per_ngram}")
        if not layer_ids or len(set(layer_ids)) != len(layer_ids):
            raise ValueError(f"layer_ids must be non-empty and distinct, got {layer_ids}")
        if compressed_vocab_size < 1:
            raise ValueError(f"compressed_vocab_size must be >= 1, got {compressed_vocab_size}")
        if not 0 <= pad_id < compressed_vocab_size:
            raise ValueError(f"pad_id is a compressed id and must be in [0, {compressed_vocab_size}), got {pad_id}")
        self.engram_vocab_size = [int(v) for v in engram_vocab_size]
        self.max_ngram_size = int(max_ngram_size)
        self.n_head_per_ngram = int(n_head_per_ngram)
        self.layer_ids = [int(x) for x in layer_ids]
        self.seed = int(seed)
        self.pad_id = int(pad_id)
        self.compressed_vocab_size = int(compressed_vocab_size)

        half_bound = max(1, (_I64_MAX // self.compressed_vocab_size) // 2)
        self.multipliers: dict[int, np.ndarray] = {}       # layer -> int64 [max_n]
        for layer in self.layer_ids:
            rng = np.random.default_rng(self.seed + _LAYER_PRIME * layer)
            r = rng.integers(0, half_bound, size=self.max_ngram_size, dtype=np.int64)
            self.multipliers[layer] = 2 * r + 1

        # layer -> per order -> per head prime
        self.table_sizes = bucket_primes(self.engram_vocab_size, self.max_ngram_size, self.n_head_per_ngram,
                                         self.layer_ids)
        self.head_sizes = {L: np.array([p for o in s for p in o], dtype=np.int64) for L, s in self.table_sizes.items()}
        # A layer's heads are concatenated into one table: row id = head index + head offset.
        self.offsets = {L: np.concatenate([[0], np.cumsum(s)[:-1]]).astype(np.int64) for L, s in self.head_sizes.items()}
        self._torch_consts: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def heads_per_layer(self) -> int:
        return (self.max_ngram_size - 1) * self.n_head_per_ngram

    def table_rows(self, layer: int) -> int:
        return int(self.head_sizes[layer].sum())

    # ---- hashing --------------------------------------------------------------------------
    def hash(self, ids):
        """ids int64 [B, T] (numpy or torch) -> {layer: head-local indices int64 [B, T, K]}."""
        return self._hash(ids, with_offsets=False)

    def row_ids(self, ids):
        """Like hash(), with each head's offset added: global row ids of the layer's table."""
        return self._hash(ids, with_offsets=True)

    def _hash(self, ids, with_offsets: bool):
        is_torch = isinstance(ids, torch.Tensor)
        if ids.ndim != 2:
            raise ValueError(f"ids must be [B, T], got shape {tuple(ids.shape)}")
        if ids.numel() if is_torch else ids.size:
            lo, hi = (int(ids.min()), int(ids.max()))
            if lo < 0 or hi >= self.compressed_vocab_size:
                raise ValueError(f"compressed ids must be in [0, {self.compressed_vocab_size}), got range [{lo}, {hi}]")
        if is_torch:
            x = ids.to(torch.int64)
            shifted = [self._shift_torch(x, k) for k in range(self.max_ngram_size)]
        else:
            x = np.asarray(ids, dtype=np.int64)
            shifted = [self._shift_np(x, k) for k in range(self.max_ngram_size)]
        out = {}
        for layer in self.layer_ids:
            if is_torch:
                mult, primes, offsets = self._consts(layer, x.device)
            else:
                mult, primes, offsets = self.multipliers[layer], self.head_sizes[layer], self.offsets[layer]
            per_order = []
            for n in range(2, self.max_ngram_size + 1):
                mix = shifted[0] * mult[0]                                   # [B, T]
                for k in range(1, n):
                    mix = mix ^ (shifted[k] * mult[k])
                h = (n - 2) * self.n_head_per_ngram
                # Floor modulo by a positive prime: non-negative in numpy and torch alike.
                per_order.append(mix[..., None] % primes[h:h + self.n_head_per_ngram])   # [B, T, heads]
            idx = torch.cat(per_order, dim=-1) if is_torch else np.concatenate(per_order, axis=-1)
            out[layer] = idx + offsets if with_offsets else idx                            # [B, T, K]
        return out

    def _shift_np(self, x: np.ndarray, k: int) -> np.ndarray:
        """Token at t-k, pad_id before the start: [B, T]."""
        if k == 0:
            return x
        out = np.full_like(x, self.pad_id)
        if k < x.shape[1]:
            out[:, k:] = x[:, :-k]
        return out

    def _shift_torch(self, x: torch.Tensor, k: int) -> torch.Tensor:
        if k == 0:
            return x
        out = torch.full_like(x, self.pad_id)
        if k < x.shape[1]:
            out[:, k:] = x[:, :-k]
        return out

    def _consts(self, layer: int, device: torch.device):
        key = (layer, str(device))
        if key not in self._torch_consts:
            self._torch_consts[key] = tuple(torch.from_numpy(a).to(device) for a in (
                self.multipliers[layer], self.head_sizes[layer], self.offsets[layer]))
        return self._torch_consts[key]
