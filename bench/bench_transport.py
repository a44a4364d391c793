"""Bulk-row transports, side by side in one run: which one carries Gather replies (a benchmark, not a test).

    .venv/bin/python bench/bench_transport.py [--rows 1000000] [--dim 256] [--batch 65536] [--rounds 5]
                                              [--clients 8] [--quick]

The question this answers (issue "Rows at the speed of the machine"): what should move bulk rows
between a shard and a worker? Every candidate serves the same request, 64k random row ids of a
1M x 256 fp32 table (64 MiB of rows), from its own server process holding the table in shared
memory (as a shard does), to a client that wants the rows in its own buffer:

  in-process        np.take(table, ids, out=buf): the machine's copy speed, the ceiling
  grpc              grpc server-streaming 1 MB RowsChunk messages (engram_mem.wire), today's path
  tcp               a framed TCP stream: fixed header, the server gathers each 4 MB block once
                    and sends it, the client recv_into()s straight into its buffer
  tcp-scatter       the same, the server sending rows from the table with sendmsg (no gather copy)
  ucx-tcp, ucx-sm   UCX through ucxx (UCX_TLS=tcp,self and tcp,sm,self): tag send/recv of the
                    gathered reply into the client's buffer
  mooncake          Mooncake's Transfer Engine; recorded as unavailable where it does not import

For each: single-client GB/s (median of `--rounds` interleaved rounds, with the spread), p50/p99
per call, CPU seconds per GB moved (client + server processes; this carries over to real
machines, the wall time here does not: the "remote" side shares the same 2 cores), and with
`--clients` concurrent client processes, aggregate GB/s and p50/p99 per call.

Prints a table, appends a JSON line to bench/results/transport.jsonl, draws bench/results/transport.png
and writes bench/results/transport.md.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import socket
import struct
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, append_jsonl, markdown_table, print_table  # noqa: E402

HOST = "127.0.0.1"
HEADER = struct.Struct("<4sIQ")  # magic, op, payload bytes
MAGIC = b"EMbT"
BLOCK_BYTES = 4 << 20


# ---- the table, shared by every server process ---------------------------------------------------
def table_path() -> str:
    return f"/dev/shm/engram-bench-transport-{os.getpid()}.npy"


def make_table(path: str, rows: int, dim: int) -> None:
    t = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    rng = np.random.default_rng(0)
    step = 1 << 16
    for i in range(0, rows, step):
        t[i:i + step] = rng.standard_normal((min(step, rows - i), dim), dtype=np.float32)
    t.flush()


def open_table(path: str) -> np.ndarray:
    return np.load(path, mmap_mode="r")


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("peer closed mid-message")
        got += k


# ---- servers (each in its own process) -----------------------------------------------------------
def serve_tcp(path: str, port_q, scatter: bool) -> None:
    import threading

    table = open_table(path)
    row_bytes = table.shape[1] * table.itemsize
    srv = socket.create_server((HOST, 0), backlog=64)
    port_q.put(srv.getsockname()[1])

    def handle(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        hdr = bytearray(HEADER.size)
        block_rows = max(1, BLOCK_BYTES // row_bytes)
        block = np.empty((block_rows, table.shape[1]), np.float32)
        ids = np.empty(0, np.int64)
        try:
            while True:
                recv_exact(conn, memoryview(hdr))
                magic, _op, n = HEADER.unpack(hdr)
                if magic != MAGIC:
                    return
                if ids.size < n // 8:
                    ids = np.empty(n // 8, np.int64)
                recv_exact(conn, memoryview(ids)[: n // 8].cast("B"))
                want = ids[: n // 8]
                conn.sendall(HEADER.pack(MAGIC, 1, want.size * row_bytes))
                if scatter:
                    rows = memoryview(table).cast("B")
                    for s in range(0, want.size, 1024):  # IOV_MAX
                        views = [rows[i * row_bytes:(i + 1) * row_bytes] for i in want[s:s + 1024].tolist()]
                        sent = conn.sendmsg(views)
                        total = len(views) * row_bytes
                        if sent < total:  # a partial send: the rest from a copy
                            rest = b"".join(views)[sent:]
                            conn.sendall(rest)
                else:
                    for s in range(0, want.size, block_rows):
                        part = want[s:s + block_rows]
                        np.take(table, part, axis=0, out=block[: part.size])
                        conn.sendall(memoryview(block[: part.size]).cast("B"))
        except (ConnectionError, OSError):
            pass
        finally:
            conn.close()

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def serve_grpc(path: str, port_q) -> None:
    from concurrent import futures

    import grpc

    from engram_mem import wire

    table = open_table(path)
    chunk = wire.chunk_rows_for(table.shape[1] * table.itemsize)

    def gather(raw: bytes, _ctx):
        ids = np.frombuffer(raw, np.int64)
        for s in range(0, ids.size, chunk):
            yield wire.encode_rows_chunk(np.take(table, ids[s:s + chunk], axis=0))

    handler = grpc.method_handlers_generic_handler("bench.Rows", {
        "Gather": grpc.unary_stream_rpc_method_handler(gather)})
    opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=opts)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{HOST}:0")
    server.start()
    port_q.put(port)
    server.wait_for_termination()


def serve_ucx(path: str, port_q, tls: str) -> None:
    os.environ["UCX_TLS"] = tls
    import ucxx

    table = open_table(path)
    row_bytes = table.shape[1] * table.itemsize

    async def handle(ep):
        n = np.empty(1, np.int64)
        ids = np.empty(0, np.int64)
        reply = np.empty((0, table.shape[1]), np.float32)
        try:
            while True:
                await ep.recv(n)
                if n[0] < 0:
                    break
                if ids.size < n[0]:
                    ids = np.empty(int(n[0]), np.int64)
                    reply = np.empty((int(n[0]), table.shape[1]), np.float32)
                want, out = ids[: n[0]], reply[: n[0]]
                await ep.recv(want)
                np.take(table, want, axis=0, out=out)
                await ep.send(out)
        except Exception:  # noqa: BLE001 - the client went away
            pass

    async def main():
        listener = ucxx.create_listener(handle)
        port_q.put(listener.port)
        while True:
            await asyncio.sleep(3600)

    del row_bytes
    asyncio.run(main())


def start_server(kind: str, path: str) -> tuple[mp.Process, int]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    target, args = {
        "tcp": (serve_tcp, (path, q, False)),
        "tcp-scatter": (serve_tcp, (path, q, True)),
        "grpc": (serve_grpc, (path, q)),
        "ucx-tcp": (serve_ucx, (path, q, "tcp,self")),
        "ucx-sm": (serve_ucx, (path, q, "tcp,sm,self")),
    }[kind]
    p = ctx.Process(target=target, args=args, daemon=True)
    p.start()
    return p, q.get(timeout=120)


# ---- clients ---------------------------------------------------------------------------------------
class Client:
    """One connection of one transport: gather(ids, out) fills out with the rows of ids."""

    def __init__(self, kind: str, port: int, dim: int):
        self.kind, self.port, self.dim = kind, port, dim
        if kind.startswith("tcp"):
            self.sock = socket.create_connection((HOST, port))
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.hdr = bytearray(HEADER.size)
        elif kind == "grpc":
            import grpc

            opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
            self.channel = grpc.insecure_channel(f"{HOST}:{port}", options=opts)
            self.call = self.channel.unary_stream("/bench.Rows/Gather", request_serializer=None,
                                                  response_deserializer=None)
        else:
            os.environ["UCX_TLS"] = "tcp,self" if kind == "ucx-tcp" else "tcp,sm,self"
            import ucxx

            self.loop = asyncio.new_event_loop()
            self.ep = self.loop.run_until_complete(ucxx.create_endpoint(HOST, port))

    def gather(self, ids: np.ndarray, out: np.ndarray) -> None:
        if self.kind.startswith("tcp"):
            self.sock.sendall(HEADER.pack(MAGIC, 0, ids.nbytes) + ids.tobytes())
            recv_exact(self.sock, memoryview(self.hdr))
            _, _, n = HEADER.unpack(self.hdr)
            recv_exact(self.sock, memoryview(out).cast("B")[:n])
        elif self.kind == "grpc":
            from engram_mem import wire

            flat = memoryview(out).cast("B")
            at = 0
            for msg in self.call(ids.tobytes()):
                payload = wire.decode_rows_chunk(msg)
                flat[at:at + len(payload)] = payload
                at += len(payload)
        else:
            self.loop.run_until_complete(self._ucx_gather(ids, out))

    async def _ucx_gather(self, ids, out):
        await self.ep.send(np.array([ids.size], np.int64))
        await self.ep.send(ids)
        await self.ep.recv(out)

    def close(self) -> None:
        if self.kind.startswith("tcp"):
            self.sock.close()
        elif self.kind == "grpc":
            self.channel.close()
        else:
            self.loop.run_until_complete(self.ep.send(np.array([-1], np.int64)))
            self.loop.run_until_complete(self.ep.close())


def client_calls(kind: str, port: int, dim: int, rows: int, batch: int, calls: int, seed: int, check_path: str):
    """Run `calls` gathers on one connection; per-call seconds and this process's CPU seconds."""
    rng = np.random.default_rng(seed)
    out = np.empty((batch, dim), np.float32)
    c = Client(kind, port, dim)
    table = open_table(check_path)
    ids = rng.integers(0, rows, batch, dtype=np.int64)
    c.gather(ids, out)  # warm-up, checked
    if not np.array_equal(out, table[ids]):
        raise AssertionError(f"{kind}: rows differ from the table")
    secs = []
    cpu0 = time.process_time()
    for _ in range(calls):
        ids = rng.integers(0, rows, batch, dtype=np.int64)
        t0 = time.perf_counter()
        c.gather(ids, out)
        secs.append(time.perf_counter() - t0)
    cpu = time.process_time() - cpu0
    c.close()
    return secs, cpu


