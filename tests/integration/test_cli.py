"""`engram-mem up / status / scale / down` as a user runs them: real processes, a real local Ray cluster."""

import json
import os
import subprocess
import sys


def _run(args, env, timeout=240):
    return subprocess.run([sys.executable, "-m", "engram_mem.tools.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_up_status_scale_down(tmp_path):
    env = dict(os.environ, ENGRAM_MEM_HOME=str(tmp_path / "home"))
    tables = tmp_path / "tables.json"
    tables.write_text(json.dumps([{"name": "emb", "rows": 100_000, "dim": 64, "optimizer": "adam"}]))
    up = _run(["--name", "cli-test", "up", "--shards", "2", "--tables", str(tables)], env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "is up" in up.stdout and "NOT durable" in up.stdout  # no --data-dir: it says so
        again = _run(["--name", "cli-test", "up"], env)
        assert again.returncode != 0 and "already up" in again.stderr
        status = _run(["--name", "cli-test", "status"], env)
        assert status.returncode == 0, status.stderr
        assert "2 shards" in status.stdout and "table emb: 100,000 x 64 float32" in status.stdout
        scale = _run(["--name", "cli-test", "scale", "3"], env)
        assert scale.returncode == 0 and "scaled to 3 shards" in scale.stdout, scale.stderr
        js = json.loads(_run(["--name", "cli-test", "status", "--json"], env).stdout)
        assert len(js["stats"]) == 3 and sum(int(s["table_bytes"]) for s in js["stats"]) >= 100_000 * 64 * 4
    finally:
        down = _run(["--name", "cli-test", "down"], env)
    assert down.returncode == 0 and "is down" in down.stdout, down.stdout + down.stderr
    status = _run(["--name", "cli-test", "status"], env)
    assert status.returncode != 0 and "no local memory cluster" in status.stderr


def test_up_on_damaged_data_dir_says_which_file_and_down_leaves_no_shm(tmp_path):
    env = dict(os.environ, ENGRAM_MEM_HOME=str(tmp_path / "home"))
    data = tmp_path / "data"
    tables = tmp_path / "tables.json"
    tables.write_text(json.dumps([{"name": "emb", "rows": 10_000, "dim": 8}]))
    up = _run(["--name", "cli-dmg", "up", "--shards", "2", "--tables", str(tables), "--data-dir", str(data)], env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "durable (process)" in up.stdout
        state = json.loads((tmp_path / "home" / "cli-dmg.json").read_text())
        shm = os.path.join(state["shm_dir"], state["cluster_id"])
        assert os.path.isdir(shm)
    finally:
        down = _run(["--name", "cli-dmg", "down"], env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not os.path.exists(shm)
    os.unlink(data / "cluster.json")
    again = _run(["--name", "cli-dmg", "up", "--shards", "2", "--data-dir", str(data)], env)
    assert again.returncode != 0
    assert "CorruptData" in again.stderr and "cluster.json is missing" in again.stderr, again.stderr
    assert _run(["--name", "cli-dmg", "status"], env).returncode != 0  # nothing was left running


def test_up_with_replicas_on_simulated_nodes_and_down(tmp_path):
    """`up --replicas 2 --replica-ack all` on one machine: a second Ray node at 127.0.0.3; a shard's two
    members on both; `status` lists it, in sync; `down` stops both nodes and leaves no /dev/shm files."""
    env = dict(os.environ, ENGRAM_MEM_HOME=str(tmp_path / "home"))
    tables = tmp_path / "tables.json"
    tables.write_text(json.dumps([{"name": "emb", "rows": 10_000, "dim": 8}]))
    up = _run(["--name", "cli-rep", "up", "--shards", "1", "--replicas", "2", "--replica-ack", "all",
               "--tables", str(tables)], env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads((tmp_path / "home" / "cli-rep.json").read_text())
        shm = os.path.join(state["shm_dir"], state["cluster_id"])
        status = _run(["--name", "cli-rep", "status"], env)
        assert status.returncode == 0, status.stderr
        assert "on 2 node(s): 127.0.0.2, 127.0.0.3" in status.stdout, status.stdout
        assert "replica 1 at 127.0.0." in status.stdout and ": ready;" in status.stdout, status.stdout
        assert "in sync: acknowledges writes" in status.stdout, status.stdout
        shard = json.loads(_run(["--name", "cli-rep", "status", "--json"], env).stdout)["describe"]["shards"]["0"]
        assert {shard["node_ip"], shard["replicas"][0]["node_ip"]} == {"127.0.0.2", "127.0.0.3"}
        assert os.path.isdir(os.path.join(shm, "shard-0-r1"))
    finally:
        down = _run(["--name", "cli-rep", "down"], env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not os.path.exists(shm)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert not [line for line in ps.splitlines() if "raylet" in line and "127.0.0.3" in line and
                state["ray_address"].split(":")[1] in line]
