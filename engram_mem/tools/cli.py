"""`engram-mem`: run and inspect a memory cluster.

    engram-mem up [--shards N] [--replicas R] [--replica-ack none|all] [--tables FILE] [--address RAY_ADDRESS] [--data-dir DIR] [--shard-resource R=1]
    engram-mem status [--address RAY_ADDRESS] [--json]
    engram-mem scale N [--address RAY_ADDRESS]
    engram-mem checkpoint [DIR] [--address RAY_ADDRESS]
    engram-mem restore DIR [--shards N] [--address RAY_ADDRESS]
    engram-mem down [--address RAY_ADDRESS]
    engram-mem import | export | verify ...    (transfer.py: tables from and to safetensors files)

Without --address, `up` starts a local Ray head (`ray start --head`) on a loopback node address,
creates the memory cluster in it and exits; the cluster runs until `down`. With --address, the
memory cluster is created as detached actors in that Ray cluster and stays until `down --address`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time

from engram_mem.config import DEFAULT_NAME
from engram_mem.tools.attach import attach


def _parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        return int(float(t[:-1] if t[-1:] in units and t[-1:] else t) * units[t[-1] if t[-1:].isalpha() else ""])
    except (ValueError, KeyError):
        sys.exit(f"engram-mem: size {text!r} must look like 512M or 8G")


def _cluster_options(args) -> dict:
    cluster = {}
    if args.data_dir:
        cluster["data_dir"] = os.path.abspath(args.data_dir)
    if args.cpus_per_shard is not None:
        cluster["cpus_per_shard"] = args.cpus_per_shard
    for field in ("agent_cpus", "shard_cpus", "agent_nice", "shard_nice"):
        if getattr(args, field, None) is not None:
            cluster[field] = getattr(args, field)  # ClusterConfig parses "0,2-3", "-10" (or names what is wrong)
    cluster["durability"] = args.durability
    if args.replicas != 1:
        cluster["replicas"] = args.replicas
    if args.replica_ack != "none":
        cluster["replica_ack"] = args.replica_ack
    if args.snapshot_interval is not None:
        cluster["snapshot_interval_s"] = args.snapshot_interval
    if args.reinit_missing:
        cluster["reinit_missing"] = True
    if args.shard_resource:
        res = {}
        for item in args.shard_resource:
            key, sep, value = item.partition("=")
            try:
                res[key] = float(value)
            except ValueError:
                sep = ""
            if not sep or not key:
                sys.exit(f"engram-mem: --shard-resource {item!r} must look like NAME=AMOUNT, e.g. memory_node=1")
        cluster["shard_resources"] = res
    if args.storage:
        cluster["storage"] = args.storage
    if args.memory_budget:
        cluster["memory_budget"] = _parse_size(args.memory_budget)
    return cluster


def _durability_note(cluster: dict) -> str:
    if not cluster.get("data_dir"):
        return "NOT durable: no --data-dir, rows live only in memory and restart from their initial values"
    if cluster["durability"] == "none":
        return f"snapshots in {cluster['data_dir']}, no write-ahead log: updates since the last snapshot die with a shard"
    return f"durable ({cluster['durability']}): snapshots and write-ahead log in {cluster['data_dir']}"


def _fail(e: BaseException) -> None:
    """Exit with the error's own sentence (a Ray task error carries the cause's)."""
    cause = getattr(e, "cause", None) or e
    sys.exit(f"engram-mem: {type(cause).__name__}: {cause}")


def cmd_up(args) -> int:
    from engram_mem.control import local
    from engram_mem.errors import EngramMemError

    cluster = _cluster_options(args)
    security = _security(args)
    if security:
        cluster["security"] = security
    tables = os.path.abspath(args.tables) if args.tables else None
    if args.address:
        import ray

        from engram_mem.config import ClusterConfig
        from engram_mem.control.controller import get_controller, start_controller

        local.attach_ray(args.address)
        if get_controller(args.name) is not None:
            sys.exit(f"engram-mem: a memory cluster {args.name!r} already runs in {args.address}")
        try:
            ctl = start_controller(ClusterConfig(name=args.name, shards=args.shards, **cluster), detached=True)
        except (EngramMemError, ray.exceptions.RayError) as e:
            _fail(e)
        if tables:
            local.create_tables_from_file(ctl, tables)
        print(f"memory cluster {args.name!r} is up in the Ray cluster at {args.address} with {args.shards} shards; "
              f"{_durability_note(cluster)}")
        return 0
    if local.read_state(args.name) is not None:
        sys.exit(f"engram-mem: a local memory cluster {args.name!r} is already up (see `engram-mem status`)")
    starting = local.up_running(args.name)
    if starting is not None:
        sys.exit(f"engram-mem: an `engram-mem up` (pid {starting.pid}) is starting {args.name!r}; wait for it, "
                 f"or stop it with `engram-mem down`")
    found = local.leftovers(args.name)
    if found:  # an interrupted start or a dead Ray: clear it and start fresh
        gone = local.teardown(args.name, clean_timeout=0)
        print(f"engram-mem: cleaned up what an earlier {args.name!r} left: {found} "
              f"({gone['processes']} process(es) stopped)", file=sys.stderr)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("engram-mem: up stopped by SIGTERM"))  # cleans up
    try:
        state = local.up(args.name, args.shards, tables, cluster)
    except Exception as e:  # noqa: BLE001 - the CLI says what went wrong, not "see log"
        _fail(e)
    print(f"memory cluster {args.name!r} is up: {args.shards} shards, Ray at {state['ray_address']}; "
          f"{_durability_note(cluster)}")
    return 0


def _security(args) -> dict | None:
    """The Security dict `up` was given (files, environment), or None: the cluster makes new credentials."""
    from engram_mem.security import ENV_CREDENTIAL, ENV_READ_ONLY_CREDENTIAL, load_security
    from engram_mem.errors import InvalidArgument

    given = (args.credential_file, args.read_only_credential_file, args.tls_cert, args.tls_key, args.tls_ca,
             args.mtls, args.tls_client_cert, args.tls_client_key)
    if not any(given) and not os.environ.get(ENV_CREDENTIAL) and not os.environ.get(ENV_READ_ONLY_CREDENTIAL):
        return None
    try:
        return load_security(args.credential_file, args.read_only_credential_file, tls_cert=args.tls_cert,
                             tls_key=args.tls_key, tls_ca=args.tls_ca, mtls=args.mtls, client_cert=args.tls_client_cert,
                             client_key=args.tls_client_key, server_name=args.tls_server_name or "").to_dict()
    except InvalidArgument as e:
        sys.exit(f"engram-mem: {e}")


def cmd_down(args) -> int:
    from engram_mem.control import local

    if args.address:
        ray, ctl = attach(args)
        ray.get(ctl.shutdown.remote(), timeout=300)
        ray.kill(ctl, no_restart=True)
        print(f"memory cluster {args.name!r} in {args.address} is down")
        return 0
    # Whatever state it is in (up, half-started, its Ray half dead): bounded, by the recorded pids and mark.
    r = local.teardown(args.name, clean_timeout=args.timeout)
    if not r["found"]:
        print(f"no local memory cluster {args.name!r} is running")
        return 0
    note = f" ({r['note']})" if r["note"] else ""
    print(f"memory cluster {args.name!r} is down: {r['processes']} process(es) stopped"
          + (f", {r['shm']} removed" if r["shm"] else "") + note)
    return 0


def cmd_status(args) -> int:
    from engram_mem.client.api import MemoryClient
    from engram_mem.tools.status import render, shard_rows

    ray, ctl = attach(args)
    with MemoryClient(ctl) as mem:
        d = mem.refresh(check_shards=True).raw   # each member's own answer now (readiness, in-sync replicas)
        stats = mem.stats()
    endpoints = ray.get(ctl.metrics_endpoints.remote())
    if args.prometheus_sd:
        from engram_mem.tools.status import prometheus_targets

        print(json.dumps(prometheus_targets(d, endpoints), indent=1))
        ray.shutdown()
        return 0
    rows = shard_rows(d, endpoints, interval=args.interval)
    ray.shutdown()
    if args.json:
        out = {"describe": {k: v for k, v in d.items() if k != "tables"},
               "tables": {n: t["spec"] for n, t in d["tables"].items()}, "stats": stats, "shards": rows,
               "table_meta": {n: t.get("meta") or {} for n, t in d["tables"].items()}}   # layout, identity
        print(json.dumps(out, indent=1, default=str))
        return 0
    print(render(d, rows))
    return 0


def cmd_rotate_credential(args) -> int:
    """Two steps: new credentials (old ones still accepted) ... reconnect clients ... --finish."""
    from engram_mem.security import read_pem_or_text, split_credentials

    ray, ctl = attach(args)
    full = split_credentials(read_pem_or_text(args.credential_file, "credential")) or None
    ro = split_credentials(read_pem_or_text(args.read_only_credential_file, "read-only credential")) or None
    r = ray.get(ctl.rotate_credentials.remote(full, ro, args.finish))
    print(f"credentials rotated: {r['accepted']} full and {r['read_only_accepted']} read-only credential(s) accepted"
          + ("" if args.finish else "; reconnect clients, then run `engram-mem rotate-credential --finish`"))
    ray.shutdown()
    return 0


def cmd_credential(args) -> int:
    """Print the cluster credential for clients outside Ray (connect(credential=...))."""
    ray, ctl = attach(args)
    print(ray.get(ctl.client_security.remote(args.read_only))["credential"])
    ray.shutdown()
    return 0


def cmd_scale(args) -> int:
    ray, ctl = attach(args)
    t0 = time.time()
    d = ray.get(ctl.scale.remote(args.shards))
    print(f"scaled to {len(d['shards'])} shards in {time.time() - t0:.1f}s (epoch {d['epoch']})")
    ray.shutdown()
    return 0


def cmd_checkpoint(args) -> int:
    from engram_mem.tools.status import fmt_bytes

    ray, ctl = attach(args)
    target = os.path.abspath(args.dir) if args.dir else None
    try:
        r = ray.get(ctl.checkpoint.remote(target))
    except ray.exceptions.RayError as e:
        _fail(e)
    print(f"checkpoint: {fmt_bytes(r['bytes_written'])} written to {r['data_dir']} (epoch {r['epoch']})")
    ray.shutdown()
    return 0


def cmd_restore(args) -> int:
    ray, ctl = attach(args)
    t0 = time.time()
    try:
        r = ray.get(ctl.restore.remote(os.path.abspath(args.dir)))
        if args.shards:
            ray.get(ctl.scale.remote(args.shards))
    except ray.exceptions.RayError as e:
        _fail(e)
    print(f"restored {r['slots_restored']} slots from {args.dir} in {time.time() - t0:.1f}s (epoch {r['epoch']})")
    ray.shutdown()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="engram-mem", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default=DEFAULT_NAME, help="memory cluster name (default %(default)s)")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a memory cluster")
    up.add_argument("--shards", type=int, default=2)
    up.add_argument("--replicas", type=int, default=1,
                    help="members per shard on different nodes: one primary and R-1 read replicas that follow it "
                         "(without --address, a local cluster gets R simulated nodes at 127.0.0.2, .3, ...)")
    up.add_argument("--replica-ack", choices=["none", "all"], default="none",
                    help="with --replicas: acknowledge a write once the primary logged it (none, default; replicas "
                         "trail by a reported lag) or once every in-sync replica applied it too (all: a primary "
                         "whose disk or node is lost restores from a replica without losing anything acknowledged)")
    up.add_argument("--tables", help="JSON file: list of tables to create")
    up.add_argument("--address", help="Ray cluster address (default: start an embedded local one)")
    up.add_argument("--data-dir", help="snapshots and write-ahead log here; a restart restores from them")
    up.add_argument("--durability", choices=["none", "process", "fsync"], default="process",
                    help="when an update is acknowledged: process = logged, survives kill -9 (default); "
                         "fsync = also on disk, survives a machine crash; none = snapshots only")
    up.add_argument("--snapshot-interval", type=float, help="seconds between snapshots (default 60)")
    up.add_argument("--reinit-missing", action="store_true",
                    help="start slots whose snapshot is missing or damaged from their initial values")
    up.add_argument("--cpus-per-shard", type=float)
    up.add_argument("--agent-cpus", metavar="CORES", help="cores each node's fetch agent runs on, e.g. 14-15 "
                    "(keep the data path off the model's cores; default: the OS decides)")
    up.add_argument("--shard-cpus", metavar="CORES", help="cores each shard process runs on, e.g. 8-13")
    up.add_argument("--agent-nice", metavar="N", help="nice value of each node's fetch agent, e.g. -10 (woken ahead "
                    "of the model's threads; below 0 needs CAP_SYS_NICE; default: as started)")
    up.add_argument("--shard-nice", metavar="N", help="nice value of each shard process, e.g. -10")
    up.add_argument("--shard-resource", action="append", default=[], metavar="NAME=AMOUNT",
                    help="a Ray resource each shard needs, to pin shards to memory nodes (repeatable)")
    up.add_argument("--timeout", type=float, default=180)
    up.add_argument("--storage", help="where shard rows live: shm (default) or disk:/dir (tables larger than RAM)")
    up.add_argument("--memory-budget", help="with disk storage: page cache bytes per shard, e.g. 8G (default: no bound)")
    sec = up.add_argument_group("security", "credentials (default: new random ones; or $ENGRAM_MEM_CREDENTIAL, "
                                "$ENGRAM_MEM_READONLY_CREDENTIAL) and optional TLS / mutual TLS (PEM files)")
    sec.add_argument("--credential-file", help="full-access credentials, one per line; the first is handed out")
    sec.add_argument("--read-only-credential-file", help="read-only credentials (Gather, Describe, Stats, Health)")
    sec.add_argument("--tls-cert", help="shard certificate chain (must name the node IPs, or see --tls-server-name)")
    sec.add_argument("--tls-key", help="its private key")
    sec.add_argument("--tls-ca", help="CA certificate clients verify the shards with")
    sec.add_argument("--mtls", action="store_true", help="shards require client certificates signed by --tls-ca")
    sec.add_argument("--tls-client-cert", help="client certificate handed to clients attaching through Ray (mTLS)")
    sec.add_argument("--tls-client-key", help="its private key")
    sec.add_argument("--tls-server-name", help="the name the shard certificate holds, if not the node IPs")
    for name, fn in (("status", "show shards, nodes, rows, bytes, requests/s"), ("down", "stop the memory cluster"),
                     ("checkpoint", "a consistent cut of every shard: to the data dir, or to DIR")):
        sp = sub.add_parser(name, help=fn)
        sp.add_argument("--address")
        if name == "status":
            sp.add_argument("--json", action="store_true")
            sp.add_argument("--interval", type=float, default=1.0, help="seconds between the two reads for rates")
            sp.add_argument("--prometheus-sd", action="store_true",
                            help="print the shards' metrics endpoints as a Prometheus file_sd target list")
        if name == "down":
            sp.add_argument("--timeout", type=float, default=15,
                            help="seconds for the clean shutdown (final snapshots); then processes are stopped")
        if name == "checkpoint":
            sp.add_argument("dir", nargs="?", help="write the checkpoint here (default: the data dir)")
    rs = sub.add_parser("restore", help="replace every table by a checkpoint DIR (any shard count)")
    rs.add_argument("dir")
    rs.add_argument("--shards", type=int, help="then scale to this many shards")
    rs.add_argument("--address")
    cr = sub.add_parser("credential", help="print the cluster credential for clients outside Ray")
    cr.add_argument("--read-only", action="store_true")
    cr.add_argument("--address")
    ro = sub.add_parser("rotate-credential", help="new credentials, the old still accepted until --finish")
    ro.add_argument("--credential-file")
    ro.add_argument("--read-only-credential-file")
    ro.add_argument("--finish", action="store_true", help="accept only the current credentials from now on")
    ro.add_argument("--address")
    sc = sub.add_parser("scale", help="change the shard count")
    sc.add_argument("shards", type=int)
    sc.add_argument("--address")
    from engram_mem.plan import cli as plan_cli  # no Ray/gRPC: the planner is arithmetic
    plan_cli.add_parser(sub)
    from engram_mem.tools import transfer

    transfer_cmds = transfer.add_parser(sub)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return {"up": cmd_up, "down": cmd_down, "status": cmd_status, "scale": cmd_scale,
            "checkpoint": cmd_checkpoint, "restore": cmd_restore, "credential": cmd_credential,
            "rotate-credential": cmd_rotate_credential, "plan": plan_cli.cmd_plan, **transfer_cmds}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
