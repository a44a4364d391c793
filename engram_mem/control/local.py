"""A memory cluster on this machine: the embedded one `connect()` starts, and the one `engram-mem up` keeps.

Ray replaces 127.0.0.1 by the machine's network address, so local clusters use the loopback
address 127.0.0.2 for their node (a simulated second node would be 127.0.0.3).

`engram-mem up` (without --address) starts a Ray head with `ray start --head` (its own daemons,
session directory under /tmp and ports), creates the memory cluster in it as
detached actors, writes a state file (~/.engram-mem/<name>.json) and exits: no process of
`up` stays behind for the cluster to depend on. `engram-mem down` shuts the memory cluster down
and stops exactly that Ray cluster's processes (never other Ray clusters on the machine), and
removes the cluster's shared-memory files even if its shards died.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time

LOCAL_NODE_IP = "127.0.0.2"
STATE_DIR = os.path.expanduser(os.environ.get("ENGRAM_MEM_HOME", "~/.engram-mem"))


def state_path(name: str) -> str:
    return os.path.join(STATE_DIR, f"{name}.json")


def ray_dir(name: str) -> str:
    """Ray's session directory for the `up` cluster `name`: short (Ray's socket paths must stay under
    108 bytes) and unique to this state directory and name (its processes are found by it)."""
    import hashlib

    return f"/tmp/engram-mem-ray-{hashlib.sha1(f'{STATE_DIR}/{name}'.encode()).hexdigest()[:12]}"


def _ray_processes(name: str):
    """The processes of the Ray cluster `up` started for `name` (their command lines name its directory)."""
    import psutil

    mark = ray_dir(name)
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(mark in a for a in (p.info["cmdline"] or [])):
                yield p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


def read_state(name: str) -> dict | None:
    """The state file of a running `engram-mem up` cluster, or None (stale files are removed)."""
    path = state_path(name)
    try:
        with open(path) as f:
            state = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if not any(True for _ in _ray_processes(name)):
        os.unlink(path)
        return None
    return state


def write_state(name: str, state: dict) -> None:
    os.makedirs(STATE_DIR, exist_ok=True)
    tmp = state_path(name) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, state_path(name))


def attach_ray(address: str) -> None:
    """Join a running Ray cluster as a driver.

    Ray (2.59+) turns token auth on for the local clusters it starts, but a driver that joins by
    address only sends the token (~/.ray/auth_token) when RAY_AUTH_MODE=token. Unless the user
    chose a mode, turn token mode on when a token exists, as Ray itself does for address="auto".
    """
    import ray

    _use_token_auth()
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)


def _use_token_auth() -> None:
    """Unless the user chose a RAY_AUTH_MODE: token mode when a token exists (for this process and
    the `ray start` processes it runs), as Ray itself does for address="auto"."""
    if "RAY_AUTH_MODE" not in os.environ:
        try:
            from ray._private.authentication.authentication_token_setup import (
                maybe_enable_token_auth_if_token_available)

            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        except ImportError:  # an older Ray without token auth
            pass


def init_embedded_ray(shards: int = 2, num_cpus: int | None = None, object_store_bytes: int = 1 << 30) -> None:
    """Start a local Ray cluster owned by this process, on the loopback node address."""
    import ray

    ray.init(address="local", _node_ip_address=LOCAL_NODE_IP, include_dashboard=False,
             num_cpus=num_cpus if num_cpus is not None else max(4, shards + 2),
             object_store_memory=object_store_bytes, logging_level=logging.WARNING, log_to_driver=False,
             configure_logging=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL_NODE_IP, 0))
        return s.getsockname()[1]


def start_ray_head(name: str, shards: int, object_store_bytes: int = 1 << 30, nodes: int = 1) -> str:
    """`ray start --head` on the loopback node address, with this cluster's own directory and ports;
    nodes > 1 adds Ray nodes at the next loopback addresses (replicas need one node per member)."""
    os.makedirs(ray_dir(name), exist_ok=True)
    port = _free_port()
    cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head",
           f"--node-ip-address={LOCAL_NODE_IP}", f"--port={port}", f"--num-cpus={max(4, shards + 2)}",
           f"--object-store-memory={object_store_bytes}", f"--temp-dir={ray_dir(name)}",
           f"--ray-client-server-port={_free_port()}", f"--dashboard-port={_free_port()}",
           "--include-dashboard=false", "--disable-usage-stats"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if out.returncode != 0:
        raise RuntimeError(f"`ray start --head` failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    address = f"{LOCAL_NODE_IP}:{port}"
    if nodes > 1:
        _use_token_auth()  # the head made a token if there was none: the other nodes present it
    for i in range(1, nodes):  # more simulated nodes on this machine: 127.0.0.3, 127.0.0.4, ...
        ip = f"127.0.0.{2 + i}"
        cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", f"--address={address}",
               f"--node-ip-address={ip}", f"--num-cpus={max(4, shards + 2)}",
               f"--object-store-memory={object_store_bytes}", f"--temp-dir={ray_dir(name)}", "--disable-usage-stats"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        if out.returncode != 0:
            raise RuntimeError(f"`ray start` of node {ip} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return address


def stop_ray_head(name: str, grace: float = 3.0) -> int:
    """Stop the Ray processes of this cluster (SIGTERM, then SIGKILL after `grace` seconds). Returns how
    many there were. By now the memory cluster has shut down (or could not): nothing of ours is
    waiting to be written, and Ray's gcs_server and raylet take ~30 s to act on SIGTERM (measured
    with Ray 2.60), so the grace is short. A process that has exited but whose parent does not reap
    it (a zombie) counts as stopped."""
    import psutil

    procs = list(_ray_processes(name))
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    alive, deadline = procs, time.time() + grace
    while alive and time.time() < deadline:
        _, alive = psutil.wait_procs(alive, timeout=0.2)
        alive = [p for p in alive if not _exited(p)]
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    shutil.rmtree(ray_dir(name), ignore_errors=True)
    return len(procs)


def _exited(p) -> bool:
    import psutil

    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def up(name: str, shards: int, tables: str | None, cluster: dict) -> dict:
    """Start a Ray head and a detached memory cluster in it; returns the state written."""
    import ray

    from engram_mem.config import ClusterConfig
    from engram_mem.control.controller import start_controller

    cfg = ClusterConfig(name=name, shards=shards, **cluster)
    address = start_ray_head(name, shards, nodes=cfg.replicas)
    try:
        attach_ray(address)
        ctl = start_controller(cfg, detached=True)
        if tables:
            create_tables_from_file(ctl, tables)
        cluster_id = ray.get(ctl.ping.remote())
        state = {"name": name, "ray_address": address, "shards": shards, "cluster_id": cluster_id,
                 "shm_dir": cfg.shm_dir}
        write_state(name, state)
        return state
    except BaseException:
        ray.shutdown()
        stop_ray_head(name)
        raise
    finally:
        ray.shutdown()


def remove_shm(state: dict) -> None:
    """The cluster's shared-memory files, also when its shards died without cleaning up."""
    if state.get("shm_dir") and state.get("cluster_id"):
        shutil.rmtree(os.path.join(state["shm_dir"], state["cluster_id"]), ignore_errors=True)


def create_tables_from_file(ctl, path: str) -> None:
    """Tables file: JSON list of {"name", "rows", "dim", "dtype"?, "seed"?, "optimizer"?, ...}."""
    import ray

    from engram_mem.table import TableSpec

    with open(path) as f:
        doc = json.load(f)
    for t in doc["tables"] if isinstance(doc, dict) else doc:
        t = dict(t)
        opt = t.pop("optimizer", None)
        if isinstance(opt, str):
            opt = {"name": opt}
        ray.get(ctl.create_table.remote(TableSpec(**t).to_dict(), opt, True))


def wait_gone(name: str, timeout: float = 30) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not any(True for _ in _ray_processes(name)):
            return True
        time.sleep(0.2)
    return False
