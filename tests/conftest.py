"""Shared fixtures: one real local Ray cluster per test module (ray.init costs ~3 s and ~0.7 GB)."""

import os
import sys
import time

import pytest
import torch

# Tests run tiny models beside Ray processes on 2 cores. With OpenMP's default 2 threads a busy
# core stalls every matmul at its barrier (measured: a tiny training step ~10x slower); one thread
# per test process keeps the suite fast and its timing-independent results unchanged.
torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.ray_nodes import start_nodes  # noqa: E402


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray cluster on the loopback node address 127.0.0.2, shut down after the module."""
    import ray

    from engram_mem.control.local import init_embedded_ray

    if ray.is_initialized():
        ray.shutdown()
    # On a loaded 2-core machine Ray's own start-up can time out (its raylet wait is a fixed 30 s,
    # and Ray raises a bare Exception for it): shut down what started, let the load pass, try again.
    for attempt in range(4):
        try:
            init_embedded_ray(num_cpus=8, object_store_bytes=512 << 20)
            break
        except Exception:
            ray.shutdown()
            if attempt == 3:
                raise
            time.sleep(5 * (attempt + 1))
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def two_nodes():
    """Two Ray nodes on this machine, 127.0.0.2 (head) and 127.0.0.3, shut down after the module."""
    import ray

    cluster, _ = start_nodes([dict(num_cpus=4, node_ip_address="127.0.0.3", object_store_memory=256 << 20)])
    try:
        yield ray
    finally:
        ray.shutdown()
        cluster.shutdown()
