"""The planner's tier model and prefetch-window arithmetic, checked on round numbers by hand.

    pytest tests/unit/plan/test_plan_model.py -q
"""

import dataclasses
import json

import pytest

from engram_mem.plan.planner import Hardware, memory_nodes, plan, timeline
from engram_mem.plan.presets import DEVICE_PRESETS, MODEL_PRESETS, ROW_FORMATS, Device, ModelShape, shape_from_config
from engram_mem.plan.tiers import TIER_PRESETS, PlanInputError, Tier, load_tiers, save_tiers
from engram_mem.plan.workload import Workload

GB = 1e9


def tier(**kw):
    base = dict(name="t", kind="remote", latency_s=1e-3, link_gbps=1.0, aggregate_gbps=4.0, capacity_bytes=100 * GB)
    return Tier(**{**base, **kw})


def test_fetch_time_is_latency_plus_bytes_at_the_readers_share():
    t = tier(readers=8)
    # 8 readers share 4 GB/s: each gets 0.5 GB/s (below its 1 GB/s link)
    assert t.per_reader_gbps() == pytest.approx(0.5)
    assert t.per_reader_gbps(2) == pytest.approx(1.0)          # link-bound with 2 readers
    assert t.fetch_s(1000, 500) == pytest.approx(1e-3 + 500_000 / 0.5e9)
    assert t.fetch_s(0, 500) == 0.0
    # page-granular devices read whole pages
    d = tier(min_read_bytes=4096)
    assert d.read_bytes(10, 264) == 40960 and d.read_bytes(10, 8192) == 81920


def test_bad_tiers_raise_typed_errors_naming_the_field(tmp_path):
    with pytest.raises(PlanInputError, match="latency_s"):
        tier(latency_s=-1)
    with pytest.raises(PlanInputError, match="readers"):
        tier(readers=0)
    with pytest.raises(PlanInputError, match="unknown fields"):
        Tier.from_dict({"name": "x", "bogus": 1})
    with pytest.raises(PlanInputError, match="does not exist"):
        load_tiers(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanInputError, match="not valid JSON"):
        load_tiers(str(tmp_path / "bad.json"))


def test_tiers_round_trip_through_a_file(tmp_path):
    ts = [tier(name="a"), tier(name="b", measured=True, source="here")]
    save_tiers(str(tmp_path / "t.json"), ts, {"machine": {"cpus": 2}})
    back = load_tiers(str(tmp_path / "t.json"))
    assert back == {"a": ts[0], "b": ts[1]}
    assert json.loads((tmp_path / "t.json").read_text())["machine"] == {"cpus": 2}


def test_presets_carry_sources_and_measured_ones_say_so():
    for t in TIER_PRESETS.values():
        assert t.source, t.name
        assert t.measured == t.name.startswith("here-"), t.name
    for d in DEVICE_PRESETS.values():
        assert d.source
    v4 = MODEL_PRESETS["v4.1-flash"]
    assert ROW_FORMATS["fp8"](256) == 264 == v4.row_bytes
    assert v4.table_bytes / 2**30 == pytest.approx(189, rel=0.01)     # ~189 GiB, as published
    assert v4.rows_per_token == 24 and len(v4.engram_layers) == 2


def toy(engram_layers=(1, 3)):
    """Blocks of exactly 1 ms (fixed cost only), rows of 1,000 B, 10 rows per token."""
    m = ModelShape(name="toy", hidden=8, layers=4, engram_layers=engram_layers, rows_per_token=10, row_bytes=1000,
                   table_rows=10**12, block_dense_params=1.0)
    dev = Device(name="d", peak_flops=1e30, mfu=1.0, mem_gbps=1e9, block_fixed_s=1e-3)
    return m, dev


def test_prefetch_window_exposed_wait_arithmetic():
    m, dev = toy()
    # uniform ids over 10^12 rows: every lookup is distinct. 100 tokens -> 1,000 rows = 1 MB per layer;
    # at 1 GB/s that is 1 ms, plus 0.5 ms latency: 1.5 ms for one layer's fetch.
    wl = Workload(mode="prefill", batch=1, seq_len=100, zipf_s=0.0)
    hw = Hardware(device=dev, rows_tier=tier(latency_s=0.5e-3, link_gbps=1.0, aggregate_gbps=1.0), cache_tier=None)
    tl = timeline(m, wl, hw)
    assert tl["rows"]["distinct"] == pytest.approx(1000, rel=1e-6)
    assert tl["compute_s"] == pytest.approx(4e-3) and tl["fetch_s"] == pytest.approx(1.5e-3)
    l1, l3 = tl["layers"]
    # both fetches start with the forward and share the link: ready at 1.5 ms and 2.5 ms;
    # layer 1 is needed after block 0 (1 ms): 0.5 ms exposed; layer 3 after blocks 0-2 + that wait (3.5 ms): none.
    assert (l1["window_s"], l3["window_s"]) == pytest.approx((1e-3, 3e-3))
    assert (l1["ready_s"], l3["ready_s"]) == pytest.approx((1.5e-3, 2.5e-3))
    assert (l1["exposed_s"], l3["exposed_s"]) == pytest.approx((0.5e-3, 0.0))
    assert tl["step_s"] == pytest.approx(4.5e-3)
    # prefetch off: each layer's fetch is exposed in full
    off = timeline(m, wl.replace(prefetch=False), hw)
    assert off["exposed_s"] == pytest.approx(3e-3) and off["step_s"] == pytest.approx(7e-3)
    # a later Engram layer hides more: at layer 3 alone, a 1.5 ms fetch fits in its 3 ms window
    m3, _ = toy(engram_layers=(3,))
    assert timeline(m3, wl, hw)["exposed_s"] == 0.0


