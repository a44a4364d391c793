"""engram-mem status: what it says about a shard restored from a replica (status.render)."""

import pytest

from engram_mem.tools.status import render


def _row(shard):
    return {"shard": shard, "address": "127.0.0.2:1", "metrics_address": "127.0.0.2:2", "rows_held": 10,
            "table_bytes": 100, "optimizer_state_bytes": 0, "rss_bytes": 1 << 20, "requests": 3, "errors": 0,
            "requests_per_s": 1.0, "gather_bytes_per_s": 0.0, "gather_p50_ms": 1.0, "gather_p99_ms": 2.0,
            "restarts": 1, "replica_lag_s": 0.0}


@pytest.mark.parametrize("ack", ["none", "all"])
def test_a_shard_restored_from_its_replica_says_so_and_what_may_be_missing(ack):
    restore = {"source": "replica 1", "lsn": 77, "reason": "its shard directory is unusable: gone", "replica_ack": ack}
    d = {"name": "c", "cluster_id": "x", "epoch": 1, "tables": {},
         "shards": {0: {"node_ip": "127.0.0.2", "restore": restore,
                        "replicas": [{"member": 1, "address": "127.0.0.3:1", "node_ip": "127.0.0.3", "ready": True}]},
                    1: {"node_ip": "127.0.0.2", "restore": {"seconds": 0.1}, "replicas": []}}}
    text = render(d, [_row(0), _row(1)])
    assert "restored from replica 1 (lsn 77): its shard directory is unusable: gone" in text
    assert ("may be missing" in text) == (ack == "none")
    assert text.count("restored from") == 1


@pytest.mark.parametrize("ack, in_sync, says", [("all", True, "in sync: acknowledges writes"),
                                                ("all", False, "NOT in sync"),
                                                ("none", True, "following")])
def test_replica_lines_say_whether_the_replica_is_in_sync(ack, in_sync, says):
    d = {"name": "c", "cluster_id": "x", "epoch": 1, "tables": {}, "config": {"replica_ack": ack},
         "shards": {0: {"node_ip": "127.0.0.2", "restore": {},
                        "replication": {"c-shard-0-r1": {"in_sync": in_sync, "lag_s": 0.0}},
                        "replicas": [{"member": 1, "actor": "c-shard-0-r1", "address": "127.0.0.3:1",
                                      "node_ip": "127.0.0.3", "ready": True}]}}}
    line = [x for x in render(d, [_row(0)]).splitlines() if "replica 1 at" in x][0]
    assert says in line and ": ready;" in line


@pytest.mark.parametrize("huge, hint", [("never", True), ("within_size", False), ("", False)])
def test_a_shard_whose_tables_sit_on_small_pages_says_how_to_fix_it(huge, hint):
    d = {"name": "c", "cluster_id": "x", "epoch": 1, "tables": {},
         "shards": {0: {"node_ip": "127.0.0.2", "restore": {}, "replicas": [], "huge_pages": huge}}}
    assert ("huge=within_size" in render(d, [_row(0)])) == hint
