"""Supervisor: the shard actors of a memory cluster: start them where they belong, find them, stop them.

Shards are detached named actors (`<cluster>-shard-<id>`), so they never die with the process that
created them (the controller, or `engram-mem up`), and Ray restarts one whose process dies
(`max_restarts=-1`; the shard restores itself in its constructor, see actor.py). Their placement
groups are detached and named too, so a restarted controller finds everything again by name.

    sup = Supervisor(cfg, cluster_id)
    handles = sup.start_shards([0, 1])       # {shard id: actor handle}, all answering
    with sup.frozen(handles):                # writes and pushes wait (NotReady) inside
        ...
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time

from engram_mem.config import NAMESPACE, ClusterConfig

log = logging.getLogger("engram_mem.supervisor")


class Supervisor:
    def __init__(self, cfg: ClusterConfig, cluster_id: str):
        self.cfg, self.cluster_id = cfg, cluster_id

    def shard_name(self, sid: int) -> str:
        return f"{self.cfg.name}-shard-{sid}"

    def _pg_name(self, sid: int) -> str:
        return f"{self.cfg.name}-{self.cluster_id}-pg-{sid}"

    # ---- starting and finding ---------------------------------------------------------------
    def start_shards(self, ids: list[int], timeout: float = 600) -> dict[int, object]:
        """Start shards `ids` (one placement-group bundle each, spread over nodes) and wait until each
        has restored itself. Raises CorruptData (or the shard's error) if one could not."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from engram_mem.actor import ShardActor
        from engram_mem.errors import ERROR_CLASSES, EngramMemError

        if not ids:
            return {}
        bundle = {"CPU": max(self.cfg.cpus_per_shard, 0.001), **(self.cfg.shard_resources or {})}
        # One group for the new shards so that SPREAD places them on different nodes where it can; it is
        # named after the first shard, and each shard remembers it by that name.
        pg = placement_group([bundle] * len(ids), strategy=self.cfg.placement_strategy,
                             name=self._pg_name(ids[0]), lifetime="detached")
        ray.get(pg.ready(), timeout=120)
        handles = {}
        for i, sid in enumerate(ids):
            handles[sid] = ray.remote(ShardActor).options(
                name=self.shard_name(sid), namespace=NAMESPACE, lifetime="detached",
                num_cpus=self.cfg.cpus_per_shard, max_restarts=-1, max_task_retries=-1, max_concurrency=4,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
            ).remote(sid, self.cfg.to_dict(), self.cluster_id)
        infos = ray.get([h.info.remote() for h in handles.values()], timeout=timeout)
        errors = [i for i in infos if i.get("error")]
        if errors:  # shards that could not restore are up but not ready: stop them (their /dev/shm files too)
            self.stop(handles)
            ray.util.remove_placement_group(pg)
            if self.cfg.shm_dir:
                shutil.rmtree(os.path.join(self.cfg.shm_dir, self.cluster_id), ignore_errors=True)
            first = errors[0]["error"]
            cls_name, _, msg = first.partition(": ")
            raise ERROR_CLASSES.get(cls_name, EngramMemError)(f"shard {errors[0]['shard_id']} could not start: {msg}")
        return handles

    def find(self, sid: int):
        """The live (or restarting) actor of shard sid, or None."""
        import ray

        try:
            return ray.get_actor(self.shard_name(sid), namespace=NAMESPACE)
        except ValueError:
            return None

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
        for pg_id, info in placement_group_table().items():
            name = info.get("name", "")
            if name.startswith(prefix) and info.get("state") != "REMOVED":
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
