"""Build a tiny DeepSeek-V4.1-Flash-shaped checkpoint whose Engram tables are FP8 safetensors.

    python -m engram_model.v41 --out runs/v41-tiny
    engram-mem up && engram-mem import --mapping v41-flash runs/v41-tiny/engram_tables.safetensors
    engram-generate --checkpoint runs/v41-tiny --memory local --prompt "def "     # rows from the cluster
    engram-generate --checkpoint runs/v41-tiny --prompt "def "                   # rows in process: same tokens

The shape (engram_model/configs/v41_tiny.json): Engram at layers 1 and 14 of 15, rows of 256 FP8
E4M3 values with a ue8m0 scale byte per 32 values (264 bytes), 4 hyper-connection branches each
with its own gate over one shared value, no ShortConv. Weights are random (seeded); the value
projections are given nonzero weights (the trainer starts them at zero) so the tokens depend on
the tables. The checkpoint directory holds the usual files plus:

    tables.safetensors          the tables as LocalRows loads them: "engram.l{layer}.weight" U8 [R, 264]
    engram_tables.safetensors   the same bytes in V4.1's layout: values F8_E4M3 [R, 256] and scales
                                U8 [R, 8] per layer, named as engram_mem/tools/mappings/v41-flash.json expects
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import torch
from safetensors.torch import save_file

from engram_model.checkpoint import save_checkpoint
from engram_model.config import load_config
from engram_model.model import EngramModel
from engram_model.rows import LocalRows, table_specs
from engram_model.tokenizer import CompressedTokenizer


def _corpus() -> list[str]:
    """A little real Python source from the standard library (no download)."""
    import collections
    import dataclasses
    import json as json_mod

    return [inspect.getsource(m) for m in (collections, dataclasses, json_mod.decoder)]


def build(out: str | Path, seed: int = 0, config: str = "v41_tiny") -> Path:
    torch.manual_seed(seed)
    model_cfg, train_cfg = load_config(config)
    tok = CompressedTokenizer.train(_corpus(), vocab_size=model_cfg.vocab_size)
    cfg = model_cfg.for_tokenizer(tok)
    specs = table_specs(cfg)
    rows = LocalRows(specs, optimizer=None)        # fp8 rows: quantized seeded normal draws
    model = EngramModel(cfg, rows=rows, compress_lookup=tok.lookup)
    with torch.no_grad():
        for block in model.blocks:
            if block.engram is not None:
                torch.nn.init.normal_(block.engram.value_proj.weight, std=0.02)
    path = save_checkpoint(out, model, rows=rows, tokenizer=tok, train_cfg=train_cfg)
    tensors = {}
    for layer, spec in specs.items():
        w = rows.weights[layer]                                       # uint8 [R, 256 + 8]
        tensors[f"model.layers.{layer}.engram.embed.weight"] = w[:, :spec.dim].contiguous().view(torch.float8_e4m3fn)
        tensors[f"model.layers.{layer}.engram.embed.weight_scale"] = w[:, spec.dim:].contiguous()
    save_file(tensors, str(path / "engram_tables.safetensors"), metadata={"format": "pt"})
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(build(a.out, a.seed))


if __name__ == "__main__":
    main()
