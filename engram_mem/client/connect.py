"""connect(): a MemoryClient of the right memory cluster, starting one where none runs."""

from __future__ import annotations

from engram_mem.client.api import MemoryClient
from engram_mem.config import DEFAULT_NAME, ClusterConfig
from engram_mem.errors import EngramMemError
from engram_mem.security import client_security


def connect(address: str | None = None, shards: int = 2, *, name: str = DEFAULT_NAME,
            retry_timeout: float = 60.0, credential: str | None = None, tls: dict | None = None,
            read_only: bool = False, read_replicas: bool | None = None, data_plane: str | None = None,
            **cluster) -> MemoryClient:
    """A client of a memory cluster.

    - address given: attach to the memory cluster `name` in the Ray cluster at that address.
    - address None, Ray already initialized in this process: attach to `name` there, or start one
      with `shards` shards that lives as long as the client.
    - address None otherwise: attach to the cluster `engram-mem up` started on this machine, or
      start an embedded local Ray cluster (node address 127.0.0.2) with a memory cluster of
      `shards` shards; both live as long as the client.

    credential / tls: for clients that do not get them from the cluster through Ray (auth.py):
    tls = {"ca": path, "cert": path, "key": path (mutual TLS), "server_name": name}. read_only asks
    the cluster for its read-only credential (Gather, Describe, Stats, Health only).
    read_replicas: spread gathers over a replicated shard's members (default: when read_only).
    data_plane: "tcp" or "grpc": how this client moves bulk rows (default: the cluster's setting,
    "tcp": framed TCP where the shards serve it, gRPC otherwise); also the setting of a cluster
    this call starts.

    Extra keyword arguments (data_dir, cpus_per_shard, ...) configure a cluster this call starts.
    """
    sec = dict(retry_timeout=retry_timeout, read_only=read_only, read_replicas=read_replicas, data_plane=data_plane,
               security=client_security(credential, tls) if credential or tls else None)
    if data_plane is not None:
        cluster["data_plane"] = data_plane
    import ray

    from engram_mem.control import local
    from engram_mem.control.controller import get_controller, start_controller

    def own(ctl, shutdown_ray: bool):
        def close():
            try:
                ray.get(ctl.shutdown.remote(), timeout=120)
                ray.kill(ctl, no_restart=True)
            finally:
                if shutdown_ray:
                    ray.shutdown()
        return close

    if address is not None:
        if not ray.is_initialized():
            local.attach_ray(address)
        ctl = get_controller(name)
        if ctl is None:
            raise EngramMemError(f"no memory cluster named {name!r} in the Ray cluster at {address}; "
                                 f"start one with `engram-mem up --address {address}`")
        return MemoryClient(ctl, **sec)
    if ray.is_initialized():
        ctl = get_controller(name)
        if ctl is not None:
            return MemoryClient(ctl, **sec)
        ctl = start_controller(ClusterConfig(name=name, shards=shards, **cluster))
        return MemoryClient(ctl, on_close=own(ctl, False), **sec)
    state = local.read_state(name)
    if state is not None:
        local.attach_ray(state["ray_address"])
        ctl = get_controller(name)
        if ctl is not None:
            return MemoryClient(ctl, on_close=ray.shutdown, **sec)
        ray.shutdown()
    local.init_embedded_ray(shards=shards)
    try:
        ctl = start_controller(ClusterConfig(name=name, shards=shards, **cluster))
    except BaseException:
        ray.shutdown()
        raise
    return MemoryClient(ctl, on_close=own(ctl, True), **sec)
