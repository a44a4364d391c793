"""Members: which shard member a request goes to, and finding a restarted one again.

After a retryable error the client re-reads the placement (StaleEpoch) or the failed
members' new addresses from their own Ray actors (a restarted shard listens on a new port),
so this works while the controller is down. Reads of a replicated shard try members in order
(rotated for a client that spreads reads) and skip one that just failed for a second.
"""

from __future__ import annotations

import asyncio
import logging
import time

from engram_mem.client.routing import ClusterView
from engram_mem.errors import ShardUnavailable, StaleEpoch

log = logging.getLogger("engram_mem.client.members")


class Members:
    """The members half of MemoryClient (a mixin: the state is MemoryClient.__init__'s)."""

    async def _recover(self, view: ClusterView, e: Exception) -> None:
        """After a retryable error: a new placement (StaleEpoch), or new shard addresses (a shard
        restarted). Shards are found through their own Ray actors, so this works while the
        controller is down."""
        loop = asyncio.get_running_loop()
        try:
            if isinstance(e, StaleEpoch):
                await loop.run_in_executor(None, self.refresh)
            elif isinstance(e, ShardUnavailable):
                # Only the failed address gets a new channel: the others carry other requests' calls.
                if e.address:
                    self._forget(e.address)
                await loop.run_in_executor(None, self._relocate, view)
        except Exception as err:  # noqa: BLE001 - the controller or an actor is restarting: retried
            log.debug("recovering from %s: %s", e, err)

    def _relocate(self, view: ClusterView, only: list[dict] | None = None) -> None:
        """Re-read the address of every member (or of `only`) of `view` from its actor (waits while one restarts)."""
        from engram_mem.config import NAMESPACE

        ray = self._ray
        members = only if only is not None else [m for r in range(len(view.shard_ids)) for m in view.members(r)]
        refs = []
        for m in members:
            try:
                refs.append((m, ray.get_actor(m.get("actor"), namespace=NAMESPACE).info.remote()))
            except (ValueError, TypeError):  # gone: the cluster was re-sharded; the controller knows
                self.refresh()
                return
        for m, ref in refs:
            try:
                info = ray.get(ref, timeout=self.retry_timeout)
            except Exception as err:  # noqa: BLE001 - keep the old address; the caller retries
                log.debug("%s: %s", m.get("actor"), err)
                continue
            with self._view_lock:
                if self._view.epoch == view.epoch and info["shard_id"] in self._view.shards:
                    self._view = self._view.with_shard(info)

    def _read_members(self, view: ClusterView, rank: int, spread: bool | None = None) -> list[dict]:
        """The members to read shard `rank` from, in the order to try them: members not marked down
        first (rotated for a read that spreads, else the primary first), then the others.
        spread: None reads as this client does (`read_replicas`)."""
        members = view.members(rank)
        if len(members) == 1:
            return members
        now = time.monotonic()
        up = [m for m in members if self._down.get(m["address"], 0.0) <= now]
        if (self.read_replicas if spread is None else spread) and len(up) > 1:
            k = self._rr[rank] % len(up)  # each shard's own turn: with a counter shared by all shards,
            self._rr[rank] += 1           # 2 shards x 2 members would always read shard 0's primary
            up = up[k:] + up[:k]
        return up + [m for m in members if m not in up]

    def member_up(self, address: str) -> bool:
        return self._down.get(address, 0.0) <= time.monotonic()

    def _mark_down(self, view: ClusterView, member: dict, e: Exception) -> None:
        """Skip a member that failed a read for a second; look up a dead one's new address meanwhile."""
        self.failovers += 1
        address = member["address"]
        self._down[address] = time.monotonic() + 1.0
        log.debug("read from %s failed (%s); next member", address, e)
        if isinstance(e, ShardUnavailable) and address not in self._relocating:
            self._relocating.add(address)
            self._forget(address)

            def relocate():
                try:
                    self._relocate(view, [member])
                finally:
                    self._relocating.discard(address)

            asyncio.get_running_loop().run_in_executor(None, relocate)
