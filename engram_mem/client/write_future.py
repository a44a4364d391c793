"""WriteFuture: a write or push in flight, which ends acknowledged or with a typed error, never both.

    fut = mem.push_async("t", ids, grads, lr=1e-3)
    fut.result()            # rows updated; or Unavailable / MaybeApplied / the shard's own error
    fut.result(timeout=5)   # on timeout its retries stop first, then the typed error is raised
    fut.cancel()            # stops its retries; the future then holds the typed error

Either way a stopped request sends nothing more once its caller has been told: result(timeout)
and cancel() return only after the request's task on the client's loop has ended. What the typed
error says comes from what the request saw: no part acknowledged and every failed attempt known
not to have reached its shard is `Unavailable` (not applied); anything else is `MaybeApplied`,
and its key retries it to exactly one application (the shards de-duplicate by key, dedup.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

from engram_mem.errors import EngramMemError, MaybeApplied, Unavailable


class WriteFuture(concurrent.futures.Future):
    def __init__(self, loop: asyncio.AbstractEventLoop, table: str, kind: str):
        super().__init__()
        self._loop = loop
        self.table, self.kind = table, kind
        self.key: tuple | None = None
        self.touched: set[int] = set()    # shard ids that may hold some of it (sent, no clear answer)
        self.acked: set[int] = set()      # shard ids whose part was acknowledged
        self.waiting: set[int] = set()    # shard ids whose part is not acknowledged yet
        self._task: asyncio.Task | None = None
        self._loop_thread = 0
        self._why = ""

    # ---- loop thread -----------------------------------------------------------------------
    def start(self, coro) -> None:
        """Run coro as this request's task (loop thread); its outcome becomes this future's."""
        self._loop_thread = threading.get_ident()
        self._task = self._loop.create_task(coro)
        self._task.add_done_callback(self._finish)

    def unresolved(self, why: str) -> EngramMemError:
        """The typed error for this request ending unacknowledged now, for reason `why`."""
        what = f"{self.kind} to table {self.table!r} (key {self.key})"
        shards = tuple(sorted(self.waiting))
        where = f"shard {', '.join(map(str, shards))}" if shards else "its shards"
        if self.touched or self.acked:
            return MaybeApplied(f"{what}: {why}; it may have been applied on {where} "
                                f"({len(self.acked)} part(s) acknowledged): retry it with key={self.key} "
                                f"to apply it exactly once", table=self.table, kind=self.kind, key=self.key,
                                shards=shards)
        return Unavailable(f"{what}: {why}; it reached no shard and was not applied ({where})",
                           table=self.table, kind=self.kind, key=self.key, shards=shards)

    def _finish(self, task: asyncio.Task) -> None:
        if self.done():
            return
        if task.cancelled():
            self.set_exception(self.unresolved(self._why or "stopped"))
            return
        e = task.exception()
        if e is None:
            self.set_result(task.result())
        elif isinstance(e, EngramMemError):
            self.set_exception(e)
        else:  # no asyncio, gRPC or Ray type reaches a caller: what is known, with the cause chained
            err = self.unresolved(f"ended by {type(e).__name__}: {e}")
            err.__cause__ = e
            self.set_exception(err)

    def _cancel(self, why: str) -> None:
        """Cancel the request's task (loop thread); _finish then ends the future with the typed error."""
        if self._task is not None and not self._task.done():
            self._why = why
            self._task.cancel()

    async def stop_here(self, why: str) -> None:
        """Stop the request from the loop thread and wait until its task has ended."""
        self._cancel(why)
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    # ---- any thread but the loop's -------------------------------------------------------------
    def stop(self, why: str) -> bool:
        """Stop retrying; return once nothing more will be sent. True if it ended unacknowledged here."""
        if self.done():
            return False
        if threading.get_ident() == self._loop_thread:
            raise RuntimeError("WriteFuture.stop/cancel/result(timeout) on the client's own loop thread would "
                               "wait on itself; use stop_here there")
        self._loop.call_soon_threadsafe(self._cancel, why)
        concurrent.futures.wait([self])  # _finish runs once the task has ended: nothing more is sent
        return self.exception() is not None

    def cancel(self) -> bool:
        return self.stop("cancelled by the caller")

    def result(self, timeout: float | None = None):
        try:
            return super().result(timeout)
        except concurrent.futures.TimeoutError:
            self.stop(f"the caller's timeout of {timeout}s passed")
            return super().result()
