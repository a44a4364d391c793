"""Metrics and credentials on a real local Ray cluster: scrape live shards, check counters follow traffic,
`engram-mem status` shows the same numbers, and clients get (or are given) the right credential.

    pytest -q tests/integration/test_metrics.py
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import engram_mem
from engram_mem.errors import PermissionDenied, Unauthenticated
from engram_mem.shard.metrics import scrape, summarize


@pytest.fixture(scope="module")
def mem(ray_local):
    with engram_mem.connect(shards=2, name="test-metrics") as client:
        client.create_table("m", rows=20_000, dim=16, num_slots=64, optimizer="adagrad")
        yield client


def _scrape_all(mem, ray):
    endpoints = ray.get(mem.controller.metrics_endpoints.remote())
    assert len(endpoints) == 2 and all(endpoints.values())
    return {sid: summarize(scrape(addr)) for sid, addr in endpoints.items()}


def test_counters_move_with_traffic(mem, ray_local):
    before = _scrape_all(mem, ray_local)
    ids = np.arange(0, 20_000, 7)
    rows = mem.gather("m", ids)
    mem.push("m", ids[:100], np.ones((100, 16), np.float32), lr=0.1)
    with pytest.raises(Exception):
        mem.gather("m", [20_000])  # out of range: refused by the client before any RPC
    after = _scrape_all(mem, ray_local)
    gathered = sum(a["rows"].get("gathered", 0) - before[s]["rows"].get("gathered", 0) for s, a in after.items())
    sent = sum(a["bytes"].get("gathered", 0) - before[s]["bytes"].get("gathered", 0) for s, a in after.items())
    pushed = sum(a["rows"].get("pushed", 0) - before[s]["rows"].get("pushed", 0) for s, a in after.items())
    assert gathered == ids.size and sent == rows.nbytes and pushed == 100
    for sid, a in after.items():
        b = before[sid]
        assert a["requests"].get("Gather", 0) > b["requests"].get("Gather", 0)
        assert a["latency"]["Gather"]["count"] > b["latency"].get("Gather", {}).get("count", 0)
        assert a["rows_held"] > 0 and a["table_bytes"] >= a["rows_held"] * 16 * 4
        assert a["rss_bytes"] > 0 and a["ready"] == 1
        assert a["snapshot_age_seconds"] == -1 and a["log_bytes"] == -1  # hooks, not set yet
    assert sum(a["rows_held"] for a in after.values()) == 20_000
    assert sum(a["optimizer_state_bytes"] for a in after.values()) > 0  # allocated by the first push
    # the Stats RPC reports the same counters
    stats = {s["shard_id"]: s for s in mem.stats()}
    final = _scrape_all(mem, ray_local)
    for sid, a in final.items():
        assert stats[sid]["rows_gathered"] == a["rows"].get("gathered", 0)


def test_read_only_and_explicit_credentials(mem, ray_local):
    ro = engram_mem.connect(name="test-metrics", read_only=True)
    try:
        got = ro.gather("m", [1, 2, 3])
        assert np.array_equal(got, mem.gather("m", [1, 2, 3]))
        with pytest.raises(PermissionDenied, match="read-only"):
            ro.push("m", [1], np.ones((1, 16), np.float32))
        with pytest.raises(PermissionDenied):
            ro.write("m", [1], np.zeros((1, 16), np.float32))
        assert ro.describe_shard(ro.view.address(0)).tables[0].shm_path  # same machine: the paths are there
    finally:
        ro.close()
    wrong = engram_mem.connect(name="test-metrics", credential="not-this-clusters-credential-xyz")
    try:
        with pytest.raises(Unauthenticated):
            wrong.gather("m", [1])
    finally:
        wrong.close()
    cred = ray_local.get(mem.controller.client_security.remote())["credential"]
    right = engram_mem.connect(name="test-metrics", credential=cred)
    try:
        assert right.gather("m", [4]).shape == (1, 16)
    finally:
        right.close()
    assert cred not in json.dumps(mem.describe(), default=str)  # describe() (and status --json) hide it


def test_status_prints_the_same_numbers(mem, ray_local):
    mem.gather("m", np.arange(100))
    address = ray_local.get_runtime_context().gcs_address
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    js = subprocess.run([sys.executable, "-m", "engram_mem.tools.cli", "--name", "test-metrics", "status", "--address",
                         address, "--interval", "0.2", "--json"], env=env, capture_output=True, text=True, timeout=180)
    assert js.returncode == 0, js.stderr
    out = json.loads(js.stdout)
    assert len(out["shards"]) == 2
    scraped = _scrape_all(mem, ray_local)
    for row in out["shards"]:
        assert row["metrics_address"] and row["rows_held"] == scraped[row["shard"]]["rows_held"]
        assert row["requests"] > 0 and row["errors"] >= 0 and row["rss_bytes"] > 0
    from engram_mem.tools.status import prometheus_targets, render  # what `status` prints without --json

    endpoints = ray_local.get(mem.controller.metrics_endpoints.remote())
    sd = prometheus_targets(mem.describe(), endpoints)
    assert sorted(t["targets"][0] for t in sd) == sorted(endpoints.values())

    d = mem.describe()
    table = render(d, out["shards"])
    assert "gather p50/p99 ms" in table and "table m: 20,000 x 16 float32" in table
    assert all(row["metrics_address"] in table for row in out["shards"])


def test_credential_rotation_through_the_controller(mem, ray_local):
    """Last in this module: it retires the credential the `mem` client holds."""
    old = ray_local.get(mem.controller.client_security.remote())["credential"]
    r = ray_local.get(mem.controller.rotate_credentials.remote())
    assert r["accepted"] == 2
    fresh = engram_mem.connect(name="test-metrics")
    try:
        assert fresh._chans.security.credential != old
        assert np.array_equal(fresh.gather("m", [7]), mem.gather("m", [7]))  # old and new both accepted
        ray_local.get(mem.controller.rotate_credentials.remote(finish=True))
        assert fresh.gather("m", [7]).shape == (1, 16)
        with pytest.raises(Unauthenticated):
            mem.gather("m", [7])
    finally:
        fresh.close()
