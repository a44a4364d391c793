"""RetryPolicy: how long and how a client keeps retrying a request that met a passing condition.

Retryable: a stale placement (re-read it at once), a shard starting or restoring (NotReady), a
shard unreachable (restarting: find its new address). Everything else is the caller's error.

    policy = RetryPolicy(timeout=60.0, what="push 't'")
    while True:
        try: return await attempt()
        except RETRYABLE as e:
            policy.give_up_if_late(e)
            await recover(e)
            await policy.pause(e)
"""

from __future__ import annotations

import asyncio
import time

from engram_mem.errors import NotReady, ShardUnavailable, StaleEpoch


RETRYABLE = (StaleEpoch, NotReady, ShardUnavailable)


class RetryPolicy:
    def __init__(self, timeout: float, what: str, deadline: float | None = None,
                 first_delay: float = 0.02, max_delay: float = 0.5):
        self.timeout, self.what = timeout, what
        self.deadline = deadline if deadline is not None else time.monotonic() + timeout
        self.delay, self.max_delay = first_delay, max_delay

    def give_up_if_late(self, e: Exception) -> None:
        """Raise e (as its own type, saying how long was tried) once the deadline has passed."""
        if time.monotonic() > self.deadline:
            raise type(e)(f"{self.what}: gave up after {self.timeout:.0f}s: {e}") from e

    async def pause(self, e: Exception) -> None:
        """Back off exponentially, except after a stale placement (the new one is ready at once)."""
        if not isinstance(e, StaleEpoch):
            await asyncio.sleep(self.delay)
            self.delay = min(self.delay * 2, self.max_delay)
