"""A memory cluster on this machine: the embedded one `connect()` starts, and the one `engram-mem up` keeps.

Ray replaces 127.0.0.1 by the machine's network address, so local clusters use the loopback
address 127.0.0.2 for their node (a simulated second node would be 127.0.0.3).

`engram-mem up` (without --address) starts a Ray head with `ray start --head` (its own daemons,
session directory under /tmp and ports), creates the memory cluster in it as
detached actors, writes a state file (~/.engram-mem/<name>.json) and exits: no process of
`up` stays behind for the cluster to depend on. `engram-mem down` shuts the memory cluster down
and stops exactly that Ray cluster's processes (never other Ray clusters on the machine), and
removes the cluster's shared-memory files even if its shards died.

An `up` can die at any point of its start (kill -9 included), so it writes the state file before
it starts anything (phase "starting": its own pid, the Ray directory, the cluster id that names
the /dev/shm directory) and adds each `ray start`'s pid before waiting on it. Every process of
that Ray cluster carries ENGRAM_MEM_RAY_DIR=<its Ray directory> in its environment (Ray's daemons,
agents and workers inherit it from `ray start`) or, where a process title has overwritten what
/proc shows of the environment, keeps a log file in that directory open. Some of them (the client
server, the dashboard and runtime-env agents) name neither the directory nor the cluster in their
command line, outlive their raylet re-parented to init, and ignore SIGTERM. `down` (`teardown`)
finds them all by the mark, stops them (SIGKILL after a short grace), and is bounded in time.
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
import uuid

LOCAL_NODE_IP = "127.0.0.2"
STATE_DIR = os.path.expanduser(os.environ.get("ENGRAM_MEM_HOME", "~/.engram-mem"))
MARK = "ENGRAM_MEM_RAY_DIR"  # in the environment of every process of an `up` cluster's Ray


def state_path(name: str) -> str:
    return os.path.join(STATE_DIR, f"{name}.json")


def ray_dir(name: str) -> str:
    """Ray's session directory for the `up` cluster `name`: short (Ray's socket paths must stay under
    108 bytes) and unique to this state directory and name (its processes are found by it)."""
    import hashlib

    return f"/tmp/engram-mem-ray-{hashlib.sha1(f'{STATE_DIR}/{name}'.encode()).hexdigest()[:12]}"


def ray_processes(name: str) -> list:
    """The live processes of the Ray cluster `up` started for `name`: those with its mark in their
    environment, its directory in their command line, or, titled ray::..., a file in its directory
    open (Ray's agents and workers set their process title, which overwrites the environment /proc
    shows, but keep their log files open). Zombies are excluded: they are already gone."""
    import psutil

    mark, me = ray_dir(name), os.getpid()
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "environ", "status"]):
        try:
            if p.pid == me or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmd = p.info["cmdline"] or []
            if ((p.info["environ"] or {}).get(MARK) == mark or any(mark in a for a in cmd)
                    or (cmd[:1] and cmd[0].startswith("ray::") and _has_open(p.pid, mark))):
                found.append(p)  # (a driver attached to the cluster has its log files open too: not ours)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _has_open(pid: int, prefix: str) -> bool:
    """Whether process `pid` has a file under `prefix` open (deleted since, or not)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                return True
        except OSError:
            continue
    return False


def load_state(name: str) -> dict | None:
    """The state file as written, whatever it describes (None: no file, or one torn mid-write)."""
    try:
        with open(state_path(name)) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_state(name: str) -> dict | None:
    """The state of a running `engram-mem up` cluster, or None: no state file, a start still under
    way or interrupted, or a Ray whose GCS does not accept connections. A stale file stays for
    `up` and `down` to clean up after."""
    state = load_state(name)
    if state is None or state.get("phase", "up") != "up" or not gcs_listening(state.get("ray_address")):
        return None
    return state


