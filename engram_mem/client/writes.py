"""Writes: writes and pushes, each acknowledged once or ended with a typed error.

Each request carries an idempotency key (client id, seq); each shard's part is retried on its
own until the request's one deadline, so a part that succeeded is never sent again and a part
sent twice applies once (storage/dedup.py). What a caller is told: client/write_future.py.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from engram_mem.client.retry import RETRYABLE, RetryPolicy
from engram_mem.client.routing import is_shard_grouped, slot_aligned_chunks, split_by_shard
from engram_mem.client.write_future import WriteFuture
from engram_mem.errors import (EngramMemError, InvalidArgument, MaybeApplied, ReadOnlyTable, ShardUnavailable,
                               StaleEpoch, Unavailable)
from engram_mem.table import TableSpec, from_float32, np_dtype
from engram_mem.validate import check_grads, check_lr, check_rows_finite

log = logging.getLogger("engram_mem.client.writes")


class Writes:
    """The writes half of MemoryClient (a mixin: the state is MemoryClient.__init__'s)."""

    def write(self, name: str, ids, rows, key: tuple[str, int] | None = None, timeout: float | None = None) -> int:
        """write_async(...).result(timeout): rows written, or a typed error (see push)."""
        return self.write_async(name, ids, rows, key=key).result(timeout)

    def write_async(self, name: str, ids, rows, key: tuple[str, int] | None = None) -> WriteFuture:
        """Set rows (the last of duplicate ids wins). key=(client id, seq) overrides the client's own
        idempotency key: a new client retrying a dead one's request with its key applies it once."""
        t = self._table(name)
        flat, _ = self._ids(t.spec, ids)
        rows, dtype = self._rows(t.spec, rows, flat.size, "rows")
        # Last write wins among duplicates: keep each id's last occurrence.
        check_rows_finite(t.spec, flat, from_float32(rows, t.spec.dtype) if dtype != t.spec.dtype else rows)
        rev_uniq, rev_idx = np.unique(flat[::-1], return_index=True)
        keep = flat.size - 1 - rev_idx
        return self._send(name, "write", rev_uniq, rows[keep], dtype, None, 0, key=key)

    def push(self, name: str, ids, grads, lr: float | None = None, step: int = 0,
             key: tuple[str, int] | None = None, timeout: float | None = None) -> int:
        """push_async(...).result(timeout): rows updated, applied exactly once. Otherwise a typed
        error and nothing else: the shard's own refusal (InvalidArgument, ...: not applied),
        Unavailable (no shard reached before retry_timeout or `timeout`: not applied) or
        MaybeApplied (a shard may have applied it: retry with key=e.key to apply it once)."""
        return self.push_async(name, ids, grads, lr=lr, step=step, key=key).result(timeout)

    def push_async(self, name: str, ids, grads, lr: float | None = None, step: int = 0,
                   key: tuple[str, int] | None = None) -> WriteFuture:
        """Send a sparse gradient. Duplicate ids are summed here; NaN/Inf anywhere rejects the whole push.
        Applied exactly once however often it is retried (idempotency key; `key` as in write_async)."""
        import torch

        t = self._table(name)
        if t.spec.is_bytes:
            raise ReadOnlyTable(f"table {name!r} holds {t.spec.dtype} rows, which take write (import) but not push; "
                                f"train a float32 or bfloat16 table and quantize it on export")
        flat, _ = self._ids(t.spec, ids)
        g = grads.detach().to("cpu", torch.float32) if hasattr(grads, "detach") else \
            torch.from_numpy(np.asarray(grads, dtype=np.float32))
        g = g.reshape(flat.size, -1) if flat.size else g.reshape(0, t.spec.dim)
        if g.shape != (flat.size, t.spec.dim):
            raise InvalidArgument(f"table {name!r}: field 'grads' has shape {tuple(g.shape)}; "
                                  f"expected ({flat.size}, {t.spec.dim})")
        # The whole request is checked here, before it is split: no shard applies a part another refuses.
        check_grads(t.spec, flat, g.numpy(), self._view.raw["config"]["max_grad_abs"])
        if lr is not None:
            check_lr(t.spec, lr, self._view.raw["config"]["max_lr"])
        # Distinct and sorted, overall or within each shard (a fetch's order): split_by_shard gives
        # each shard its ids sorted. Anything else is sorted and summed here.
        if flat.size > 1 and not bool(np.all(flat[1:] > flat[:-1])) and not is_shard_grouped(t, flat):
            uniq, inv = np.unique(flat, return_inverse=True)
            if uniq.size != flat.size:
                g = torch.zeros(uniq.size, t.spec.dim).index_add_(0, torch.from_numpy(inv), g)
            else:
                g = torch.empty_like(g).index_copy_(0, torch.from_numpy(inv), g)
            flat = uniq
        return self._send(name, "push", flat, g.numpy(), "float32", lr, step, key=key)

    def _rows(self, spec: TableSpec, rows, n: int, field: str) -> tuple[np.ndarray, str]:
        if hasattr(rows, "detach"):
            import torch

            rows = rows.detach().cpu()
            rows = rows.view(torch.uint16).numpy() if rows.dtype == torch.bfloat16 else rows.numpy()
        rows = np.asarray(rows)
        if spec.dtype == "fp8_e4m3" and rows.dtype == np.float32:  # quantized here: the wire carries bytes
            from engram_mem.quant import quantize

            rows = quantize(rows.reshape(n, spec.dim) if n else rows.reshape(0, spec.dim), spec.block)
        if rows.dtype == np.float32 and not spec.is_bytes:
            dtype = "float32"
        elif rows.dtype == np_dtype(spec.dtype):
            dtype = spec.dtype
        else:
            raise InvalidArgument(f"table {spec.name!r}: field {field!r} has dtype {rows.dtype}; expected float32 "
                                  f"or the table's {spec.dtype}")
        width = spec.storage_dim if dtype == spec.dtype else spec.dim
        rows = rows.reshape(n, -1) if n else rows.reshape(0, width)
        if rows.shape[1] != width:
            raise InvalidArgument(f"table {spec.name!r}: field {field!r} has dim {rows.shape[1]}; table dim is {width}")
        return np.ascontiguousarray(rows), dtype

    def _send(self, name: str, kind: str, uniq: np.ndarray, rows: np.ndarray, dtype: str, lr, step: int,
              key: tuple[str, int] | None = None) -> WriteFuture:
        if self._closed:
            raise Unavailable(f"{kind} to table {name!r}: the client is closed; nothing was sent", table=name,
                              kind=kind, key=key)
        req = WriteFuture(self._chans.loop, name, kind)

        async def run():
            seq = await self._take_seq() if key is None else None
            req.key = (self.client_id, seq) if key is None else tuple(key)
            deadline = time.monotonic() + self.retry_timeout  # one deadline for every part of the request
            try:
                fut = asyncio.ensure_future(self._send_ids(req, uniq, rows, dtype, lr, step, deadline))
                self._track(name, fut)
                return await fut
            finally:
                if seq is not None:
                    self._release_seq(seq)

        def start():
            self._requests.add(req)
            req.add_done_callback(self._requests.discard)
            req.start(run())

        with self._unacked_lock:  # counted on the caller's thread, so flush() can skip the loop when zero
            self._unacked[name] = self._unacked.get(name, 0) + 1
        req.add_done_callback(lambda _f: self._acked(name))
        self._chans.loop.call_soon_threadsafe(start)
        return req

    async def _take_seq(self) -> int:
        """The next sequence number, keeping every request in flight within the shards' window."""
        from engram_mem.storage.dedup import WINDOW

        if self._seq_free is None:
            self._seq_free = asyncio.Condition()
        async with self._seq_free:
            await self._seq_free.wait_for(lambda: not self._inflight or self._seq + 1 - min(self._inflight) < WINDOW // 2)
            self._seq += 1
            self._inflight.add(self._seq)
            return self._seq

    def _release_seq(self, seq: int) -> None:
        self._inflight.discard(seq)

        async def notify():
            async with self._seq_free:
                self._seq_free.notify_all()

        asyncio.ensure_future(notify())

    async def _send_ids(self, req: WriteFuture, ids, rows, dtype, lr, step, deadline) -> int:
        """Send sorted distinct ids (and their rows) to their shards; retry each shard's part on its
        own (re-split if the placement changed), so a part that succeeded is never sent again. The
        key makes any part sent twice apply once. Past the deadline: req.unresolved(), typed."""
        name = req.table
        policy = RetryPolicy(self.retry_timeout, f"{req.kind} {name!r}", deadline=deadline)
        while True:  # a placement naming a shard this client does not know yet: re-read the cluster
            view = self._view
            try:
                grouped, parts, order = split_by_shard(view.table(name), ids, len(view.shard_ids))
                break
            except StaleEpoch as e:
                if time.monotonic() > deadline:
                    raise req.unresolved(f"gave up after {self.retry_timeout:.0f}s: {e}") from None
                await self._recover(view, e)
                await policy.pause(e)
        data = rows if order is None else rows[order]

        async def part(rank: int, a: int, b: int) -> int:
            policy = RetryPolicy(self.retry_timeout, f"{req.kind} {name!r}", deadline=deadline)
            sid = view.shard_ids[rank]
            req.waiting.add(sid)
            while True:
                v = self._view
                if v.epoch != view.epoch:  # re-routed under the new placement
                    n = await self._send_ids(req, grouped[a:b], data[a:b], dtype, lr, step, deadline)
                    req.waiting.discard(sid)
                    return n
                try:
                    n = await self._send_part(v, req, rank, grouped[a:b], data[a:b], dtype, lr, step)
                    req.waiting.discard(sid)
                    req.acked.add(sid)
                    return n
                except RETRYABLE as e:
                    if isinstance(e, ShardUnavailable) and e.sent:
                        req.touched.add(sid)
                    if time.monotonic() > deadline:
                        raise req.unresolved(f"gave up after {self.retry_timeout:.0f}s: {e}") from None
                    await self._recover(v, e)
                    await policy.pause(e)

        tasks = [asyncio.ensure_future(part(rank, a, b)) for rank, a, b in parts if b > a]
        try:
            replies = await asyncio.gather(*tasks)
        except BaseException as e:
            for t in tasks:  # one part failed or the request was stopped: the others stop too,
                t.cancel()   # and none of them sends anything after this request has ended
            ends = await asyncio.gather(*tasks, return_exceptions=True)
            if isinstance(e, EngramMemError) and not isinstance(e, ShardUnavailable) and _others_may_have_applied(
                    req, ends, e):
                # One shard refused its part (a full disk, ...), but another part was acknowledged or
                # was on its way: telling the caller "refused" would hide an applied part.
                req.touched.update(req.waiting)  # the parts stopped in flight may have been applied
                raise req.unresolved(f"one part was refused ({type(e).__name__}: {e})") from e
            raise
        return int(sum(replies))

    def _acked(self, name: str) -> None:
        with self._unacked_lock:
            self._unacked[name] -= 1

    async def _send_part(self, view, req: WriteFuture, rank, ids, rows, dtype, lr, step) -> int:
        name, kind, key = req.table, req.kind, req.key
        member = view.primary(rank)
        conn = self._connector(member)
        slot_rows = view.table(name).spec.slot_rows
        done = 0
        for a, b in slot_aligned_chunks(ids, slot_rows, max(1, self.max_request_bytes // max(rows.shape[1] * rows.itemsize, 8))):
            if kind == "write":
                done += await conn.write(member, view.epoch, name, ids[a:b], rows[a:b], dtype, key)
            else:
                done += await conn.push(member, view.epoch, name, ids[a:b], rows[a:b], dtype, lr, step, self.worker,
                                        key)
        return done

    def flush(self, name: str | None = None, timeout: float | None = None) -> None:
        """Wait until every write and push sent so far (to table `name`, or to any) is applied."""
        with self._unacked_lock:
            if not any(v for k, v in self._unacked.items() if name is None or k == name):
                return

        async def wait_all():
            for n in ([name] if name is not None else list(self._pending)):
                await self._after_pending(n)

        self._chans.submit(wait_all()).result(timeout)

    async def _after_pending(self, name: str) -> None:
        pending = self._pending.get(name)
        if pending:
            await asyncio.gather(*list(pending), return_exceptions=True)

    def _track(self, name: str, fut: asyncio.Future) -> None:
        s = self._pending.setdefault(name, set())
        s.add(fut)
        fut.add_done_callback(s.discard)


def _others_may_have_applied(req: WriteFuture, ends: list, refused: BaseException) -> bool:
    """After one part's refusal: whether any other part was acknowledged, was stopped in flight, or
    may have reached its shard (any other ending is a refusal too: nothing applied there)."""
    if req.acked or req.touched:
        return True
    for r in ends:
        if r is refused:
            continue
        if not isinstance(r, BaseException) or isinstance(r, (asyncio.CancelledError, MaybeApplied)):
            return True
    return False
