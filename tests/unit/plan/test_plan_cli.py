"""`engram-mem plan` end to end: a plan for every preset, JSON output, input files, bad input.

    pytest tests/unit/plan/test_plan_cli.py -q
"""

import json
import os
import subprocess
import sys

import pytest

from engram_mem.plan.presets import MODEL_PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def plan_here(capsys, *args):
    """In this process (the command's own code path, without a new interpreter's start-up)."""
    from engram_mem.tools.cli import main

    rc = main(["plan", *args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out.out, out.err)


def plan(*args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "engram_mem.tools.cli", "plan", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


def test_every_preset_gets_a_plan():
    r = plan("--all-presets", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert {x["model"] for x in rows} == set(MODEL_PRESETS)
    assert all(x["nodes"] >= 1 and x["tok/s/worker"] > 0 for x in rows)
    # NVMe random 4 KiB reads are the slowest tier for every model: the largest penalty
    for name in MODEL_PRESETS:
        mine = [x for x in rows if x["model"] == name and x["mode"] == "prefill"]
        assert max(mine, key=lambda x: x["penalty %"])["tier"] == "nvme"


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
def test_plan_prints_a_table_for_a_preset(preset, capsys):
    r = plan_here(capsys, "--model", preset, "--mode", "decode", "--batch", "32", "--context", "2048", "--workers", "16",
             "--tier", "tcp-100g", "--cache-rows", "16384", "--price", "tcp-100g=3")
    assert r.returncode == 0, r.stderr
    for words in ("memory nodes", "prefetch window", "predicted throughput penalty", "saturates first",
                  "hit rate", "cost per month"):
        assert words in r.stdout, words


def test_a_plan_fetching_a_batch_ahead_says_so(capsys):
    r = plan_here(capsys, "--model", "v4.1-flash", "--mode", "prefill", "--batch", "8", "--context", "1024",
                  "--tier", "here-tcp", "--ahead", "1")
    assert r.returncode == 0, r.stderr
    assert "fetched 1 batch ahead" in r.stdout and "before the forward" in r.stdout


def test_input_file_and_json(tmp_path, capsys):
    (tmp_path / "p.yaml").write_text(
        "model: {preset: v4.1-flash, table_rows: 100000000}\n"
        "workload: {mode: prefill, batch: 4, seq_len: 1024, workers: 32, zipf_s: 1.1, replicas: 2}\n"
        "hardware: {tier: cxl-pool, device: b200, shard_gbps: 20}\n")
    r = plan_here(capsys, "--input", str(tmp_path / "p.yaml"), "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    assert p["model"]["table_rows"] == 100_000_000 and p["rows_tier"]["name"] == "cxl-pool"
    assert p["sizing"]["copies"] == 2 and p["workload"]["workers"] == 32
    assert 0 <= p["exposed_wait_pct"] <= 100 and p["bandwidth"]["saturates_first"]


@pytest.mark.parametrize("args,msg", [
    (["--model", "gpt-9"], "unknown model preset"),
    (["--tier", "carrier-pigeon"], "unknown tier"),
    (["--workers", "0"], "workload.workers"),
    (["--price", "rdma-400g=cheap"], "--price"),
    (["--tiers-file", "/nonexistent.json"], "does not exist"),
    (["--mode", "decode", "--ahead", "1"], "workload.ahead applies to prefill only"),
])
def test_bad_input_is_a_clear_error(args, msg, capsys):
    r = plan_here(capsys, *args)
    assert r.returncode == 2 and msg in r.stderr, r.stderr
