"""Client: the Python API of a memory cluster (`connect`, `MemoryClient`) and its request logic;
the bytes travel through engram_mem.transport (gRPC channels, the framed-TCP data plane).

api (MemoryClient), connect, reads, writes, members (which member a
request goes to), retry (backoff until a deadline), routing (ids -> shard parts), gather_future and write_future
(results in flight: a gather's rows, a write's or push's acknowledgement or typed error).
"""

from engram_mem.client.api import MemoryClient
from engram_mem.client.connect import connect


__all__ = ["MemoryClient", "connect"]
