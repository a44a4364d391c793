"""Small synthetic safetensors files in the layouts of the shipped mappings (no download needed).

    python -m engram_mem.tools.synthetic --layout v41-flash --rows 20000 --out /tmp/v41     # + SHA256SUMS
    python -m engram_mem.tools.synthetic --layout deepseek-engram-demo --rows 5000 --out /tmp/demo

v41-flash: per layer (1 and 14) FP8 E4M3 values [rows, 256] and U8 ue8m0 scales [rows, 8], spread
over three files the way a sharded checkpoint spreads tensors (a layer's values and scales in
different files). deepseek-engram-demo: per layer (1 and 15) one float32 [rows, 32] multi-head
embedding. Values are random (normal draws cast to E4M3; scale exponents 2**-8 .. 2**7), written
with the safetensors library itself, so the importer is tested against files the library makes.
"""

from __future__ import annotations

import argparse
import hashlib
import os

import torch
from safetensors.torch import save_file


def fp8_table(rows: int, dim: int = 256, block: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(values float8_e4m3fn [rows, dim], scales uint8 [rows, dim // block]) of random rows."""
    g = torch.Generator().manual_seed(seed)
    values = (torch.randn(rows, dim, generator=g) * 40).clamp(-448, 448).to(torch.float8_e4m3fn)
    scales = torch.randint(127 - 8, 127 + 8, (rows, dim // block), generator=g, dtype=torch.uint8)
    return values, scales


def write_v41(out: str, rows: int, layers=(1, 14), dim: int = 256, block: int = 32, seed: int = 0) -> list[str]:
    os.makedirs(out, exist_ok=True)
    files: list[dict] = [{}, {}, {}]
    for i, layer in enumerate(layers):
        v, s = fp8_table(rows, dim, block, seed + layer)
        files[i][f"model.layers.{layer}.engram.embed.weight"] = v
        files[i + 1][f"model.layers.{layer}.engram.embed.weight_scale"] = s
    paths = []
    for i, tensors in enumerate(files):
        if tensors:
            p = os.path.join(out, f"model-{i + 1:05d}-of-{len(files):05d}.safetensors")
            save_file(tensors, p, metadata={"format": "pt"})
            paths.append(p)
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
