"""RowConnector: how bulk rows travel between a client and one shard member, whatever the transport.

    conn = connectors.for_member(member)            # TcpConnector or GrpcConnector (connectors below)
    await conn.gather(member, epoch, "t", ids, out, start=0, dest=None)   # rows into out[0:len(ids)]
    n = await conn.write(member, epoch, "t", ids, rows, "float32", key=("client", 7))
    n = await conn.push(member, epoch, "t", ids, grads, "float32", lr=1.0, step=3, worker="w0", key=...)

One small interface, one implementation per transport, chosen by configuration (the shape of
vLLM's KV connectors): GrpcConnector (grpc_channels.py's channels; control, fallback)
and TcpConnector (transport/tcp_connector.py, the framed-TCP data plane). Every implementation
raises the same typed errors (the shard's own classes; ShardUnavailable with `address` = the
member's gRPC address and `sent` for a member that could not be reached), so the client's
retries, epochs and idempotency keys work the same over each, and both pass the same tests.

Rows land in the caller's array: `out[start:start + len(ids)]` when `dest` is None (the
contiguous case), else `out[dest]`. `counts` holds, per connector, its requests ("gather",
"write", "push": one per request sent) and the bytes of gathered rows that arrived straight
into the caller's array ("direct_bytes") or were copied there from a buffer of the transport's
own ("staged_bytes"), so a test can count a row's copies.
"""

from __future__ import annotations

import abc
import asyncio

import numpy as np

from engram_mem.wire import max_reply_bytes


async def all_or_none(coros) -> list:
    """Run the coroutines together; if one fails, the others are cancelled and awaited before the
    error goes on, so none of them writes into the caller's array after this returns."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class RowConnector(abc.ABC):
    name = ""

    def __init__(self, max_request_bytes: int):
        self.max_request_bytes = max_request_bytes
        self.counts = {"gather": 0, "write": 0, "push": 0, "direct_bytes": 0, "staged_bytes": 0}

    def gather_batches(self, n: int, row_bytes: int):
        """(first, stop) ranges of a gather's ids, each within a shard's request and reply limits."""
        max_ids = min(self.max_request_bytes // 8, max(1, max_reply_bytes(self.max_request_bytes) // row_bytes))
        for first in range(0, n, max_ids):
            yield first, min(n, first + max_ids)

    @abc.abstractmethod
    async def gather(self, member: dict, epoch: int, table: str, ids: np.ndarray, out: np.ndarray, start: int,
                     dest: np.ndarray | None) -> None:
        """The rows of distinct `ids` into out[start:start+len(ids)] (dest None) or out[dest]."""

    @abc.abstractmethod
    async def write(self, member: dict, epoch: int, table: str, ids: np.ndarray, rows: np.ndarray, dtype: str,
                    key: tuple[str, int]) -> int:
        """One Write request (sorted distinct ids within one request's limits); rows written."""

    @abc.abstractmethod
    async def push(self, member: dict, epoch: int, table: str, ids: np.ndarray, grads: np.ndarray, dtype: str,
                   lr: float | None, step: int, worker: str, key: tuple[str, int]) -> int:
        """One Push request; rows updated."""

    def forget(self, address: str) -> None:
        """Drop what is kept for the member at `address` (its connections): it failed or moved."""

    async def aclose(self) -> None:
        """Close everything (on the client's loop)."""
