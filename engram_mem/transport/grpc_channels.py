"""ShardChannels: the client's gRPC side: one event loop thread, one channel per shard, named stubs.

    chans = ShardChannels(max_message_bytes=1 << 30, security=ClientSecurity(...))
    stubs = chans.stubs("127.0.0.2:40123")       # on the loop thread: stubs.gather(...), stubs.push(...)
    fut = chans.submit(coro)                      # run a coroutine on the loop from any thread

Errors: `rpc_error` turns a failed call into the typed exception the shard meant (its status and
the `engram-error` trailing metadata), so callers see UnknownTable, NotReady, ... as if local.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from dataclasses import dataclass

import grpc

from engram_mem.errors import ERROR_CLASSES, EngramMemError, RequestTooLarge, ShardUnavailable
from engram_mem.pb.v1 import memory_pb2 as pb
from engram_mem.security import ClientSecurity
from engram_mem.wire import SERVICE, decode_rows_chunk


@dataclass(frozen=True)
class ShardStubs:
    channel: object
    gather: object     # unary-stream: GatherRequest -> RowsChunk payloads
    write: object
    push: object
    stats: object
    health: object
    describe: object


def rpc_error(e: grpc.aio.AioRpcError, address: str) -> EngramMemError:
    """The typed exception a shard meant, rebuilt from its status and trailing metadata."""
    cls_name = dict(e.trailing_metadata() or ()).get("engram-error")
    cls = ERROR_CLASSES.get(cls_name or "")
    if cls is not None:
        return cls(e.details())
    code = e.code()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return RequestTooLarge(f"shard {address}: {e.details()}")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
        # "failed to connect": no connection, so nothing of the request reached the shard.
        sent = not (code == grpc.StatusCode.UNAVAILABLE and "failed to connect" in (e.details() or "").lower())
        return ShardUnavailable(f"shard {address} unreachable: {code.name}: {e.details()}", address=address,
                                sent=sent)
    return EngramMemError(f"shard {address}: {code.name}: {e.details()}")


def call_error(e: BaseException, address: str) -> BaseException:
    """The typed exception for a failed call to a shard, whatever gRPC or asyncio raised.

    A call whose channel was closed under it ends in asyncio.CancelledError although the calling
    task was not cancelled: that is a shard that may have received the request (retryable), not a
    cancellation. A task that is itself being cancelled gets its CancelledError back."""
    if isinstance(e, grpc.aio.AioRpcError):
        return rpc_error(e, address)
    if isinstance(e, asyncio.CancelledError):
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            return e
        return ShardUnavailable(f"shard {address}: the call was cancelled under it (its channel closed)",
                                address=address)
    if isinstance(e, grpc.aio.UsageError):  # a closed channel: the call never started
        return ShardUnavailable(f"shard {address}: {e}", address=address, sent=False)
    return e


CALL_ERRORS = (grpc.aio.AioRpcError, asyncio.CancelledError, grpc.aio.UsageError)



class ShardChannels:
    """One uvloop event loop thread, one grpc.aio channel per shard address, with named stubs."""

    def __init__(self, max_message_bytes: int, security: ClientSecurity | None = None):
        import uvloop

        self.security = security or ClientSecurity()
        self.opts = [("grpc.max_receive_message_length", max_message_bytes),
                     ("grpc.max_send_message_length", max_message_bytes)]
        self.loop = uvloop.new_event_loop()
        self._chans: dict[str, ShardStubs] = {}
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(ready.set)
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="engram-mem-client", daemon=True)
        self.thread.start()
        ready.wait()

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stubs(self, address: str) -> "ShardStubs":
        """The RPCs of the shard at `address` (loop thread only)."""
        if address not in self._chans:
            ch = self.security.channel(address, self.opts)
            ser = lambda m: m.SerializeToString()  # noqa: E731
            path = f"/{SERVICE}/"
            w = self.security.wrap
            self._chans[address] = ShardStubs(
                channel=ch,
                gather=w(ch.unary_stream(path + "Gather", request_serializer=ser,
                                         response_deserializer=decode_rows_chunk)),
                write=w(ch.unary_unary(path + "Write", request_serializer=ser,
                                       response_deserializer=pb.WriteReply.FromString)),
                push=w(ch.unary_unary(path + "Push", request_serializer=ser,
                                      response_deserializer=pb.PushReply.FromString)),
                stats=w(ch.unary_unary(path + "Stats", request_serializer=ser,
                                       response_deserializer=pb.StatsReply.FromString)),
                health=w(ch.unary_unary(path + "Health", request_serializer=ser,
                                        response_deserializer=pb.HealthReply.FromString)),
                describe=w(ch.unary_unary(path + "Describe", request_serializer=ser,
                                          response_deserializer=pb.DescribeReply.FromString)))
        return self._chans[address]

    def forget(self, address: str, grace: float = 10.0) -> None:
        """Use a new channel for `address` from now on. The old one closes once its calls in flight
        have ended (or after `grace` seconds): closing it at once would cancel calls that other
        requests have on it, calls the shard may already have applied."""
        entry = self._chans.pop(address, None)
        if entry is not None:
            asyncio.ensure_future(entry.channel.close(grace))

    def close(self) -> None:
        async def _close():
            for stubs in self._chans.values():
                await stubs.channel.close()
            self._chans.clear()

        if self.loop.is_running():
            try:
                self.submit(_close()).result(timeout=10)
            except Exception:  # noqa: BLE001
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
