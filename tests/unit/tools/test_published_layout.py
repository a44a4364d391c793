"""Checkpoint directories as DeepSeek-V4.1-Flash publishes them (index + config.json + shards):
geometry from the config, names from the shipped mapping, refusals naming tensor, file and both
numbers; no Ray (importer.check_source is everything an import checks before the cluster)."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from engram_mem.errors import InvalidArgument
from engram_mem.tools.importer import check_source
from engram_mem.tools.layout import EngramLayout, config_fields, read_config
from engram_mem.tools.synthetic import v41_config, write_v41

PUBLISHED = {"engram_layer_ids": [1, 14], "engram_num_embeddings": [384_006_168, 384_016_682],
             "engram_vocab_size": 16_000_000, "engram_n_heads": 8, "engram_max_ngram_size": 4, "engram_head_dim": 256}


def _primes_above(start: int, n: int) -> list[int]:
    """The n smallest primes > start, by trial division (independent of the code under test)."""
    out, c = [], start + 1
    while len(out) < n:
        if c > 1 and all(c % d for d in range(2, int(c ** 0.5) + 1)):
            out.append(c)
        c += 1
    return out


def test_published_config_gives_the_published_row_counts_and_bucket_layout(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["x"], "text_config": PUBLISHED}))
    layout = EngramLayout.from_config(read_config(str(tmp_path)))
    want = _primes_above(16_000_000 - 1, 48)       # every (layer, order, head) its own, never reused
    for t, primes in zip(layout.tables, (want[:24], want[24:])):
        assert t.sizes == tuple(primes) and t.bucket_rows == t.rows and t.to_dict()["rows_past_buckets"] == 0
        assert t.offsets == tuple(int(x) for x in np.concatenate([[0], np.cumsum(primes)[:-1]]))
        assert (t.orders, t.n_heads, t.head_dim, t.block) == ((2, 3, 4), 8, 256, 32)
    assert [t.rows for t in layout.tables] == [384_006_168, 384_016_682]
    # Export writes these fields back when it has no original config.json to copy.
    assert {k: v for k, v in config_fields([t.to_dict() for t in layout.tables]).items()
            if k in PUBLISHED} == PUBLISHED
    # A table may hold rows past its buckets, never fewer.
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED | {"engram_num_embeddings": [384_006_167, 384_016_682]}))
    with pytest.raises(InvalidArgument, match="need 384006168 rows.*gives it 384006167"):
        EngramLayout.from_config(read_config(str(tmp_path)))


def _rows(d, layer):
    """values [R, 256] and scale bytes [R, 8] of a layer, as uint8, straight from the files."""
    tensors = {}
    for f in os.listdir(d):
        if f.endswith(".safetensors"):
            tensors |= load_file(os.path.join(d, f))
    return (tensors[f"layers.{layer}.engram.embed.weight"].view(torch.uint8).numpy(),
            tensors[f"layers.{layer}.engram.embed.scale"].view(torch.uint8).numpy())


def test_a_checkpoint_directory_needs_no_mapping_and_gives_geometry_names_and_pieces(tmp_path):
    d = str(tmp_path / "ckpt")
    write_v41(d, 3000, extra_rows=5)
    cfg = json.loads(open(os.path.join(d, "config.json")).read())
    plans = check_source(None, [d])
    assert [p.name for p in plans] == ["engram.l1", "engram.l14"]
    for p, rows, layer in zip(plans, cfg["engram_num_embeddings"], cfg["engram_layer_ids"]):
        assert (p.spec.rows, p.spec.dim, p.spec.dtype, p.spec.block, p.spec.row_bytes) == (rows, 256, "fp8_e4m3", 32, 264)
        assert p.layout["layer"] == layer and p.layout["rows_past_buckets"] == 5
        assert len(p.layout["bucket_sizes"]) == 4 and sum(p.layout["bucket_sizes"]) == rows - 5
        assert [(t["name"], t["dtype"], t["shape"]) for t in p.tensors()] == [
            (f"layers.{layer}.engram.embed.weight", "F8_E4M3", [rows, 256]),
            (f"layers.{layer}.engram.embed.scale", "F8_E8M0", [rows, 8])]
        # The values and the scales come from different files, as the index says.
        assert len({os.path.basename(t["file"]) for t in p.tensors()}) == 2


def test_the_reference_loaders_names_and_u8_scales_are_accepted_too(tmp_path):
    d = str(tmp_path / "alias")
    write_v41(d, 2000)
    v, s = _rows(d, 1)
    v14, s14 = _rows(d, 14)
    for f in os.listdir(d):
        if f.endswith(".safetensors"):
            os.unlink(os.path.join(d, f))
    t = {"model.layers.1.engram.embed.weight": torch.from_numpy(v).view(torch.float8_e4m3fn),
         "model.layers.1.engram.embed.weight_scale_inv": torch.from_numpy(s),        # U8
         "model.layers.14.engram.embed.weight": torch.from_numpy(v14).view(torch.float8_e4m3fn),
         "model.layers.14.engram.embed.weight_scale_inv": torch.from_numpy(s14)}
    save_file(t, os.path.join(d, "model-00001-of-00001.safetensors"))
    (tmp_path / "alias" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "model-00001-of-00001.safetensors" for k in t}}))
    plans = check_source(None, [d])
    assert [pc.info.name for pc in plans[0].pieces] == ["model.layers.1.engram.embed.weight",
                                                        "model.layers.1.engram.embed.weight_scale_inv"]
    assert plans[1].spec.rows == v14.shape[0]


def _edit(d, fn):
    """Rewrite a directory's tensors through fn(tensors by name) -> tensors (same files, same index)."""
    index = json.loads(open(os.path.join(d, "model.safetensors.index.json")).read())["weight_map"]
    for f in sorted(set(index.values())):
        p = os.path.join(d, f)
        t = fn(load_file(p))
        save_file(t, p)


