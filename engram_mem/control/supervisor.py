"""Supervisor: the shard actors of a memory cluster: start them where they belong, find them, stop them.

Shards are detached named actors (`<cluster>-shard-<id>`), so they never die with the process that
created them (the controller, or `engram-mem up`), and Ray restarts one whose process dies
(`max_restarts=-1`; the shard restores itself in its constructor, see actor.py). Their placement
groups are detached and named too, so a restarted controller finds everything again by name.

    sup = Supervisor(cfg, cluster_id)
    handles = sup.start_shards([0, 1])       # {shard id: actor handle}, all answering
    with sup.frozen(handles):                # writes and pushes wait (NotReady) inside
        ...

With `replicas=R > 1` each shard gets its own placement group of R bundles, STRICT_SPREAD: its
primary and its R-1 replicas (`start_replicas`, after the primaries) on R different nodes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import time

from engram_mem.config import NAMESPACE, ClusterConfig

log = logging.getLogger("engram_mem.control.supervisor")


def _error_class_of(msg: str):
    """The typed error for a shard's start that failed with an OSError: ResourceExhausted for a full disk
    (ENOSPC, EDQUOT), as the write-ahead log reports one; None for other errors."""
    from engram_mem.errors import ResourceExhausted

    if any(f"[Errno {n}]" in msg for n in (errno.ENOSPC, errno.EDQUOT)):
        return ResourceExhausted
    return None


class Supervisor:
    def __init__(self, cfg: ClusterConfig, cluster_id: str):
        self.cfg, self.cluster_id = cfg, cluster_id

    def shard_name(self, sid: int, member: int = 0) -> str:
        from engram_mem.config import member_name

        return member_name(self.cfg.name, sid, member)

    def _pg_name(self, sid: int) -> str:
        return f"{self.cfg.name}-{self.cluster_id}-pg-{sid}"

    def _set_pg_name(self, sid: int) -> str:
        return f"{self.cfg.name}-{self.cluster_id}-set-{sid}"

    def _bundle(self) -> dict:
        return {"CPU": max(self.cfg.cpus_per_shard, 0.001), **(self.cfg.shard_resources or {})}

    def _member_groups(self, ids: list[int]) -> dict[int, object]:
        """Replicated shards: one STRICT_SPREAD group of R bundles per shard, so its members land on R
        different nodes. Refuses up front when the Ray cluster has fewer nodes than that."""
        import ray
        from ray.util.placement_group import placement_group

        from engram_mem.errors import InvalidArgument

        r = self.cfg.replicas
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if len(nodes) < r:
            raise InvalidArgument(f"replicas={r} puts each shard's members on {r} different nodes, but the Ray "
                                  f"cluster has {len(nodes)} node(s); add nodes or lower --replicas")
        pgs = {sid: placement_group([self._bundle()] * r, strategy="STRICT_SPREAD", name=self._set_pg_name(sid),
                                    lifetime="detached") for sid in ids}
        try:
            ray.get([pg.ready() for pg in pgs.values()], timeout=120)
        except Exception:
            for pg in pgs.values():
                ray.util.remove_placement_group(pg)
            raise InvalidArgument(f"replicas={r}: Ray could not place {len(ids)} shard(s) on {r} different nodes "
                                  f"each with {self._bundle()} (STRICT_SPREAD); see `ray status`") from None
        return pgs

    # ---- starting and finding ---------------------------------------------------------------
    def start_shards(self, ids: list[int], timeout: float = 600) -> dict[int, object]:
        """Start shards `ids` (one placement-group bundle each, spread over nodes) and wait until each
        has restored itself. Raises CorruptData (or the shard's error) if one could not."""
        import ray
        from ray.util.placement_group import placement_group

        from engram_mem.shard.actor import ShardActor
        from engram_mem.errors import ERROR_CLASSES, EngramMemError

        if not ids:
            return {}
        if self.cfg.replicas > 1:
            groups = self._member_groups(ids)
            where = {sid: (groups[sid], 0) for sid in ids}
        else:
            # One group for the new shards so that SPREAD places them on different nodes where it can; it is
            # named after the first shard, and each shard remembers it by that name.
            pg = placement_group([self._bundle()] * len(ids), strategy=self.cfg.placement_strategy,
                                 name=self._pg_name(ids[0]), lifetime="detached")
            ray.get(pg.ready(), timeout=120)
            groups = {ids[0]: pg}
            where = {sid: (pg, i) for i, sid in enumerate(ids)}
        handles = {sid: self._start_member(ShardActor, sid, 0, *where[sid]) for sid in ids}
        infos = ray.get([h.info.remote() for h in handles.values()], timeout=timeout)
        errors = [i for i in infos if i.get("error")]
        if errors:  # shards that could not restore are up but not ready: stop them (their /dev/shm files too)
            self.stop(handles)
            for pg in groups.values():
                ray.util.remove_placement_group(pg)
            self._remove_shm(ids)
            first = errors[0]["error"]
            cls_name, _, msg = first.partition(": ")
            cls = ERROR_CLASSES.get(cls_name) or _error_class_of(msg) or EngramMemError
            raise cls(f"shard {errors[0]['shard_id']} could not start: {msg}")
        return handles

    def _remove_shm(self, ids: list[int]) -> None:
        """The /dev/shm files of shards `ids` (and their replicas), and the cluster's directory once
        empty: the files of other shards that serve meanwhile (a scale's new shards failed) stay."""
        if not self.cfg.shm_dir:
            return
        from engram_mem.storage.frames import member_dir

        top = os.path.join(self.cfg.shm_dir, self.cluster_id)
        for sid in ids:
            for m in range(max(1, self.cfg.replicas)):
                shutil.rmtree(os.path.join(top, member_dir(sid, m)), ignore_errors=True)
        try:
            os.rmdir(top)
        except OSError:  # missing, or other shards' files in it
            pass

    def _start_member(self, actor_cls, sid: int, member: int, pg, bundle: int):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return ray.remote(actor_cls).options(
            name=self.shard_name(sid, member), namespace=NAMESPACE, lifetime="detached",
            num_cpus=self.cfg.cpus_per_shard, max_restarts=-1, max_task_retries=-1, max_concurrency=4,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle),
        ).remote(sid, self.cfg.to_dict(), self.cluster_id, member)

    def start_replicas(self, ids: list[int], timeout: float = 600) -> dict[int, list]:
        """The replicas of shards `ids` (their primaries serve already), each in its shard's group;
        returns {shard id: [replica handles]} once every one has copied its primary."""
        import ray

        from engram_mem.shard.actor import ShardActor

        if self.cfg.replicas <= 1 or not ids:
            return {}
        out = {sid: [self._start_member(ShardActor, sid, k, ray.util.get_placement_group(self._set_pg_name(sid)), k)
                     for k in range(1, self.cfg.replicas)] for sid in ids}
        self.wait_ready([h for hs in out.values() for h in hs], timeout)
        return out

    def wait_ready(self, handles: list, timeout: float = 600) -> list[dict]:
        """Wait until every member in `handles` reports ready (replicas copy their primary first)."""
        import ray

        from engram_mem.errors import ShardUnavailable

        deadline = time.time() + timeout
        while True:
            infos = ray.get([h.info.remote() for h in handles], timeout=max(1.0, deadline - time.time()))
            if all(i["ready"] for i in infos):
                return infos
            if time.time() > deadline:
                late = [f"shard {i['shard_id']} member {i['member']}" for i in infos if not i["ready"]]
                raise ShardUnavailable(f"not ready within {timeout:.0f}s: {', '.join(late)}")
            time.sleep(0.2)

    def find(self, sid: int, member: int = 0):
        """The live (or restarting) actor of shard sid's member, or None."""
        import ray

        try:
            return ray.get_actor(self.shard_name(sid, member), namespace=NAMESPACE)
        except ValueError:
            return None

    def find_replicas(self, sids) -> dict[int, list]:
        out = {}
        for sid in sids:
            hs = [self.find(sid, k) for k in range(1, self.cfg.replicas)]
            if any(h is not None for h in hs):
                out[sid] = [h for h in hs if h is not None]
        return out

    def find_all(self, limit: int = 4096) -> dict[int, object]:
        out = {}
        for sid in range(limit):
            h = self.find(sid)
            if h is None:
                break
            out[sid] = h
        return out

    def stop(self, handles: dict[int, object], grace: float = 2.0) -> None:
        """Stop shards for good (no restart); the caller then releases unused placement groups."""
        import ray

        refs = [h.stop.remote(grace) for h in handles.values()]
        try:
            ray.get(refs, timeout=120)
        except Exception as e:  # noqa: BLE001 - a dead shard cannot stop cleanly; kill it anyway
            log.warning("stopping shards: %s", e)
        for h in handles.values():
            ray.kill(h, no_restart=True)

    def remove_unused_groups(self, live: set[int]) -> None:
        """Remove this cluster's placement groups none of the `live` shards use."""
        import ray
        from ray.util import placement_group_table

        prefix = f"{self.cfg.name}-{self.cluster_id}-pg-"
        set_prefix = f"{self.cfg.name}-{self.cluster_id}-set-"
        for pg_id, info in placement_group_table().items():
            name = info.get("name", "")
            if name.startswith(set_prefix) and info.get("state") != "REMOVED":
                if int(name[len(set_prefix):]) not in live:
                    ray.util.remove_placement_group(ray.util.get_placement_group(name))
            elif name.startswith(prefix) and info.get("state") != "REMOVED":
                first = int(name[len(prefix):])
                n = len(info.get("bundles", {}))
                if not any(first <= s < first + n for s in live):
                    ray.util.remove_placement_group(ray.util.get_placement_group(name))

    # ---- freezing writes --------------------------------------------------------------------
    @contextlib.contextmanager
    def frozen(self, handles: dict[int, object]):
        """Writes and pushes are refused with NotReady (clients retry) inside; reads go on.
        Yields the seconds the freeze took to set up; the caller reads the pause from time."""
        import ray

        t0 = time.perf_counter()
        ray.get([h.freeze_writes.remote(True) for h in handles.values()])
        try:
            yield t0
        finally:
            ray.get([h.freeze_writes.remote(False) for h in handles.values()])