def gcs_listening(address: str | None, timeout: float = 1.0) -> bool:
    if not address:
        return False
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def write_state(name: str, state: dict) -> None:
    os.makedirs(STATE_DIR, exist_ok=True)
    tmp = state_path(name) + f".tmp{os.getpid()}"
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


WORKER_NICENESS = "RAY_worker_niceness"


def level_worker_niceness(env: dict | None = None) -> dict:
    """Ray starts its worker processes, and so every shard and fetch agent, at nice 15 (its
    `worker_niceness`), behind a driver's threads: a woken fetch then waits out the model's time
    slice on a shared core. A Ray that engram-mem starts runs them at 0, level with the model
    (unless RAY_worker_niceness is set already); agent_nice / shard_nice go further. Sets it in
    `env` (os.environ by default) and returns it."""
    env = os.environ if env is None else env
    env.setdefault(WORKER_NICENESS, "0")
    return env


def init_embedded_ray(shards: int = 2, num_cpus: int | None = None, object_store_bytes: int = 1 << 30) -> None:
    """Start a local Ray cluster owned by this process, on the loopback node address."""
    import ray

    level_worker_niceness()
    ray.init(address="local", _node_ip_address=LOCAL_NODE_IP, include_dashboard=False,
             num_cpus=num_cpus if num_cpus is not None else max(4, shards + 2),
             object_store_memory=object_store_bytes, logging_level=logging.WARNING, log_to_driver=False,
             configure_logging=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL_NODE_IP, 0))
        return s.getsockname()[1]


def _ray_start(name: str, cmd: list[str], what: str, state: dict | None) -> None:
    """Run one `ray start` with the cluster's mark; its pid goes into the state file before the wait."""
    env = level_worker_niceness(dict(os.environ, **{MARK: ray_dir(name)}))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if state is not None:
        state.setdefault("pids", []).append(_pid_record(proc.pid))
        write_state(name, state)
    try:
        _, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}): {err.strip()[-2000:]}")


def _pid_record(pid: int) -> list:
    """[pid, start time]: a pid alone could name another process by the time `down` reads it."""
    import psutil

    try:
        return [pid, psutil.Process(pid).create_time()]
    except psutil.NoSuchProcess:
        return [pid, 0.0]


def start_ray_head(name: str, shards: int, object_store_bytes: int = 1 << 30, nodes: int = 1,
                   state: dict | None = None) -> str:
    """`ray start --head` on the loopback node address, with this cluster's own directory and ports;
    nodes > 1 adds Ray nodes at the next loopback addresses (replicas need one node per member).
    With `state`, the address and every pid are written to the state file as soon as known."""
    os.makedirs(ray_dir(name), exist_ok=True)
    port = _free_port()
    address = f"{LOCAL_NODE_IP}:{port}"
    if state is not None:
        state["ray_address"] = address
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    _ray_start(name, [ray, "start", "--head", f"--node-ip-address={LOCAL_NODE_IP}", f"--port={port}",
                      f"--num-cpus={max(4, shards + 2)}", f"--object-store-memory={object_store_bytes}",
                      f"--temp-dir={ray_dir(name)}", f"--ray-client-server-port={_free_port()}",
                      f"--dashboard-port={_free_port()}", "--include-dashboard=false", "--disable-usage-stats"],
               "`ray start --head`", state)
    if nodes > 1:
        _use_token_auth()  # the head made a token if there was none: the other nodes present it
    for i in range(1, nodes):  # more simulated nodes on this machine: 127.0.0.3, 127.0.0.4, ...
        ip = f"127.0.0.{2 + i}"
        _ray_start(name, [ray, "start", f"--address={address}", f"--node-ip-address={ip}",
                          f"--num-cpus={max(4, shards + 2)}", f"--object-store-memory={object_store_bytes}",
                          f"--temp-dir={ray_dir(name)}", "--disable-usage-stats"], f"`ray start` of node {ip}", state)
    return address