def test_fetching_a_batch_ahead_widens_every_window_by_a_step_and_the_link_sets_a_floor():
    m, dev = toy()
    wl = Workload(mode="prefill", batch=1, seq_len=100, zipf_s=0.0, ahead=1)
    hw = Hardware(device=dev, rows_tier=tier(latency_s=0.5e-3, link_gbps=1.0, aggregate_gbps=1.0), cache_tier=None)
    # the fetches went out one 4 ms forward before: ready at 1.5 - 4 and 2.5 - 4 ms, nothing exposed
    tl = timeline(m, wl, hw)
    assert tl["ahead_s"] == pytest.approx(4e-3) and tl["exposed_s"] == 0.0 and tl["step_s"] == pytest.approx(4e-3)
    assert [l["ready_s"] for l in tl["layers"]] == pytest.approx([-2.5e-3, -1.5e-3])
    assert plan(m, wl, hw)["timeline"]["ahead_s"] == pytest.approx(4e-3)
    # a link 10x slower: 0.5 + 2 x 10 ms of fetches a batch; layer 1 ready at 10.5 - 4 ms (5.5 ms exposed),
    # layer 3 at 20.5 - 4 against 3 + 5.5 ms (8 ms); the link's backlog makes the step its 20.5 ms
    slow = dataclasses.replace(hw, rows_tier=tier(latency_s=0.5e-3, link_gbps=0.1, aggregate_gbps=1.0))
    tl = timeline(m, wl, slow)
    assert [l["exposed_s"] for l in tl["layers"]] == pytest.approx([5.5e-3, 8e-3])
    assert tl["backlog_s"] == pytest.approx(3e-3) and tl["step_s"] == pytest.approx(20.5e-3)
    # ahead 0 is the forward's own prefetch; prefetch off ignores ahead
    assert timeline(m, wl.replace(ahead=0), hw)["exposed_s"] == pytest.approx(0.5e-3)
    assert timeline(m, wl.replace(prefetch=False), hw)["exposed_s"] == pytest.approx(3e-3)
    for mode, why in (("decode", "its token"), ("train", "pushed")):
        with pytest.raises(PlanInputError, match=f"ahead applies to prefill only.*{why}"):
            Workload(mode=mode, ahead=1)
    with pytest.raises(PlanInputError, match="ahead"):
        Workload(ahead=-1)


def test_penalty_cpu_share_push_and_bandwidth_saturation():
    m, dev = toy()
    wl = Workload(mode="prefill", batch=1, seq_len=100, zipf_s=0.0, workers=4)
    slow = tier(latency_s=0.5e-3, link_gbps=1.0, aggregate_gbps=1.0, cpu_s_per_row=1e-6, capacity_bytes=1e16)
    base = tier(name="local", kind="host_dram", latency_s=0.0, link_gbps=1e6, aggregate_gbps=1e6)
    hw = Hardware(device=dev, rows_tier=slow, cache_tier=None, baseline_tier=base, shards_per_node=2)
    p = plan(m, wl, hw)
    assert p["penalty_pct"] == pytest.approx(100 * (1 - 4e-3 / 4.5e-3), rel=1e-4)   # baseline: 4 ms + ~2 ns
    assert p["exposed_wait_pct"] == pytest.approx(100 * 0.5 / 4.5)
    # on a CPU-computing worker the read path's CPU adds: 2 layers x 1,000 rows x 1 us = 2 ms
    cpu = timeline(m, wl, dataclasses.replace(hw, shares_cpu=True))
    assert cpu["cpu_s"] == pytest.approx(2e-3) and cpu["step_s"] == pytest.approx(6.5e-3)
    # four workers each read 2 MB per 4.5 ms step = 0.444 GB/s: 1.78 GB/s against one node's 1 GB/s
    bw = p["bandwidth"]
    assert bw["total_gbps"] == pytest.approx(4 * 2e6 / 4.5e-3 / GB)
    assert bw["saturates_first"] in ("t aggregate", "hot node")
    assert bw["throughput_factor"] == pytest.approx(1 / bw["utilization"][bw["saturates_first"]])
    # training: the push of 1,000 distinct rows' fp32 gradients (2 x 1000 B each here) delays the next fetch
    tr = timeline(m, wl.replace(mode="train"), hw)
    assert tr["push_s"] == pytest.approx(0.5e-3 + 2e6 / 1e9 + 1000 * hw.shard_update_s_per_row)
    assert tr["compute_s"] == pytest.approx(12e-3)


