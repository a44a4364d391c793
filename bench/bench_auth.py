"""What authentication and TLS cost a shard: Gather latency and throughput over loopback, per setting.

    .venv/bin/python bench/bench_auth.py [--rounds 5] [--calls 200] [--big-rows 16384] [--dim 256]

One ShardStore (no Ray), served four ways at once: without the credential check (the servicer
alone, the baseline), with it (plaintext), with TLS, with mutual TLS (throwaway CA from
`cryptography`). Each round times `--calls` small Gathers (8 rows, latency) and `--calls`/10 big
ones (`--big-rows` x dim fp32, throughput) per setting, settings interleaved so that load from
other processes hits them alike. Prints a table, appends bench/results/auth.jsonl, draws
bench/results/auth.png.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import append_jsonl, bar_plot, markdown_table, print_table  # noqa: E402

HOST = "127.0.0.2"


def _servers(store, pki):
    import grpc

    from engram_mem.security import Security
    from engram_mem.shard.server import ShardServer, _handlers, server_options

    cred = "bench-credential-0123456789abcdef"
    plain = Security(credentials=(cred,))
    tls = Security(credentials=(cred,), tls_cert=pki["cert"], tls_key=pki["key"], tls_ca=pki["ca"])
    mtls = Security(credentials=(cred,), tls_cert=pki["cert"], tls_key=pki["key"], tls_ca=pki["ca"], mtls=True,
                    client_cert=pki["client_cert"], client_key=pki["client_key"])
    out = {}
    for name, sec in (("credential", plain), ("credential + TLS", tls), ("credential + mTLS", mtls)):
        s = ShardServer(store, host=HOST, security=sec, metrics_port=None)
        out[name] = (s, s.start(), sec.client())

    # the baseline: the same servicer on a server without the credential interceptor
    base = ShardServer(store, host=HOST, security=plain, metrics_port=None)
    import threading

    import uvloop

    ready, holder = threading.Event(), {}

    async def serve():
        srv = grpc.aio.server(options=server_options(store.max_request_bytes))
        srv.add_generic_rpc_handlers([_handlers(base.servicer)])
        holder["port"] = srv.add_insecure_port(f"{HOST}:0")
        await srv.start()
        holder["srv"] = srv
        ready.set()
        await srv.wait_for_termination()

    loop = uvloop.new_event_loop()
    threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True).start()
    ready.wait(30)
    out = {"no credential check": (None, f"{HOST}:{holder['port']}", {"credential": ""}), **out}
    return out, lambda: loop.call_soon_threadsafe(lambda: asyncio.ensure_future(holder["srv"].stop(0)))


async def _time(address, client_kw, ids_small, ids_big, calls):
    from engram_mem.security import ClientSecurity
    from engram_mem.pb.v1 import memory_pb2 as pb

    sec = ClientSecurity(**client_kw)
    ch = sec.channel(address, [("grpc.max_receive_message_length", 64 << 20)])
    call = sec.wrap(ch.unary_stream("/engram_mem.v1.Memory/Gather", request_serializer=lambda m: m.SerializeToString(),
                                    response_deserializer=lambda b: b))
    small = pb.GatherRequest(table="t", ids=ids_small.tobytes())
    big = pb.GatherRequest(table="t", ids=ids_big.tobytes())
    try:
        async for _ in call(small):  # connect (and handshake) outside the timing
            pass
        lat = []
        for _ in range(calls):
            t0 = time.perf_counter()
            async for _ in call(small):
                pass
            lat.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        nbytes = 0
        for _ in range(max(1, calls // 10)):
            async for c in call(big):
                nbytes += len(c)
        return lat, nbytes / (time.perf_counter() - t0)
    finally:
        await ch.close()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--big-rows", type=int, default=16384)
    p.add_argument("--dim", type=int, default=256)
    args = p.parse_args(argv)

    from engram_mem.storage.store import ShardStore
    from engram_mem.table import TableSpec
    from tests.pki import throwaway_pki  # the tests' throwaway CA

    pki = throwaway_pki(HOST)
    shm = tempfile.mkdtemp(dir="/dev/shm")
    store = ShardStore(0, shm_dir=shm, max_request_bytes=64 << 20)
    store.add_table(TableSpec("t", rows=100_000, dim=args.dim, num_slots=16), range(16), epoch=1)
    servers, stop_base = _servers(store, pki)
    rng = np.random.default_rng(0)
    ids_small, ids_big = rng.integers(0, 100_000, 8).astype("<i8"), rng.integers(0, 100_000, args.big_rows).astype("<i8")
    lat = {n: [] for n in servers}
    gbps = {n: [] for n in servers}
    load0 = os.getloadavg()
    try:
        for _ in range(args.rounds):
            for name, (_s, address, kw) in servers.items():
                l, bps = asyncio.run(_time(address, kw, ids_small, ids_big, args.calls))
                lat[name] += l
                gbps[name].append(bps / 1e9)
    finally:
        load1 = os.getloadavg()
        for s, _a, _k in servers.values():
            if s is not None:
                s.stop(grace=0.5)
        stop_base()
        store.close()
        shutil.rmtree(shm, ignore_errors=True)
    rows = [{"setting": n, "small_p50_us": float(np.percentile(lat[n], 50) * 1e6),
             "small_p99_us": float(np.percentile(lat[n], 99) * 1e6), "big_gbps_median": float(np.median(gbps[n]))}
            for n in servers]
    title = (f"Gather over loopback: 8 rows (latency) and {args.big_rows} x {args.dim} fp32 (throughput), "
             f"{args.rounds} interleaved rounds; load avg {load0[0]:.1f} -> {load1[0]:.1f}")
    print_table(rows, ["setting", "small_p50_us", "small_p99_us", "big_gbps_median"], title)
    print(markdown_table(rows, ["setting", "small_p50_us", "small_p99_us", "big_gbps_median"]))
    append_jsonl("auth", {"args": vars(args), "rows": rows, "loadavg_start": load0, "loadavg_end": load1})
    print(bar_plot("auth", [r["setting"] for r in rows], [r["small_p50_us"] for r in rows], "us (p50, 8-row Gather)",
                   f"Gather latency by security setting; load avg {load1[0]:.1f}"))


if __name__ == "__main__":
    main()