def stop_ray_head(name: str, grace: float = 3.0, timeout: float = 10.0, extra: list | None = None) -> int:
    """Stop every process of this cluster's Ray (SIGTERM, then SIGKILL after `grace` seconds), scanning
    again until two scans in a row find none (a `ray start` stopped mid-way may have just started a
    daemon) or `timeout` passes. Returns how many processes were stopped. By now the memory cluster
    has shut down (or could not): nothing of ours is waiting to be written, and Ray's gcs_server and
    raylet take ~30 s to act on SIGTERM (measured with Ray 2.60), and its agents ignore it, so the
    grace is short. `extra`: psutil processes to stop too (the recorded pids)."""
    import psutil

    deadline, stopped, empty = time.monotonic() + timeout, set(), 0
    procs = {p.pid: p for p in [*(extra or []), *ray_processes(name)]}
    while time.monotonic() < deadline:
        if not procs:
            empty += 1
            if empty == 2:
                break
            time.sleep(0.3)
            procs = {p.pid: p for p in ray_processes(name)}
            continue
        empty = 0
        first = [p for pid, p in procs.items() if pid not in stopped]
        for p in procs.values():
            try:
                p.kill() if p.pid in stopped else p.terminate()  # seen before: its grace has passed
            except psutil.NoSuchProcess:
                pass
        stopped.update(procs)
        alive, end = list(first), min(deadline, time.monotonic() + grace)
        while alive and time.monotonic() < end:
            _, alive = psutil.wait_procs(alive, timeout=0.2)
            alive = [p for p in alive if not _exited(p)]
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(list(procs.values()), timeout=1)
        procs = {p.pid: p for p in ray_processes(name)}
    shutil.rmtree(ray_dir(name), ignore_errors=True)
    return len(stopped)


def _exited(p) -> bool:
    import psutil

    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _recorded(state: dict, key: str) -> list:
    """The live processes among the state's pid records ([pid, start time]) under `key`."""
    import psutil

    recs = state.get(key) or []
    live = []
    for pid, t0 in ([recs] if recs and isinstance(recs[0], int) else recs):
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - t0) < 1.0 and not _exited(p):
                live.append(p)
        except psutil.NoSuchProcess:
            continue
    return live


def up(name: str, shards: int, tables: str | None, cluster: dict) -> dict:
    """Start a Ray head and a detached memory cluster in it; returns the state written.

    The state file is written before anything starts and again after each step, so an `up` killed
    at any point leaves a file that says what `down` has to stop and remove."""
    import ray

    from engram_mem.config import ClusterConfig
    from engram_mem.control.controller import start_controller

    cfg = ClusterConfig(name=name, shards=shards, **cluster)
    state = {"name": name, "phase": "starting", "up_pid": _pid_record(os.getpid()), "ray_dir": ray_dir(name),
             "shards": shards, "cluster_id": uuid.uuid4().hex[:8], "shm_dir": cfg.shm_dir}
    write_state(name, state)
    try:
        address = start_ray_head(name, shards, nodes=cfg.replicas, state=state)
        attach_ray(address)
        ctl = start_controller(cfg, detached=True, cluster_id=state["cluster_id"])
        if tables:
            create_tables_from_file(ctl, tables)
        assert ray.get(ctl.ping.remote()) == state["cluster_id"], "the controller took another cluster id"
        state["phase"] = "up"
        write_state(name, state)
        return state
    except BaseException:
        ray.shutdown()
        teardown(name, clean_timeout=0)
        raise
    finally:
        ray.shutdown()


def remove_shm(state: dict) -> str | None:
    """The cluster's shared-memory files, also when its shards died without cleaning up; returns the
    directory removed, if there was one."""
    if state.get("shm_dir") and state.get("cluster_id"):
        path = os.path.join(state["shm_dir"], state["cluster_id"])
        if os.path.exists(path):
            shutil.rmtree(path, ignore_errors=True)
            return path
    return None


