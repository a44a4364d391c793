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


def test_nice_values_are_checked_on_creation_and_applied_to_every_thread():
    import os
    import threading

    from engram_mem.affinity import set_nice, thread_nices

    assert ClusterConfig(agent_nice="-10", shard_nice=5).agent_nice == -10
    assert ClusterConfig().agent_nice is None and ClusterConfig(shard_nice=5).shard_nice == 5
    for bad in ("", "x", -21, 20, True, 1.5, [1]):
        with pytest.raises(InvalidArgument, match="shard_nice"):
            ClusterConfig(shard_nice=bad)
    # In a child process (nice only goes up without CAP_SYS_NICE): its threads, and one started after, at 7.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            ok = set_nice(7, "test") == 7
            later = threading.Thread(target=lambda: os.write(w, str(os.getpriority(os.PRIO_PROCESS, 0)).encode()))
            later.start()
            later.join()
            os.write(w, b" " + str(set(thread_nices().values())).encode() + (b" ok" if ok else b" no"))
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    os.close(w)
    out = os.read(r, 200).decode()
    assert out == "7 {7} ok", out


def test_a_ray_engram_mem_starts_runs_its_workers_at_nice_0_unless_told_otherwise():
    from engram_mem.control.local import WORKER_NICENESS, level_worker_niceness

    assert level_worker_niceness({})[WORKER_NICENESS] == "0"
    assert level_worker_niceness({WORKER_NICENESS: "5"})[WORKER_NICENESS] == "5"
