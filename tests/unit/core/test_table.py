import numpy as np
import pytest
import torch

from engram_mem.errors import InvalidArgument
from engram_mem.table import TableSpec, from_float32, to_float32


def test_initial_rows_depend_only_on_seed_and_row():
    spec = TableSpec("t", rows=5000, dim=24, seed=11)
    full = spec.init_range(0, 5000)
    # Any range, any order, any thread count: the same values.
    assert np.array_equal(spec.init_range(1234, 4321), full[1234:4321])
    ids = np.array([4999, 0, 17, 17, 2500])
    assert np.array_equal(spec.init_rows(ids), full[ids])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert np.array_equal(spec.init_range(0, 700), full[:700])
    finally:
        torch.set_num_threads(threads)
    # Slot geometry does not enter: a table cut into other slots starts the same.
    assert np.array_equal(TableSpec("t", rows=5000, dim=24, seed=11, num_slots=7).init_range(0, 5000), full)
    assert not np.array_equal(TableSpec("t", rows=5000, dim=24, seed=12).init_range(0, 10), full[:10])
    assert abs(full.std() - 1.0) < 0.02 and abs(full.mean()) < 0.02


def test_init_std_and_half_precision():
    spec = TableSpec("t", rows=100, dim=8, seed=1, init_std=0.5)
    ref = TableSpec("t", rows=100, dim=8, seed=1).init_range(0, 100)
    assert np.allclose(spec.init_range(0, 100), 0.5 * ref)
    for dtype in ("bfloat16", "float16"):
        h = TableSpec("t", rows=100, dim=8, seed=1, dtype=dtype).init_range(0, 100)
        assert np.allclose(to_float32(h, dtype), ref, atol=2e-2)
        assert np.array_equal(from_float32(to_float32(h, dtype), dtype), h)


def test_slots_cover_rows_exactly():
    spec = TableSpec("t", rows=10_007, dim=4, num_slots=64)
    ranges = [spec.slot_range(s) for s in range(spec.n_slots)]
    assert ranges[0][0] == 0 and ranges[-1][1] == spec.rows
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    ids = np.arange(spec.rows)
    assert np.array_equal(spec.slot_of(ids), np.repeat(np.arange(spec.n_slots), [b - a for a, b in ranges]))
    assert TableSpec("small", rows=10, dim=4).n_slots == 10


def test_hundred_billion_parameter_table_is_described_without_allocating():
    from engram_mem.control.placement import initial_placement, targets

    spec = TableSpec("engram.l2", rows=100_000_000_000 // 1280, dim=1280, dtype="bfloat16")
    assert spec.params >= 99_999_000_000
    assert spec.nbytes == spec.params * 2
    p = initial_placement(spec.n_slots, 64)
    per_shard = np.bincount(p) * spec.slot_rows * spec.row_bytes
    assert per_shard.sum() >= spec.nbytes and per_shard.max() <= 1.02 * spec.nbytes / 64
    assert targets(spec.n_slots, 64).sum() == spec.n_slots


@pytest.mark.parametrize("kw, word", [
    (dict(name="bad name!", rows=1, dim=1), "name"), (dict(name="t", rows=0, dim=1), "rows"),
    (dict(name="t", rows=1, dim=0), "dim"), (dict(name="t", rows=1, dim=1, dtype="int8"), "dtype"),
    (dict(name="t", rows=1, dim=1, seed=-1), "seed"),
])
def test_bad_specs_name_the_field(kw, word):
    with pytest.raises(InvalidArgument, match=word):
        TableSpec(**kw)
