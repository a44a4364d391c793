"""A whole node lost: the node holding a shard's primary is killed (its raylet and every worker on it,
SIGKILL) and its disk is gone (the shard directory deleted), while a writer pushes the known-effect
workload (SGD, lr 1, gradient -1: each acknowledged push adds exactly 1.0).

Four simulated Ray nodes: the head (127.0.0.2, no memory resource) and three memory nodes
(127.0.0.3-5), so the primary's placement-group bundle has a spare node to move to. Ray's node
health checks run every 0.5 s here (defaults take ~15 s to declare a node dead; the outcome is the
same, only later). With replica_ack=all the primary, restarted on the spare node, restores from its
in-sync replica: every acknowledged push is there exactly once.
"""

import shutil
import threading
import time

import numpy as np
import pytest

import engram_mem
from engram_mem.storage.snapshot import shard_dir
from tests.ray_nodes import start_nodes

ROWS, DIM = 4096, 8
SPREAD = np.arange(0, ROWS, 64)
MEMORY_NODES = ("127.0.0.3", "127.0.0.4", "127.0.0.5")


@pytest.fixture(scope="module")
def spare_nodes():
    import ray

    cluster, nodes = start_nodes(
        [dict(num_cpus=2, node_ip_address=ip, object_store_memory=128 << 20, resources={"memory_node": 10})
         for ip in MEMORY_NODES],
        system_config={"health_check_period_ms": 500, "health_check_failure_threshold": 4,
                       "health_check_initial_delay_ms": 1000})
    try:
        yield cluster, dict(zip(MEMORY_NODES, nodes))
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_primary_node_and_its_disk_lost_mid_pushes_loses_nothing(spare_nodes, tmp_path):
    cluster, nodes = spare_nodes
    with engram_mem.connect(shards=1, name="node-loss", replicas=2, replica_ack="all", data_dir=str(tmp_path),
                            cpus_per_shard=0.5, shard_resources={"memory_node": 1}, snapshot_interval_s=0) as mem:
        mem.create_table("r", rows=ROWS, dim=DIM, optimizer={"name": "sgd"}, init_std=0.0)
        deadline = time.time() + 120
        while not all(m.get("ready") for m in mem.refresh(check_shards=True).members(0)):
            assert time.time() < deadline, "the replica did not join"
            time.sleep(0.2)
        primary, replica = mem.view.members(0)
        before = mem.gather("r", SPREAD)
        acked, errors = [0], []
        g = -np.ones((SPREAD.size, DIM), np.float32)

        def pusher():
            for _ in range(200):
                try:
                    mem.push("r", SPREAD, g, lr=1.0)
                    acked[0] += 1
                except Exception as e:  # noqa: BLE001 - counted; the test fails on any
                    errors.append(repr(e))

        t = threading.Thread(target=pusher)
        t.start()
        while acked[0] < 40 and t.is_alive():
            time.sleep(0.01)
        shutil.rmtree(shard_dir(str(tmp_path), 0))                          # the node's disk ...
        cluster.remove_node(nodes[primary["node_ip"]], allow_graceful=False)  # ... and the node itself
        t.join()
        assert errors == [] and acked[0] == 200
        rows = mem.gather("r", SPREAD)
        assert np.array_equal(rows, before + acked[0]), (
            f"lost {int((before + acked[0] - rows).max())}, applied twice {int((rows - before - acked[0]).max())}")
        deadline = time.time() + 120   # the pushes may all be acknowledged before the lost node is noticed
        while True:
            view = mem.refresh(check_shards=True)
            now = view.members(0)
            if now[0]["node_ip"] not in (primary["node_ip"], replica["node_ip"]) or time.time() > deadline:
                break
            time.sleep(0.5)
        assert now[0]["node_ip"] not in (primary["node_ip"], replica["node_ip"])   # moved to the spare node
        assert view.shards[view.shard_ids[0]]["restore"]["source"] == "replica 1"
