"""Reads: gathers, from the first member of each shard that answers.

A gather de-duplicates its ids, splits them by shard, sends the per-shard requests at once,
receives the streamed chunks into one buffer grouped by shard, and only then (in `result()`,
on the caller's thread) expands them back to the ids' order and shape. It waits for this
client's earlier writes and pushes to the table first (read-your-writes).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging

import numpy as np

from engram_mem.client.channel import CALL_ERRORS, call_error
from engram_mem.client.gather_future import GatherFuture, Reshaped
from engram_mem.client.routing import ClusterView, dest_rows, split_by_shard
from engram_mem.errors import EngramMemError, NotReady, ShardUnavailable
from engram_mem.pb.v1 import memory_pb2 as pb
from engram_mem.wire import ids_bytes, max_reply_bytes

log = logging.getLogger("engram_mem.client.reads")


class Reads:
    """The reads half of MemoryClient (a mixin: the state is MemoryClient.__init__'s)."""

    def gather(self, name: str, ids, *, as_torch: bool = False, device=None):
        """Rows for `ids` (int64, any shape): ids.shape + (dim,), numpy (or torch with as_torch/device).

        bfloat16 tables come back as uint16 bit patterns in numpy, and as torch.bfloat16 in torch."""
        return self.gather_async(name, ids, as_torch=as_torch, device=device).result()

    def gather_async(self, name: str, ids, *, as_torch: bool = False, device=None) -> GatherFuture:
        t = self._table(name)
        flat, shape = self._ids(t.spec, ids)
        uniq, first, inverse = np.unique(flat, return_index=True, return_inverse=True)
        if uniq.size == flat.size:  # distinct: rows arrive straight into place, in request order
            send, dest, dups = flat, None, None
        else:
            # Ask for each id once, at its first occurrence; rows land there as they arrive and the
            # few repeats are copied from their first occurrence at the end (no full expansion pass).
            dest = np.sort(first)
            send = flat[dest]
            repeat = np.ones(flat.size, dtype=bool)
            repeat[dest] = False
            rep = np.nonzero(repeat)[0]
            dups = (rep, first[inverse[rep]])
        inner = self._chans.submit(self._gather(name, send, dest, flat.size, dups))
        return GatherFuture(Reshaped(inner, tuple(shape) + (t.spec.storage_dim,)), t.spec.dtype, as_torch=as_torch,
                            device=device, spec=t.spec)

    async def _gather(self, name: str, send: np.ndarray, dest: np.ndarray | None, n_out: int,
                      dups: tuple[np.ndarray, np.ndarray] | None):
        """Rows of the distinct ids `send` into out[dest] (out[:len(send)] if dest is None); then
        out[dups[0]] = out[dups[1]] for repeated ids. Returns out [n_out, dim]."""
        await self._after_pending(name)

        async def attempt(view: ClusterView):
            t = view.table(name)
            grouped, parts, order = split_by_shard(t, send, len(view.shard_ids))
            out = np.empty((n_out, t.spec.storage_dim), dtype=t.spec.storage_dtype)
            await asyncio.gather(*(self._gather_part(view, name, rank, grouped[a:b], out, a,
                                                     dest_rows(dest, order, a, b))
                                   for rank, a, b in parts if b > a))
            if dups is not None and dups[0].size:
                out[dups[0]] = out[dups[1]]
            return out

        return await self._retrying(f"gather {name!r}", attempt)

    async def _gather_part(self, view: ClusterView, name: str, rank: int, ids: np.ndarray, out: np.ndarray,
                           start: int, dest: np.ndarray | None):
        """One shard's rows, from the first of its members that answers (see _read_members)."""
        members = self._read_members(view, rank)
        for i, m in enumerate(members):
            try:
                return await self._gather_from(m["address"], view.epoch, name, ids, out, start, dest)
            except EngramMemError as e:
                # The last member's error goes to the caller (retried, or what the primary refuses); a
                # replica's error of any kind, and a primary that is down or not ready, fail over.
                if i == len(members) - 1 or (m.get("member", 0) == 0 and not isinstance(e, (ShardUnavailable,
                                                                                            NotReady))):
                    raise
                self._mark_down(view, m, e)

    async def _gather_from(self, address: str, epoch: int, name: str, ids: np.ndarray, out: np.ndarray,
                           start: int, dest: np.ndarray | None):
        """Stream one member's rows into out[start:start+len(ids)], or scattered to out[dest]."""
        gather = self._chans.stubs(address).gather
        dim, dtype = out.shape[1], out.dtype
        max_ids = min(self.max_request_bytes // 8,  # and a reply within the shard's limit (wire.max_reply_bytes)
                      max(1, max_reply_bytes(self.max_request_bytes) // (dim * dtype.itemsize)))
        for first in range(0, ids.size, max_ids):
            sub = ids[first:first + max_ids]
            pos, end = first, first + sub.size
            try:
                async for chunk in gather(pb.GatherRequest(table=name, ids=ids_bytes(sub), epoch=epoch,
                                                           chunk_rows=self.chunk_rows)):
                    rows = np.frombuffer(chunk, dtype=dtype).reshape(-1, dim)
                    k = rows.shape[0]
                    if pos + k > end:
                        raise EngramMemError(f"shard {address} sent more rows than asked for")
                    if dest is None:
                        out[start + pos:start + pos + k] = rows
                    else:
                        out[dest[pos:pos + k]] = rows
                    pos += k
            except CALL_ERRORS as e:
                raise call_error(e, address) from None
            if pos != end:
                raise ShardUnavailable(f"shard {address}: gather reply ended early ({pos} of {end} rows)")

    def gather_distinct_async(self, name: str, ids: np.ndarray) -> concurrent.futures.Future:
        """Rows [n, dim] for distinct int64 ids, in their order (no de-duplication pass, no expansion)."""
        t = self._table(name)
        flat, _ = self._ids(t.spec, ids)

        async def run():
            return await self._gather(name, flat, None, flat.size, None)

        return self._chans.submit(run())
