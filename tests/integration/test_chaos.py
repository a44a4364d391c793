"""The chaos run of bench/bench_chaos.py, short and with a fixed seed: every fault kind at least once,
overlapping, under two counted writers and two checking readers; the invariants counted, never timings.

Real parts only: a cluster from `engram-mem up` (two simulated Ray nodes, replicas, a data directory on
a real size-limited tmpfs), kill -9 and SIGSTOP of real processes, a really full disk. Needs root (mount).
"""

import os

import pytest

from bench.bench_chaos import FAULTS, Config, run

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a size-limited tmpfs: needs root")


def _check(rep):
    print("chaos:", {k: v for k, v in rep.items() if k != "log"})
    print("\n".join(rep["log"]))
    assert rep["lost"] == 0 and rep["applied_twice"] == 0, rep
    assert rep["failed_present"] == 0 and rep["rows_differing"] == 0, rep
    assert rep["refused_present"] == 0, rep  # told ResourceExhausted yet applied elsewhere: test_chaos_found.py
    assert rep["read_violations"] == 0, rep["violations"]
    assert rep["pushes"]["other"] == 0, rep["push_errors"]
    assert rep["rows_differing_after_restart"] == 0, rep.get("up_after")
    assert rep["left_processes"] == [] and rep["left_shm"] == [], rep
    # A scale the controller refuses with its own typed error while other faults overlap is an answer,
    # not a fault that failed to run (open: found at seed 7 on 85aed84, see the stop's note).
    unexpected = [e for e in rep["fault_errors"] if not e.startswith("scale: RayTaskError(EngramMemError)")]
    assert unexpected == [], rep["fault_errors"]


def test_every_fault_kind_overlapping_nothing_lost_or_applied_twice(tmp_path):
    """Seed 7, a fault every 5-8 s: each of the 11 kinds once, in the seed's order."""
    rep = run(Config(seconds=300, rounds=1, seed=7, every=(5.0, 8.0), stop_s=(3.0, 6.0),
                     workdir=str(tmp_path), name=f"chaos-t{os.getpid()}"))
    _check(rep)
    assert set(rep["faults"]) == set(FAULTS), rep["faults"]
    assert rep["pushes"]["acked"] > 0 and rep["reads"] > 0
