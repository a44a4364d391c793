"""GrpcConnector: bulk rows over the shards' gRPC service (the fallback, and TLS clusters' path).

Gather replies stream as ~1 MB RowsChunk messages (wire.py) read without protobuf objects; each
chunk is copied once into the caller's array (a "staged" copy: gRPC owns the receive buffer).
Write rows and Push gradients travel inside their protobuf request.
"""

from __future__ import annotations

import numpy as np

from engram_mem.transport.grpc_channels import CALL_ERRORS, ShardChannels, call_error
from engram_mem.errors import EngramMemError, ShardUnavailable
from engram_mem.pb.v1 import memory_pb2 as pb
from engram_mem.transport.connector import RowConnector
from engram_mem.wire import ids_bytes


class GrpcConnector(RowConnector):
    name = "grpc"

    def __init__(self, chans: ShardChannels, max_request_bytes: int, chunk_rows=lambda: 0):
        super().__init__(max_request_bytes)
        self.chans, self.chunk_rows = chans, chunk_rows

    async def gather(self, member, epoch, table, ids, out, start, dest):
        address = member["address"]
        gather = self.chans.stubs(address).gather
        dim, dtype = out.shape[1], out.dtype
        for first, end in self.gather_batches(ids.size, dim * dtype.itemsize):
            pos = first
            self.counts["gather"] += 1
            try:
                async for chunk in gather(pb.GatherRequest(table=table, ids=ids_bytes(ids[first:end]), epoch=epoch,
                                                           chunk_rows=self.chunk_rows())):
                    rows = np.frombuffer(chunk, dtype=dtype).reshape(-1, dim)
                    k = rows.shape[0]
                    if pos + k > end:
                        raise EngramMemError(f"shard {address} sent more rows than asked for")
                    if dest is None:
                        out[start + pos:start + pos + k] = rows
                    else:
                        out[dest[pos:pos + k]] = rows
                    self.counts["staged_bytes"] += rows.nbytes
                    pos += k
            except CALL_ERRORS as e:
                raise call_error(e, address) from None
            if pos != end:
                raise ShardUnavailable(f"shard {address}: gather reply ended early ({pos} of {end} rows)",
                                       address=address)

    async def write(self, member, epoch, table, ids, rows, dtype, key):
        address = member["address"]
        self.counts["write"] += 1
        try:
            reply = await self.chans.stubs(address).write(pb.WriteRequest(
                table=table, ids=ids_bytes(ids), rows=_raw(rows), dtype=dtype, epoch=epoch, client=key[0],
                seq=key[1]))
        except CALL_ERRORS as e:
            raise call_error(e, address) from None
        return reply.rows_written

    async def push(self, member, epoch, table, ids, grads, dtype, lr, step, worker, key):
        address = member["address"]
        self.counts["push"] += 1
        try:
            reply = await self.chans.stubs(address).push(push_request(table, ids, _raw(grads), dtype, epoch, lr, step,
                                                                      worker, key))
        except CALL_ERRORS as e:
            raise call_error(e, address) from None
        return reply.rows_updated

    def forget(self, address: str) -> None:
        self.chans.forget(address)


def _raw(a: np.ndarray) -> bytes:
    return memoryview(np.ascontiguousarray(a)).cast("B").tobytes()


def push_request(table, ids, grads: bytes, dtype, epoch, lr, step, worker, key) -> pb.PushRequest:
    info = pb.StepInfo(step=step, worker=worker)
    if lr is not None:
        info.lr = lr
    return pb.PushRequest(table=table, ids=ids_bytes(ids), grads=grads, dtype=dtype, epoch=epoch, step=info,
                          client=key[0], seq=key[1])
