"""Build a tiny DeepSeek-V4.1-Flash-shaped checkpoint whose Engram tables are FP8 safetensors.

    python -m engram_model.v41 --out runs/v41-tiny
    engram-mem up && engram-mem import runs/v41-tiny        # a published-layout directory: no mapping
    engram-generate --checkpoint runs/v41-tiny --memory local --prompt "def "     # rows from the cluster
    engram-generate --checkpoint runs/v41-tiny --prompt "def "                   # rows in process: same tokens
    tok, hasher = published_hasher("/models/DeepSeek-V4.1-Flash")   # V4.1 row ids from its own files

The shape (engram_model/configs/v41_tiny.json): Engram at layers 1 and 14 of 15, rows of 256 FP8
E4M3 values with a ue8m0 scale byte per 32 values (264 bytes), 4 hyper-connection branches each
with its own gate over one shared value, no ShortConv. Weights are random (seeded); the value
projections are given nonzero weights (the trainer starts them at zero) so the tokens depend on
the tables. The checkpoint directory holds the usual files plus:

    tables.safetensors          the tables as LocalRows loads them: "engram.l{layer}.weight" U8 [R, 264]
    engram_tables.safetensors   the same bytes as DeepSeek-V4.1-Flash publishes its tables: per layer
                                layers.{layer}.engram.embed.weight F8_E4M3 [R, 256] and .scale F8_E8M0 [R, 8]
    model.safetensors.index.json  which file holds which tensor (weight_map), as published
    config.json                 the checkpoint manifest, plus V4.1's Engram fields at its top level
                                (engram_layer_ids, engram_num_embeddings, engram_vocab_size, engram_n_heads,
                                engram_max_ngram_size, engram_head_dim, engram_pad_token_id,
                                engram_compressed_vocab_size, quantization_config.weight_block_size)

So the directory is read the way the real checkpoint is: `engram-mem import DIR` takes geometry
from config.json, files from the index, names from the shipped v41-flash mapping, and
`published_hasher(DIR)` computes row ids from the files alone (tokenizer.json with the config's
pad id and compressed size; bucket primes and hash multipliers as the reference computes them).
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engram_model.checkpoint import save_checkpoint
from engram_model.config import load_config
from engram_model.hashing import NgramHasher
from engram_model.model import EngramModel
from engram_model.rows import LocalRows, table_specs
from engram_model.tokenizer import CompressedTokenizer

INDEX_FILE = "model.safetensors.index.json"
TABLES_FILE = "engram_tables.safetensors"


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
        tensors[f"layers.{layer}.engram.embed.weight"] = w[:, :spec.dim].contiguous().view(torch.float8_e4m3fn)
        tensors[f"layers.{layer}.engram.embed.scale"] = w[:, spec.dim:].contiguous().view(torch.float8_e8m0fnu)
    save_file(tensors, str(path / TABLES_FILE), metadata={"format": "pt"})
    e = cfg.engram
    assert len(set(e.engram_vocab_size)) == 1, "V4.1's config has one engram_vocab_size for every order"
    manifest = json.loads((path / "config.json").read_text())
    manifest.update(engram_layer_ids=list(specs), engram_num_embeddings=[s.rows for s in specs.values()],
                    engram_vocab_size=e.engram_vocab_size[0], engram_n_heads=e.n_head_per_ngram,
                    engram_max_ngram_size=e.max_ngram_size, engram_head_dim=e.head_dim,
                    engram_pad_token_id=tok.pad_id, engram_compressed_vocab_size=tok.compressed_vocab_size,
                    quantization_config={"weight_block_size": [e.table_block, e.table_block]})
    (path / "config.json").write_text(json.dumps(manifest, indent=2))
    dense = safe_open(str(path / "model.safetensors"), "pt").keys()
    weight_map = {k: TABLES_FILE for k in tensors} | {k: "model.safetensors" for k in dense}
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return path


def published_hasher(directory: str | Path) -> tuple[CompressedTokenizer, NgramHasher]:
    """The tokenizer and hasher of a checkpoint directory as DeepSeek-V4.1-Flash publishes it: its
    tokenizer.json (pad id from engram_pad_token_id, compressed size checked against
    engram_compressed_vocab_size), one engram_vocab_size for every order, multipliers from
    default_rng(10007 * layer). Row ids: hasher.row_ids(tok.compress(ids)). A layer whose buckets
    need more rows than engram_num_embeddings is refused (the tables were made otherwise)."""
    d = Path(directory)
    cfg = json.loads((d / "config.json").read_text())
    cfg = cfg if "engram_layer_ids" in cfg else cfg.get("text_config") or {}
    if "engram_layer_ids" not in cfg:
        raise ValueError(f"{d / 'config.json'} has no engram_layer_ids: not a V4.1-style checkpoint")
    tok = CompressedTokenizer.from_checkpoint(d)
    max_n, vocab = int(cfg["engram_max_ngram_size"]), cfg["engram_vocab_size"]
    hasher = NgramHasher(engram_vocab_size=vocab if isinstance(vocab, list) else [int(vocab)] * (max_n - 1),
                         max_ngram_size=max_n, n_head_per_ngram=int(cfg["engram_n_heads"]),
                         layer_ids=[int(x) for x in cfg["engram_layer_ids"]], seed=0,
                         pad_id=tok.compressed_pad_id, compressed_vocab_size=tok.compressed_vocab_size)
    for layer, rows in zip(hasher.layer_ids, cfg["engram_num_embeddings"]):
        if hasher.table_rows(layer) > int(rows):
            raise ValueError(f"{d / 'config.json'}: layer {layer}'s buckets need {hasher.table_rows(layer)} rows, "
                             f"but engram_num_embeddings gives it {rows}")
    return tok, hasher


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(build(a.out, a.seed))


if __name__ == "__main__":
    main()
