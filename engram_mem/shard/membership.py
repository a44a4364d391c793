"""Membership: a shard actor's side of replication (a mixin of ShardActor).

A primary ships its changes to its replicas (replication.ReplicaFeed) and tells them to rebuild
after it restarted; a replica follows its primary, or rebuilds from a full copy (`resync`).
"""

from __future__ import annotations

import logging
import threading

from engram_mem.config import NAMESPACE, member_name

log = logging.getLogger("engram_mem.shard.actor")


class Membership:
    def _member_handles(self) -> dict[int, object]:
        import ray

        out = {}
        for k in range(self.cfg.replicas):
            try:
                out[k] = ray.get_actor(member_name(self.cfg.name, self.shard_id, k), namespace=NAMESPACE)
            except ValueError:
                pass
        return out

    def _rebuild_replicas(self) -> None:
        """A restarted primary: its replicas' followers died with it; each re-joins with a full copy."""
        for k, h in self._member_handles().items():
            if k > 0:
                h.resync.remote("")

    def _wait_logged(self, lsn: int) -> None:
        if self.wal is not None and self.wal.written_lsn < lsn:
            self.wal.flush()

    def follow(self, member: str | None, token: str) -> dict:
        """A member (re)joins: register it as a follower (paused until start_follower) and return the
        tables and slots it must copy. member None: only the list (a primary restoring from here)."""
        import ray

        from engram_mem.errors import InvalidArgument, NotReady

        if not self.store.ready:
            raise NotReady(f"shard {self.shard_id} member {self.member} is not ready: {self.store.not_ready_reason}")
        handle = None
        if member is not None:
            if self.feed is None:
                raise InvalidArgument(f"shard {self.shard_id} member {self.member} is not a primary with replicas")
            handle = ray.get_actor(member, namespace=NAMESPACE)
        with self.store.order:
            if handle is not None:
                self.feed.add(member, token, handle, self.store.lsn)
            tables = [{"spec": ts.spec.to_dict(), "optimizer": ts.optimizer_spec.to_dict(), "uid": ts.uid,
                       "slots": ts.owned_slots()} for ts in self.store.tables.values()]
            return {"tables": tables, "epoch": self.store.epoch, "lsn": self.store.lsn}

    def start_follower(self, member: str, token: str) -> bool:
        return self.feed is not None and self.feed.start(member, token)

    def apply_records(self, token: str, records: list) -> bool:
        return self.sync.apply(token, records)

    def resync(self, token: str) -> bool:
        """(Replica) rebuild from the primary by a full copy, in the background: token "" always, else
        only if it names the follower this replica is on (the primary dropped that one)."""
        if self.member == 0 or (token and token != self.sync.token) or not self._syncing.acquire(blocking=False):
            return False
        threading.Thread(target=self._resync_loop, name="engram-resync", daemon=True).start()
        return True

    def _resync_loop(self) -> None:
        import ray

        try:
            while not self._stop.is_set():
                try:
                    primary = ray.get_actor(member_name(self.cfg.name, self.shard_id, 0), namespace=NAMESPACE)
                    self.restore_stats = self.sync.sync(primary)
                    self.error = ""
                    return
                except Exception as e:  # noqa: BLE001 - the primary may be restarting: try again
                    log.warning("shard %d replica %d: copy from the primary failed (%s: %s); retrying",
                                self.shard_id, self.member, type(e).__name__, e)
                    self.store.set_ready(False, f"re-joining its primary: {type(e).__name__}")
                    self._stop.wait(1.0)
        finally:
            self._syncing.release()
