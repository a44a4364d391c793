"""A memory cluster on this machine: the embedded one `connect()` starts, and the one `engram-mem up` keeps.

Ray replaces 127.0.0.1 by the machine's network address, so local clusters use the loopback
address 127.0.0.2 for their node (a simulated second node would be 127.0.0.3).

`engram-mem up` (without --address) runs `python -m engram_mem.local serve ...` in the
background: that process starts a local Ray cluster and a detached memory cluster in it, writes
a state file (~/.engram-mem/<name>.json: Ray address, its pid) and waits; `engram-mem down`
signals it, and it shuts the memory cluster and Ray down cleanly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

LOCAL_NODE_IP = "127.0.0.2"
SECURITY_ENV = "ENGRAM_MEM_SECURITY"  # JSON of auth.Security from `engram-mem up` (kept off the command line)
STATE_DIR = os.path.expanduser(os.environ.get("ENGRAM_MEM_HOME", "~/.engram-mem"))


def state_path(name: str) -> str:
    return os.path.join(STATE_DIR, f"{name}.json")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def read_state(name: str) -> dict | None:
    """The state file of a running `engram-mem up` cluster, or None (stale files are removed)."""
    path = state_path(name)
    try:
        with open(path) as f:
            state = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if not _alive(int(state.get("pid", -1))):
        os.unlink(path)
        return None
    return state


def attach_ray(address: str) -> None:
    """Join a running Ray cluster as a driver.

    Ray (2.59+) turns token auth on for the local clusters it starts, but a driver that joins by
    address only sends the token (~/.ray/auth_token) when RAY_AUTH_MODE=token. Unless the user
    chose a mode, turn token mode on when a token exists, as Ray itself does for address="auto".
    """
    import ray

    if "RAY_AUTH_MODE" not in os.environ:
        try:
            from ray._private.authentication.authentication_token_setup import (
                maybe_enable_token_auth_if_token_available)

            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        except ImportError:  # an older Ray without token auth
            pass
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)


def init_embedded_ray(shards: int = 2, num_cpus: int | None = None, object_store_bytes: int = 1 << 30) -> None:
    """Start a local Ray cluster owned by this process, on the loopback node address."""
    import ray

    ray.init(address="local", _node_ip_address=LOCAL_NODE_IP, include_dashboard=False,
             num_cpus=num_cpus if num_cpus is not None else max(4, shards + 2),
             object_store_memory=object_store_bytes, logging_level=logging.WARNING, log_to_driver=False,
             configure_logging=True)


def serve(name: str, shards: int, tables: str | None, cluster: dict) -> None:
    """Body of the background process behind `engram-mem up`."""
    import ray

    from engram_mem.config import ClusterConfig
    from engram_mem.controller import get_controller, start_controller

    if os.environ.get(SECURITY_ENV):
        cluster = dict(cluster, security=json.loads(os.environ.pop(SECURITY_ENV)))
    init_embedded_ray(shards=shards)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    ctl = None
    try:
        ctl = start_controller(ClusterConfig(name=name, shards=shards, **cluster), detached=True)
        if tables:
            create_tables_from_file(ctl, tables)
        os.makedirs(STATE_DIR, exist_ok=True)
        ctx = ray.get_runtime_context()
        state = {"name": name, "pid": os.getpid(), "ray_address": ctx.gcs_address, "shards": shards}
        tmp = state_path(name) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, state_path(name))
        print(json.dumps(state), flush=True)
        stop.wait()
    finally:
        try:
            os.unlink(state_path(name))
        except FileNotFoundError:
            pass
        ctl = ctl or get_controller(name)
        if ctl is not None:
            try:
                ray.get(ctl.shutdown.remote(), timeout=120)
            finally:
                ray.kill(ctl, no_restart=True)
        ray.shutdown()


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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m engram_mem.local")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--name", required=True)
    s.add_argument("--shards", type=int, required=True)
    s.add_argument("--tables")
    s.add_argument("--cluster", default="{}", help="JSON of extra ClusterConfig fields")
    args = p.parse_args(argv)
    serve(args.name, args.shards, args.tables, json.loads(args.cluster))


if __name__ == "__main__":
    sys.exit(main())
