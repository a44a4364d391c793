"""Small synthetic safetensors files in the layouts of the shipped mappings (no download needed).

    python -m engram_mem.tools.synthetic --layout v41-flash --rows 20000 --out /tmp/v41     # + SHA256SUMS
    python -m engram_mem.tools.synthetic --layout deepseek-engram-demo --rows 5000 --out /tmp/demo

v41-flash: a checkpoint directory in DeepSeek-V4.1-Flash's published layout: per layer (1 and 14)
layers.{layer}.engram.embed.weight F8_E4M3 [rows, 256] and .scale F8_E8M0 [rows, 8], spread over
three files the way a sharded checkpoint spreads tensors (a layer's values and scales in different
files), a model.safetensors.index.json naming them and a config.json whose Engram fields give the
geometry (about `rows` rows a layer: the sum of its prime buckets, plus `extra_rows` past them).
deepseek-engram-demo: per layer (1 and 15) one float32 [rows, 32] multi-head
embedding. Values are random (normal draws cast to E4M3; scale exponents 2**-8 .. 2**7), written
with the safetensors library itself, so the importer is tested against files the library makes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os

import torch
from safetensors.torch import save_file


def fp8_table(rows: int, dim: int = 256, block: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(values float8_e4m3fn [rows, dim], scales uint8 [rows, dim // block]) of random rows."""
    g = torch.Generator().manual_seed(seed)
    values = (torch.randn(rows, dim, generator=g) * 40).clamp(-448, 448).to(torch.float8_e4m3fn)
    scales = torch.randint(127 - 8, 127 + 8, (rows, dim // block), generator=g, dtype=torch.uint8)
    return values, scales


def v41_config(rows: int, layers=(1, 14), dim: int = 256, block: int = 32, n_heads: int = 2, max_ngram_size: int = 3,
               extra_rows: int = 0) -> dict:
    """config.json's Engram fields for tables of about `rows` rows (V4.1-Flash: 16M start, 8 heads, n <= 4)."""
    from engram_model.hashing import bucket_primes

    k = (max_ngram_size - 1) * n_heads
    vocab = max(2, rows // k)
    primes = bucket_primes([vocab] * (max_ngram_size - 1), max_ngram_size, n_heads, list(layers))
    return {"model_type": "deepseek_v41", "engram_layer_ids": list(layers),
            "engram_num_embeddings": [sum(map(sum, primes[layer])) + extra_rows for layer in layers],
            "engram_vocab_size": vocab, "engram_n_heads": n_heads, "engram_max_ngram_size": max_ngram_size,
            "engram_head_dim": dim, "quantization_config": {"weight_block_size": [block, block]}}


def write_v41(out: str, rows: int, layers=(1, 14), dim: int = 256, block: int = 32, seed: int = 0,
              extra_rows: int = 0, config: dict | None = None) -> list[str]:
    """A V4.1-layout checkpoint directory; returns its safetensors files. `config` (Engram fields)
    replaces the one made from `rows`; the tensors follow its row counts."""
    os.makedirs(out, exist_ok=True)
    cfg = config or v41_config(rows, layers, dim, block, extra_rows=extra_rows)
    files: list[dict] = [{}, {}, {}]
    for i, (layer, n) in enumerate(zip(cfg["engram_layer_ids"], cfg["engram_num_embeddings"])):
        v, s = fp8_table(n, dim, block, seed + layer)
        files[i][f"layers.{layer}.engram.embed.weight"] = v
        files[i + 1][f"layers.{layer}.engram.embed.scale"] = s.view(torch.float8_e8m0fnu)
    paths, weight_map = [], {}
    for i, tensors in enumerate(files):
        if tensors:
            name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            save_file(tensors, os.path.join(out, name), metadata={"format": "pt"})
            paths.append(os.path.join(out, name))
            weight_map |= {k: name for k in tensors}
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(os.path.getsize(p) for p in paths)}, "weight_map": weight_map}, f)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    _sums(out, paths)
    return paths


def write_demo(out: str, rows: int, layers=(1, 15), dim: int = 32, seed: int = 0) -> list[str]:
    os.makedirs(out, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {f"layers.{layer}.engram.multi_head_embedding.embedding.weight": torch.randn(rows, dim, generator=g)
               for layer in layers}
    p = os.path.join(out, "model.safetensors")
    save_file(tensors, p)
    _sums(out, [p])
    return [p]


def _sums(out: str, paths: list[str]) -> None:
    with open(os.path.join(out, "SHA256SUMS"), "w") as f:
        for p in paths:
            f.write(f"{hashlib.sha256(open(p, 'rb').read()).hexdigest()}  {os.path.basename(p)}\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layout", choices=("v41-flash", "deepseek-engram-demo"), required=True)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    paths = (write_v41 if a.layout == "v41-flash" else write_demo)(a.out, a.rows, seed=a.seed)
    print("\n".join(paths))


if __name__ == "__main__":
    main()
