"""The planner's disk tier: the calibration's cold-disk measurement on a tiny real file, and plans with it.

    pytest tests/unit/plan/test_plan_disk.py -q
"""

import json

import numpy as np
import pytest

from engram_mem.tools.cli import main
from engram_mem.plan.calibrate import _isolated_page_ids, measure_disk
from engram_mem.plan.tiers import TIER_PRESETS, save_tiers
from engram_mem.storage.store import ShardStore
from engram_mem.storage.disk import PAGE, _pages
from engram_mem.table import TableSpec


def plan_here(capsys, *args):
    rc = main(["plan", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_disk_batches_put_each_row_alone_on_a_page_and_no_pages_adjacent(tmp_path):
    # 7 slots over 30,000 rows: frames are filled in reverse and the last slot is short, so the
    # ids must be mapped back from file pages through the frame layout, and stay inside the table.
    spec = TableSpec("t", 30_000, 64, seed=3, num_slots=7)
    store = ShardStore(0, storage=f"disk:{tmp_path}")
    try:
        store.add_table(spec, range(spec.n_slots))
        ts = store.tables["t"]
        ids = _isolated_page_ids(ts, 500, np.random.default_rng(0))
        assert ids.size == 500 and np.unique(ids).size == 500 and ids.min() >= 0 and ids.max() < spec.rows
        local = ts.frame_of[ids // spec.slot_rows].astype(np.int64) * spec.slot_rows + ids % spec.slot_rows
        first, last = np.split(_pages(ts.buffer, local), 2)
        assert np.array_equal(first, last)                      # each row within one page
        pages = np.sort(first)
        assert np.unique(pages).size == 500 and np.diff(pages).min() >= 2   # one row a page, none adjacent
        np.testing.assert_array_equal(store.gather("t", ids), spec.init_rows(ids))
        with pytest.raises(ValueError, match="isolated pages"):
            _isolated_page_ids(ts, 10_000, np.random.default_rng(0))   # more than half the file's pages
    finally:
        store.close()


def test_disk_calibration_fits_a_page_tier_from_cold_reads_of_a_tiny_table(tmp_path, capsys):
    work = tmp_path / "disk"
    work.mkdir()
    tier, raw = measure_disk(str(work), reps=2, rows=1 << 15, sizes=(16, 64, 256))   # an 8 MiB file
    assert list(work.iterdir()) == []                           # the table file and its directory are gone
    assert tier.name == "here-disk" and tier.kind == "disk" and tier.measured
    assert tier.source.startswith("measured here:") and "cold" in tier.source
    assert tier.min_read_bytes == PAGE == 4096
    assert np.isfinite(tier.latency_s) and tier.latency_s >= 0 and 0 < tier.link_gbps < 1e3
    assert tier.cpu_s_per_row >= 0 and tier.capacity_bytes > 0
    # The fit is over whole pages: a 264 B row costs what a 4 KiB one does, as the planner charges it.
    assert tier.fetch_s(100, 264) == pytest.approx(tier.latency_s + 100 * 4096 / (tier.link_gbps * 1e9))
    assert tier.fetch_s(100, 264) == tier.fetch_s(100, 4096)
    assert [p["rows"] for p in raw["points"]] == [16, 64, 256]
    assert all(p["bytes"] == p["pages"] * PAGE == p["rows"] * PAGE and p["wall_s"] > 0 for p in raw["points"])
    # The gather read its pages through the page cache, and the drop before each call emptied it.
    assert raw["resident_bytes_after_gather"] >= 256 * PAGE
    assert raw["resident_bytes_after_drop"] <= raw["table_bytes"] // 20

    # What --calibrate saves, `engram-mem plan --tiers-file ... --tier here-disk` plans with.
    path = str(tmp_path / "tiers.json")
    save_tiers(path, [tier], {"devices": []})
    capsys.readouterr()
    rc, out, err = plan_here(capsys, "--tiers-file", path, "--tier", "here-disk", "--model", "v4.1-flash",
                             "--mode", "decode", "--batch", "8", "--context", "1024", "--workers", "4", "--json")
    assert rc == 0, err
    p = json.loads(out)
    assert p["rows_tier"]["source"] == tier.source and p["sizing"]["pooled"]
    # Every distinct row the cache misses is read as a page: per-worker bytes = rows x 4096.
    assert p["timeline"]["fetch_s"] == pytest.approx(tier.fetch_s(p["batch"]["missing"], p["model"]["row_bytes"]))


def test_plan_with_the_built_in_disk_tier_prints_a_plan(capsys):
    t = TIER_PRESETS["here-disk"]
    assert t.kind == "disk" and t.measured and t.min_read_bytes == 4096 and t.source.startswith("measured here:")
    rc, out, err = plan_here(capsys, "--model", "v4.1-flash", "--mode", "decode", "--batch", "32", "--context", "2048",
                             "--workers", "16", "--tier", "here-disk", "--cache-rows", "16384")
    assert rc == 0, err
    for words in ("here-disk", "whole 4096 B pages per row read", "memory nodes", "prefetch window",
                  "predicted throughput penalty", "saturates first"):
        assert words in out, words
