"""The V4.1-shaped tiny model writes DeepSeek-V4.1-Flash's published layout, and row ids computed
from that layout's files alone (published_hasher) are the ones the model reads."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from engram_mem.tools.importer import check_source
from engram_model.checkpoint import load_model
from engram_model.v41 import INDEX_FILE, build, published_hasher


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build(tmp_path_factory.mktemp("v41") / "ckpt")


def test_tiny_model_files_are_in_the_published_layout(tiny):
    cfg = json.loads((tiny / "config.json").read_text())
    model, tok = load_model(tiny)
    specs = model.rows.specs
    assert cfg["engram_layer_ids"] == list(specs) == [1, 14]
    assert cfg["engram_num_embeddings"] == [s.rows for s in specs.values()]
    assert (cfg["engram_head_dim"], cfg["quantization_config"]["weight_block_size"]) == (256, [32, 32])
    assert cfg["engram_compressed_vocab_size"] == tok.compressed_vocab_size
    weight_map = json.loads((tiny / INDEX_FILE).read_text())["weight_map"]
    for layer, spec in specs.items():
        f = weight_map[f"layers.{layer}.engram.embed.weight"]
        assert weight_map[f"layers.{layer}.engram.embed.scale"] == f
        with safe_open(str(tiny / f), "pt") as st:
            v, s = st.get_tensor(f"layers.{layer}.engram.embed.weight"), st.get_tensor(f"layers.{layer}.engram.embed.scale")
        assert (v.dtype, tuple(v.shape), s.dtype, tuple(s.shape)) == (torch.float8_e4m3fn, (spec.rows, 256),
                                                                      torch.float8_e8m0fnu, (spec.rows, 8))
        w = model.rows.weights[layer]                                   # uint8 [R, 264]: what LocalRows serves
        assert torch.equal(torch.cat([v.view(torch.uint8), s.view(torch.uint8)], 1), w)
    # The importer reads it as it reads the real checkpoint: no mapping, geometry from config.json.
    plans = check_source(None, [str(tiny)])
    assert [(p.name, p.spec.rows) for p in plans] == [(f"engram.l{k}", s.rows) for k, s in specs.items()]
    assert all(p.layout["rows_past_buckets"] == 0 for p in plans)


def test_row_ids_from_the_published_files_equal_the_models(tiny):
    model, tok = load_model(tiny)
    ptok, hasher = published_hasher(tiny)
    assert (ptok.compressed_vocab_size, ptok.compressed_pad_id) == (tok.compressed_vocab_size, tok.compressed_pad_id)
    ids = np.array([tok.encode("def __init__(self, x):\n    return x  # the end")])
    got = hasher.row_ids(ptok.compress(ids))
    want = model.hasher.row_ids(tok.compress(ids))
    for layer, spec in model.rows.specs.items():
        assert np.array_equal(got[layer], want[layer])
        assert got[layer].max() < spec.rows and got[layer].shape == ids.shape + (hasher.heads_per_layer,)
    # A config whose tables are smaller than their buckets is refused: the rows were hashed otherwise.
    cfg = json.loads((tiny / "config.json").read_text())
    bad = tiny.parent / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text((tiny / "tokenizer.json").read_text())
    (bad / "config.json").write_text(json.dumps(cfg | {"engram_num_embeddings": [10, 10]}))
    with pytest.raises(ValueError, match="buckets need .* rows, but engram_num_embeddings gives it 10"):
        published_hasher(bad)