def _client_proc(args):
    return client_calls(*args)


def in_process(table: np.ndarray, rows: int, batch: int, calls: int, seed: int):
    rng = np.random.default_rng(seed)
    out = np.empty((batch, table.shape[1]), np.float32)
    secs = []
    cpu0 = time.process_time()
    for _ in range(calls):
        ids = rng.integers(0, rows, batch, dtype=np.int64)
        t0 = time.perf_counter()
        np.take(table, ids, axis=0, out=out)
        secs.append(time.perf_counter() - t0)
    return secs, time.process_time() - cpu0


def mooncake_status() -> str:
    try:
        from mooncake.engine import TransferEngine  # noqa: F401
        return "importable"
    except Exception as e:  # noqa: BLE001 - ImportError, OSError (libcuda.so.1), ...
        return f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120]}"


def ucx_status() -> str:
    try:
        import ucxx  # noqa: F401
        return "importable"
    except Exception as e:  # noqa: BLE001
        return f"unavailable: {type(e).__name__}: {e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--batch", type=int, default=65536)
    ap.add_argument("--calls", type=int, default=10, help="timed calls per round and configuration")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--kinds", default="grpc,tcp,tcp-scatter,ucx-tcp,ucx-sm")
    ap.add_argument("--quick", action="store_true", help="200k rows, 2 rounds, 4 calls: a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.rounds, args.calls = 200_000, 2, 4
    import psutil

    kinds = [k for k in args.kinds.split(",") if k]
    status = {"ucxx": ucx_status(), "mooncake": mooncake_status()}
    if not status["ucxx"].startswith("importable"):
        print(f"ucxx {status['ucxx']}: skipping ucx-*")
        kinds = [k for k in kinds if not k.startswith("ucx")]
    print(f"mooncake: {status['mooncake']}")
    path = table_path()
    make_table(path, args.rows, args.dim)
    table = open_table(path)
    nbytes = args.batch * args.dim * 4
    servers = {}
    try:
        for k in kinds:
            servers[k] = start_server(k, path)
        res = {k: {"secs": [], "cpu": 0.0, "round_gbps": []} for k in ["in-process", *kinds]}
        ctx = mp.get_context("spawn")
        with ctx.Pool(1) as pool:  # one client process, reused, so every kind pays the same start-up
            for r in range(args.rounds):
                order = ["in-process", *kinds]
                order = order[r % len(order):] + order[: r % len(order)]  # interleave, rotate the order
                for k in order:
                    if k == "in-process":
                        secs, cpu = in_process(table, args.rows, args.batch, args.calls, seed=r)
                        server_cpu = 0.0
                    else:
                        proc, port = servers[k]
                        sp = psutil.Process(proc.pid)
                        c0 = sum(sp.cpu_times()[:2])
                        secs, cpu = pool.apply(_client_proc, ((k, port, args.dim, args.rows, args.batch,
                                                               args.calls, r, path),))
                        server_cpu = sum(sp.cpu_times()[:2]) - c0
                    res[k]["secs"] += secs
                    res[k]["cpu"] += cpu + server_cpu
                    res[k]["round_gbps"].append(nbytes / float(np.median(secs)) / 1e9)
            # concurrency: `clients` client processes at once on each transport
            conc = {}
            with ctx.Pool(args.clients) as many:
                for k in kinds:
                    proc, port = servers[k]
                    t0 = time.perf_counter()
                    outs = many.map(_client_proc, [(k, port, args.dim, args.rows, args.batch, args.calls, 100 + i,
                                                    path) for i in range(args.clients)])
                    wall = time.perf_counter() - t0
                    secs = [s for o in outs for s in o[0]]
                    conc[k] = {"agg_gbps": args.clients * args.calls * nbytes / wall / 1e9,
                               "p50_ms": float(np.percentile(secs, 50)) * 1e3,
                               "p99_ms": float(np.percentile(secs, 99)) * 1e3}
    finally:
        for proc, _ in servers.values():
            proc.kill()
        os.unlink(path)

    base = float(np.median(res["in-process"]["round_gbps"]))
    grpc_gbps = float(np.median(res["grpc"]["round_gbps"])) if "grpc" in res else float("nan")
    rows = []
    for k, v in res.items():
        gbps = float(np.median(v["round_gbps"]))
        moved_gb = len(v["secs"]) * nbytes / 1e9
        row = {"transport": k, "GB/s": gbps, "spread": f"{min(v['round_gbps']):.2f}-{max(v['round_gbps']):.2f}",
               "x in-process": gbps / base, "x grpc": gbps / grpc_gbps,
               "p50 ms": float(np.percentile(v["secs"], 50)) * 1e3,
               "p99 ms": float(np.percentile(v["secs"], 99)) * 1e3,
               "CPU s/GB": v["cpu"] / moved_gb}
        if k in conc:
            row.update({f"{args.clients} clients GB/s": conc[k]["agg_gbps"],
                        f"{args.clients} clients p50 ms": conc[k]["p50_ms"],
                        f"{args.clients} clients p99 ms": conc[k]["p99_ms"]})
        rows.append(row)
    cols = ["transport", "GB/s", "spread", "x in-process", "x grpc", "p50 ms", "p99 ms", "CPU s/GB",
            f"{args.clients} clients GB/s", f"{args.clients} clients p50 ms", f"{args.clients} clients p99 ms"]
    title = (f"bulk-row transports: {args.batch} rows x {args.dim} fp32 ({nbytes / 2**20:.0f} MiB) per gather, "
             f"{args.rounds} rounds x {args.calls} calls, load {os.getloadavg()[0]:.2f}")
    print_table(rows, cols, title)
    print(f"mooncake: {status['mooncake']}")
    suffix = "-quick" if args.quick else ""
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"transport{suffix}.md"), "w") as f:
        f.write(f"{title}\n\n{markdown_table(rows, cols)}\n\nMooncake Transfer Engine: {status['mooncake']}\n")
    append_jsonl(f"transport{suffix}", {"args": vars(args), "rows": rows, "status": status})
    plot(rows, args, suffix)


def plot(rows, args, suffix):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common import save_figure

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["transport"] for r in rows]
    a.bar(names, [r["GB/s"] for r in rows], color="#4477aa")
    a.set_ylabel("GB/s, one client")
    a.tick_params(axis="x", rotation=30)
    b.bar(names, [r["CPU s/GB"] for r in rows], color="#cc6677")
    b.set_ylabel("CPU seconds per GB moved (client + server)")
    b.tick_params(axis="x", rotation=30)
    fig.suptitle(f"{args.batch}-row gathers of {args.dim} fp32")
    save_figure(fig, "transport", quick=bool(suffix))


if __name__ == "__main__":
    main()
