"""ClusterConfig refuses settings it cannot run, naming the setting (config.py)."""

import pytest

from engram_mem.config import ClusterConfig
from engram_mem.errors import InvalidArgument


@pytest.mark.parametrize("kwargs, names", [
    ({"replica_ack": "some"}, "replica_ack 'some'"),
    ({"replica_ack_timeout_s": 0}, "replica_ack_timeout_s"),
    ({"replica_ack_timeout_s": float("inf")}, "replica_ack_timeout_s"),
    ({"replicas": 0}, "replicas must be >= 1"),
    ({"durability": "maybe"}, "durability 'maybe'"),
    ({"name": "has space"}, "cluster name"),
])
def test_bad_settings_are_refused_by_name(kwargs, names):
    with pytest.raises(InvalidArgument, match=names):
        ClusterConfig(**kwargs)


def test_replica_ack_defaults_to_asynchronous_and_takes_all():
    assert ClusterConfig().replica_ack == "none"
    assert ClusterConfig(replicas=2, replica_ack="all").to_dict()["replica_ack"] == "all"


def test_core_lists_are_checked_on_creation():
    assert ClusterConfig(agent_cpus="0,2-3", shard_cpus=[3, 1, 3]).agent_cpus == (0, 2, 3)
    assert ClusterConfig(shard_cpus=[3, 1, 3]).shard_cpus == (1, 3)
    for bad in ("", "a", "1-x", [], [-1], [True], 7):
        with pytest.raises(InvalidArgument, match="agent_cpus"):
            ClusterConfig(agent_cpus=bad)
