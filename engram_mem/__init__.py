"""engram-mem: a distributed memory service for Engram's hashed n-gram tables.

    import engram_mem
    with engram_mem.connect() as mem:              # embedded local cluster, or the one `engram-mem up` started
        mem.create_table("t", rows=1_000_000, dim=256)
        rows = mem.gather("t", ids)                # ids int64 of any shape -> ids.shape + (256,)

Importing this package is cheap and pulls in neither Ray nor gRPC: `connect` and `MemoryClient`
load them on first use, so the model can import `engram_mem.table` and `engram_mem.optim` alone.
"""

from engram_mem.errors import *  # noqa: F401,F403
from engram_mem.optim import OptimizerSpec
from engram_mem.table import TableSpec

__all__ = ["connect", "MemoryClient", "TableSpec", "OptimizerSpec"]


def __getattr__(name):
    if name in ("connect", "MemoryClient"):
        from engram_mem import client

        return getattr(client, name)
    raise AttributeError(f"module 'engram_mem' has no attribute {name!r}")