def test_memory_nodes_and_replicas():
    m = MODEL_PRESETS["v4.1-flash"]
    t = dataclasses.replace(TIER_PRESETS["rdma-400g"], capacity_bytes=100 * 2**30)
    hw = Hardware(device=DEVICE_PRESETS["h800"], rows_tier=t, shards_per_node=4)
    one = memory_nodes(m, Workload(replicas=1), hw)
    two = memory_nodes(m, Workload(replicas=2), hw)
    assert one["nodes"] == 3 and two["nodes"] == 5          # 189 GiB, 85 GiB usable per node
    assert two["shards"] == 20 and two["stored_bytes"] == pytest.approx(2 * m.table_bytes)
    assert all(s["bytes_per_node"] <= s["usable_bytes_per_node"] for s in (one, two))


def test_shape_from_this_repos_config_matches_its_tables():
    from engram_model.config import load_config
    from engram_model.rows import table_specs
    from engram_model.tokenizer import CompressedTokenizer  # noqa: F401

    m, _ = load_config("tiny")
    s = shape_from_config(m.to_dict())
    assert s.rows_per_token == 4 and s.row_bytes == 32 and s.engram_layers == (1, 2) and s.row_dim == 8
    cfg = m
    specs = table_specs(cfg)
    assert {sp.dim * 4 for sp in specs.values()} == {s.row_bytes}


def test_bad_workloads_and_models_name_the_field():
    with pytest.raises(PlanInputError, match="workload.mode"):
        Workload(mode="serve")
    with pytest.raises(PlanInputError, match="engram_layers"):
        ModelShape(name="x", hidden=8, layers=2, engram_layers=(3,), rows_per_token=1, row_bytes=8, table_rows=10,
                   block_dense_params=1)
    with pytest.raises(PlanInputError, match="unknown fields"):
        ModelShape.from_dict({"name": "x", "colour": 1})


def test_a_prefetch_beside_cpu_compute_progresses_stretch_times_slower():
    m, dev = toy(engram_layers=(1,))
    wl = Workload(mode="prefill", batch=1, seq_len=100, zipf_s=0.0)
    t = tier(latency_s=0.5e-3, link_gbps=1.0, aggregate_gbps=1.0, stretch=2.0)
    # 1.5 ms of fetch work; during block 0 (1 ms) it does 0.5 ms of it, the last 1 ms is exposed
    on_cpu = timeline(m, wl, Hardware(device=dev, rows_tier=t, shares_cpu=True))
    assert on_cpu["layers"][0]["ready_s"] == pytest.approx(2e-3) and on_cpu["exposed_s"] == pytest.approx(1e-3)
    # on a GPU worker the stretch does not apply: 0.5 ms exposed
    assert timeline(m, wl, Hardware(device=dev, rows_tier=t))["exposed_s"] == pytest.approx(0.5e-3)
    with pytest.raises(PlanInputError, match="stretch"):
        tier(stretch=0.5)


def test_calibration_fits_recover_known_parameters():
    from engram_mem.plan.calibrate import _median_tier, fit_latency_bandwidth
    from engram_mem.plan.compute_probe import _fit_device

    nbytes = [1e4, 1e5, 1e6, 1e7]
    lat, bw = fit_latency_bandwidth(nbytes, [2e-3 + b / 0.5e9 for b in nbytes])      # 2 ms + 0.5 GB/s
    assert lat == pytest.approx(2e-3, rel=1e-6) and bw == pytest.approx(0.5, rel=1e-6)
    # wall = layers * fixed + (layers * block_flops + head_flops) / F, with F = 40 GFLOP/s and 3 ms fixed
    pts = [((bf, hf), 4 * 3e-3 + (4 * bf + hf) / 40e9, "shape") for bf, hf in ((1e8, 5e7), (1e9, 4e8), (1e7, 1e6))]
    dev = _fit_device("d", pts, 4, "test")
    assert dev.peak_flops == pytest.approx(40e9, rel=1e-6) and dev.block_fixed_s == pytest.approx(3e-3, rel=1e-6)
    runs = [tier(latency_s=x, stretch=s) for x, s in ((1e-3, 2.0), (5e-3, 9.0), (2e-3, 3.0))]
    med = _median_tier(runs)
    assert med.latency_s == pytest.approx(2e-3) and med.stretch == pytest.approx(3.0) and "median of 3" in med.source
