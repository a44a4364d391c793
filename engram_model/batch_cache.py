"""Re-forming a decode batch between steps: merge the caches of running sequences, drop finished rows.

    cache = merge_caches(model, [(running, [0, 2, 3]), (joined, [0, 1])], extra=40)   # rows in that order
    cache = merge_caches(model, [(cache, keep)], extra=remaining)                      # rows leave

The continuous-batching engine (engine.py) keeps one model.Cache for all running sequences. A
sequence that joins was prefilled in a cache of its own; a sequence that finishes leaves. Both
happen at token boundaries, and both are a merge: every kept row's real positions are copied so
that all rows end at the same position P (the longest row's real length), left-padded before:

    row a (len 5):  a a a a a        n_pad = [0, 3]; P = 5; the next token of every row is
    row b (len 2):  . . . b b        written at position P, where all rows stay aligned

This is exactly the layout model.LeftPadding describes, so the model computes each row as it would
alone (rotary positions count from each row's first real token; padding keys are masked). The
ShortConv states ([B, ctx, C]) stack as they are; the hash tails (last max_n - 1 compressed ids)
are left-filled with the hasher's pad_id, the id it puts before any sequence start. A merge copies
O(rows x positions) per layer, once per join or leave, never per step.
"""

from __future__ import annotations

import torch

from engram_model.model import Cache, EngramModel, LeftPadding


def real_lengths(cache: Cache) -> torch.Tensor:
    """int64 [B]: how many real (non-padding) positions each row of the cache holds."""
    B = cache.kv[0].k.shape[0]
    n = cache.pad.n if cache.pad is not None else torch.zeros(B, dtype=torch.int64)
    return cache.pos - n.cpu()


def merge_caches(model: EngramModel, parts: list[tuple[Cache, list[int]]], extra: int) -> Cache:
    """One cache holding the given rows of each part, in order, right-aligned at a common position P,
    with room for `extra` more positions. Parts must come from model (same layers, dtype, device)."""
    parts = [(c, list(rows)) for c, rows in parts if rows]
    assert parts, "merge_caches needs at least one row"
    assert extra >= 0, f"extra capacity must be >= 0, got {extra}"
    lengths = [real_lengths(c)[rows] for c, rows in parts]                   # [B_i] each
    P = int(max(int(L.max()) for L in lengths))
    B = sum(len(rows) for _, rows in parts)
    cfg = model.cfg
    out = model.new_cache(B, max_len=P + extra)
    n_pad = torch.cat([P - L for L in lengths])                              # [B]
    width = cfg.engram.max_ngram_size - 1 if cfg.engram is not None else 0
    pad_id = model.hasher.pad_id if model.hasher is not None else 0
    tails, convs = [], {layer: [] for layer in parts[0][0].conv}
    b0 = 0
    for (c, rows), L in zip(parts, lengths):
        idx = torch.tensor(rows, dtype=torch.int64, device=c.kv[0].k.device)
        # Positions [c.pos - longest, c.pos) hold every kept row's real tokens (and some padding).
        longest = int(L.max())
        src, dst = slice(c.pos - longest, c.pos), slice(P - longest, P)
        for kv_out, kv in zip(out.kv, c.kv):
            kv_out.k[b0:b0 + len(rows), :, dst] = kv.k.index_select(0, idx)[:, :, src]
            kv_out.v[b0:b0 + len(rows), :, dst] = kv.v.index_select(0, idx)[:, :, src]
        for layer, state in c.conv.items():
            convs[layer].append(state.index_select(0, idx))                  # [b, ctx, C]
        if width:
            tail = c.tail.index_select(0, idx)                               # [b, <= width]
            if tail.shape[1] < width:
                fill = tail.new_full((tail.shape[0], width - tail.shape[1]), pad_id)
                tail = torch.cat([fill, tail], dim=1)
            tails.append(tail)
        b0 += len(rows)
    out.conv = {layer: torch.cat(states) for layer, states in convs.items()}
    out.tail = torch.cat(tails) if tails else None
    out.pos = P
    device = out.kv[0].k.device
    out.pad = LeftPadding(n_pad.to(device), int(n_pad.min()), int(n_pad.max())) if int(n_pad.max()) > 0 else None
    return out