@pytest.mark.parametrize("case", ["missing tensor", "wrong row count", "wrong scale shape", "absent file",
                                  "tensor not in its file"])
def test_refusals_name_the_tensor_the_file_and_both_numbers(tmp_path, case):
    d = str(tmp_path / case.replace(" ", "-"))
    write_v41(d, 2000)
    cfg = json.loads(open(os.path.join(d, "config.json")).read())
    r1 = cfg["engram_num_embeddings"][0]
    index_path = os.path.join(d, "model.safetensors.index.json")
    index = json.loads(open(index_path).read())
    if case == "missing tensor":
        name = "layers.14.engram.embed.scale"
        del index["weight_map"][name]
        open(index_path, "w").write(json.dumps(index))
        _edit(d, lambda t: {k: v for k, v in t.items() if k != name})
        match = f"tensor '{name}' is in none of the files"
    elif case == "wrong row count":
        cfg["engram_num_embeddings"][0] = r1 + 7
        open(os.path.join(d, "config.json"), "w").write(json.dumps(cfg))
        match = (f"tensor 'layers.1.engram.embed.weight' in .*{index['weight_map']['layers.1.engram.embed.weight']} "
                 f"has {r1:,} rows; .*config.json gives layer 1 {r1 + 7:,}")
    elif case == "wrong scale shape":
        _edit(d, lambda t: {k: (v[:-1].clone() if k == "layers.1.engram.embed.scale" else v) for k, v in t.items()})
        match = (f"scales 'layers.1.engram.embed.scale' in .*{index['weight_map']['layers.1.engram.embed.scale']} "
                 rf"have shape \({r1 - 1}, 8\); .* need \({r1}, 8\)")
    elif case == "absent file":
        f = index["weight_map"]["layers.14.engram.embed.weight"]
        os.unlink(os.path.join(d, f))
        held = "|".join(k for k, v in index["weight_map"].items() if v == f)   # any tensor the index puts there
        match = f"tensor '({held})' is in {f}, which is not in"
    else:
        index["weight_map"]["layers.1.engram.embed.weight"] = index["weight_map"]["layers.14.engram.embed.scale"]
        open(index_path, "w").write(json.dumps(index))
        match = "tensor 'layers.1.engram.embed.weight' is listed in .*, but .* holds no such tensor"
    with pytest.raises(InvalidArgument, match=match):
        check_source(None, [d])


def test_without_a_mapping_only_a_checkpoint_directory_is_accepted(tmp_path):
    d = str(tmp_path / "ckpt")
    paths = write_v41(d, 2000)
    with pytest.raises(InvalidArgument, match="without --mapping"):
        check_source(None, paths)                        # files, not the directory
    assert [p.name for p in check_source("v41-flash", paths)] == ["engram.l1", "engram.l14"]   # named: fine
    cfg = v41_config(2000)
    assert cfg["engram_num_embeddings"] == json.loads(open(os.path.join(d, "config.json")).read())["engram_num_embeddings"]
