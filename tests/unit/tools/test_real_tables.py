"""FP8 E4M3 + ue8m0 block-scale rows (quant.py), byte-row tables (table.py), mapping files
(mapping.py) and the disk page budget (storage.py): no Ray, no gRPC."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engram_mem.errors import InvalidArgument, ReadOnlyTable
from engram_mem.tools.mapping import index_files, load_mapping, resolve
from engram_mem.quant import E4M3_MAX, dequantize, dequantize_reference, quantize
from engram_mem.storage.store import ShardStore
from engram_mem.storage.disk import resident_bytes
from engram_mem.table import TableSpec


def test_quantize_round_trip_is_within_e4m3_precision_and_dequantize_is_exact():
    x = np.random.default_rng(0).standard_normal((300, 256)).astype(np.float32) * np.float32(50)
    x[0] = 0
    x[1, :32] = 1e-30        # a tiny block: its scale exponent clamps, values flush toward zero
    q = quantize(x, 32)
    assert q.shape == (300, 264) and q.dtype == np.uint8
    d = dequantize(q, 256, 32).numpy()
    assert np.array_equal(d, dequantize_reference(q[:, :256], q[:, 256:], 32))   # exact vs float64 reference
    assert np.all(d[0] == 0)
    blocks = np.abs(x[2:]).reshape(298, 8, 32).max(-1, keepdims=True)
    err = np.abs(d[2:] - x[2:]).reshape(298, 8, 32)
    assert np.all(err <= blocks / 8)          # 3 mantissa bits: at most half an ulp of the block's top value
    # Scales are powers of two keeping each block within E4M3's range, and not wastefully small.
    s = 2.0 ** (q[2:, 256:].astype(np.int64) - 127)
    assert np.all(blocks[..., 0] / s <= E4M3_MAX) and np.all(blocks[..., 0] / s > E4M3_MAX / 2)


def test_cpu_lookup_dequantize_matches_torch_float8_for_every_byte_pair():
    v, sc = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8), indexing="ij")
    rows = np.zeros((65536, 33), np.uint8)           # dim 32, block 32: value byte 0 and the scale byte vary
    rows[:, 0], rows[:, 32] = v.ravel(), sc.ravel()
    got = dequantize(rows, 32, 32).numpy()
    t = torch.from_numpy(rows)
    want = (t[:, :32].contiguous().view(torch.float8_e4m3fn).float()
            * t[:, 32:].contiguous().view(torch.float8_e8m0fnu).float()).numpy()
    assert np.array_equal(got, want, equal_nan=True)


def test_fp8_and_byte_table_specs():
    s = TableSpec("t", 10_000, 256, dtype="fp8_e4m3", block=32)
    assert (s.storage_dim, s.row_bytes, s.storage_dtype, s.is_bytes) == (264, 264, np.uint8, True)
    rows = s.init_rows(np.array([7, 9999, 7]))
    assert rows.shape == (3, 264) and np.array_equal(rows[0], s.init_range(7, 8)[0])
    f32 = TableSpec("t", 10_000, 256, seed=0).init_range(7, 8)
    assert np.abs(dequantize(rows[:1], 256, 32).numpy() - f32).max() <= np.abs(f32).max() / 8
    b = TableSpec("b", 100, 40, dtype="bytes")
    assert (b.row_bytes, b.init_range(0, 3).sum()) == (40, 0)
    for bad in (dict(dtype="fp8_e4m3", block=0), dict(dtype="fp8_e4m3", block=20), dict(dtype="float32", block=32),
                dict(storage="disk:relative")):
        with pytest.raises(InvalidArgument):
            TableSpec("t", 10, 48, **bad)


def test_shard_serves_imported_byte_rows_and_refuses_pushes():
    store = ShardStore()
    spec = TableSpec("t", 1000, 64, dtype="fp8_e4m3", block=32, num_slots=8)
    store.add_table(spec, range(spec.n_slots))
    q = quantize(np.random.default_rng(1).standard_normal((1000, 64)).astype(np.float32), 32)
    store.import_rows("t", 0, q[:600])
    store.write("t", np.arange(600, 1000), q[600:])
    assert np.array_equal(store.gather("t", np.array([999, 0, 5])), q[[999, 0, 5]])
    with pytest.raises(ReadOnlyTable):
        store.push("t", np.array([1]), np.zeros((1, 64), np.float32))
    with pytest.raises(InvalidArgument, match="stored rows"):
        store.write("t", np.array([1]), np.zeros((1, 64), np.float32))   # float rows: quantize them first
    with pytest.raises(InvalidArgument):
        store.import_rows("t", 0, q[:5, :64])
    store.close()


def test_mapping_resolves_heads_and_checks_shapes(tmp_path):
    v = torch.zeros(10, 64, dtype=torch.float8_e4m3fn)
    save_file({"h0.v": v, "h1.v": v[:6].clone(), "h0.s": torch.zeros(10, 2, dtype=torch.uint8),
               "h1.s": torch.full((6, 2), 2.0 ** -3).float()}, str(tmp_path / "a.safetensors"))
    m = {"format": "engram-mem/mapping/1", "tables": [
        {"table": "t", "dtype": "fp8_e4m3", "block": 32, "heads": 2, "values": "h{head}.v", "scales": "h{head}.s"}]}
    (tmp_path / "m.json").write_text(json.dumps(m))
    (entry,) = load_mapping(str(tmp_path / "m.json"))
    rows, dim, pieces = resolve(entry, index_files([str(tmp_path)]))
    assert (rows, dim) == (16, 64)
    assert [(p.info.name, p.row0, p.col0, p.width, p.kind) for p in pieces] == [
        ("h0.v", 0, 0, 64, "raw"), ("h0.s", 0, 64, 2, "raw"), ("h1.v", 10, 0, 64, "raw"), ("h1.s", 10, 64, 2, "f32_scale")]
    m["tables"][0]["concat"] = "dim"
    (tmp_path / "m.json").write_text(json.dumps(m))
    with pytest.raises(InvalidArgument, match="same rows"):
        resolve(load_mapping(str(tmp_path / "m.json"))[0], index_files([str(tmp_path)]))
    for shipped in ("v41-flash", "deepseek-engram-demo"):
        assert [t.table for t in load_mapping(shipped)] == (["engram.l1", "engram.l14"] if shipped == "v41-flash"
                                                             else ["engram.l1", "engram.l15"])
    (tmp_path / "trunc.safetensors").write_bytes((tmp_path / "a.safetensors").read_bytes()[:-10])
    with pytest.raises(InvalidArgument, match="truncated"):
        index_files([str(tmp_path / "trunc.safetensors")])


def test_disk_backed_shard_keeps_its_resident_pages_within_the_budget(tmp_path):
    budget = 1 << 20
    store = ShardStore(0, shm_dir=str(tmp_path / "shm"), storage=f"disk:{tmp_path}/disk", memory_budget=budget)
    spec = TableSpec("t", 40_000, 256, dtype="bytes", num_slots=16)     # 10 MB of rows
    store.add_table(spec, range(spec.n_slots))
    path = store.tables["t"].buffer.path
    assert path.startswith(str(tmp_path / "disk")) and os.path.getsize(path) == spec.nbytes
    data = np.random.default_rng(2).integers(0, 256, (spec.rows, 256), dtype=np.uint8)
    for a in range(0, spec.rows, 4000):
        store.import_rows("t", a, data[a:a + 4000])
    ids = (np.random.default_rng(3).zipf(1.2, 50_000) * 7919) % spec.rows
    for i in range(0, ids.size, 1000):
        assert np.array_equal(store.gather("t", ids[i:i + 1000]), data[ids[i:i + 1000]])
        assert resident_bytes(path) <= budget + 1000 * 4096
    assert store.budgets["t"].trims > 0
    store.close()
    assert not os.path.exists(path)
