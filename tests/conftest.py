"""Shared fixtures: one real local Ray cluster per test module (ray.init costs ~3 s and ~0.7 GB)."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray cluster on the loopback node address 127.0.0.2, shut down after the module."""
    import ray

    from engram_mem.local import init_embedded_ray

    if ray.is_initialized():
        ray.shutdown()
    init_embedded_ray(num_cpus=8, object_store_bytes=512 << 20)
    try:
        yield ray
    finally:
        ray.shutdown()