def leftovers(name: str) -> str | None:
    """What a cluster `name` that is not cleanly up left on this machine, in a sentence; None if nothing.
    A cluster that is up (phase "up", its GCS accepting connections) is not a leftover."""
    import psutil

    state = load_state(name)
    if state is not None and read_state(name) is not None:
        return None
    procs = ray_processes(name)
    found = []
    if state is not None:
        up_alive = _recorded(state, "up_pid")
        found.append(f"a state file in phase {state.get('phase', 'up')!r}"
                     + (f" (its `up`, pid {up_alive[0].pid}, still running)" if up_alive else ""))
        if state.get("ray_address"):
            found.append(f"a GCS at {state['ray_address']} that accepts no connections")
    if procs:
        names = []
        for p in procs:
            try:
                names.append(f"{p.name()} {p.pid}")
            except psutil.NoSuchProcess:
                continue
        found.append(f"{len(procs)} Ray process(es) ({', '.join(names[:8])}{', ...' if len(names) > 8 else ''})")
    if state is not None and state.get("shm_dir") and state.get("cluster_id"):
        shm = os.path.join(state["shm_dir"], state["cluster_id"])
        if os.path.exists(shm):
            found.append(f"shared memory {shm}")
    return "; ".join(found) or None


def up_running(name: str):
    """The `engram-mem up` process still starting cluster `name` (psutil), or None."""
    state = load_state(name)
    live = _recorded(state, "up_pid") if state and state.get("phase") == "starting" else []
    return live[0] if live and live[0].pid != os.getpid() else None


def teardown(name: str, clean_timeout: float = 15.0, address: str | None = None) -> dict:
    """Bring cluster `name` down whatever state it is in: the `up` still starting it (if any) is
    killed first, the memory cluster is shut down cleanly if its GCS answers within `clean_timeout`
    (0: don't try), then every process of its Ray is stopped by its mark and recorded pids, and its
    /dev/shm directory, Ray directory and state file are removed. Bounded: about clean_timeout + 12 s.
    Returns {"found": bool, "processes": n, "shm": path or None, "note": str}."""
    state = load_state(name) or {}
    found = bool(state)
    up_proc = up_running(name)
    if up_proc is not None:  # it would go on starting what we stop
        try:
            up_proc.kill()
            up_proc.wait(5)
        except Exception:  # noqa: BLE001 - gone already
            pass
    note = ""
    address = address or state.get("ray_address")
    if clean_timeout > 0 and state.get("phase") == "up" and gcs_listening(address):
        note = _clean_shutdown(name, address, clean_timeout)
    extra = _recorded(state, "pids")
    n = stop_ray_head(name, extra=extra)
    shm = remove_shm(state)
    try:
        os.unlink(state_path(name))
    except FileNotFoundError:
        pass
    return {"found": found or n > 0 or shm is not None, "processes": n, "shm": shm, "note": note}


def _clean_shutdown(name: str, address: str, timeout: float) -> str:
    """The controller's shutdown (final snapshots, shards stopped), in a child process that is killed
    after `timeout` seconds: a driver attaching to a GCS that does not answer retries for minutes.
    Returns "" or what went wrong."""
    code = ("import sys, ray; from engram_mem.control.local import attach_ray; "
            "from engram_mem.control.controller import get_controller; "
            "attach_ray(sys.argv[1]); ctl = get_controller(sys.argv[2]); "
            "ctl is not None and (ray.get(ctl.shutdown.remote(), timeout=float(sys.argv[3])), "
            "ray.kill(ctl, no_restart=True))")
    try:
        out = subprocess.run([sys.executable, "-c", code, address, name, str(max(1.0, timeout - 4))],
                             capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"clean shutdown did not finish in {timeout:.0f} s; processes stopped anyway"
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return f"clean shutdown failed ({last[-300:]}); processes stopped anyway"
    return ""


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
        if not ray_processes(name):
            return True
        time.sleep(0.2)
    return False
