"""The bulk data plane (framed TCP beside gRPC) over real loopback sockets: the same answers as
gRPC, rows landing in the caller's array (copies counted), the credential and read-only
credential, limits, any bytes at all refused with the shard still serving, TLS falling back to
gRPC, and a client through a real Ray cluster moving its rows over it.

    pytest -q tests/integration/test_data_plane.py
"""

import gc
import shutil
import socket
import struct
import tempfile

import numpy as np
import pytest

from engram_mem.errors import (InvalidArgument, PermissionDenied, RequestTooLarge, StaleEpoch, Unauthenticated,
                               UnknownTable)
from engram_mem.pb.v1 import memory_pb2 as pb
from engram_mem.security import ClientSecurity, Security
from engram_mem.shard.data_server import INLINE_REPLY_BYTES
from engram_mem.shard.server import ShardServer
from engram_mem.storage.store import ShardStore
from engram_mem.table import TableSpec
from engram_mem.transport import protocol as P
from engram_mem.transport.grpc_channels import ShardChannels
from engram_mem.transport.grpc_connector import GrpcConnector
from engram_mem.transport.tcp_connector import TcpConnector
from tests.pki import throwaway_pki

HOST = "127.0.0.2"
FULL, READ = "full-credential-0123456789", "read-credential-0123456789"
ROWS, DIM = 50_000, 64


@pytest.fixture(scope="module")
def served():
    store = ShardStore(0, shm_dir=tempfile.mkdtemp(dir="/dev/shm"), max_request_bytes=1 << 20)
    store.add_table(TableSpec("t", rows=ROWS, dim=DIM, seed=1, num_slots=8), range(8), epoch=1)
    store.add_table(TableSpec("b", rows=4096, dim=32, dtype="bfloat16", seed=2, num_slots=4), range(4), epoch=1)
    store.add_table(TableSpec("fz", rows=64, dim=DIM, seed=3, num_slots=2), range(2), epoch=1)
    server = ShardServer(store, host=HOST, security=Security(credentials=(FULL,), read_only_credentials=(READ,)))
    server.start()
    chans = ShardChannels(8 << 20, ClientSecurity(credential=FULL))
    member = {"address": server.address, "data_address": server.data_address}
    yield store, server, chans, member
    chans.close()
    server.stop(grace=0.5)
    store.close()
    shutil.rmtree(store.shm_dir, ignore_errors=True)


def run(chans, coro):
    return chans.submit(coro).result(60)


def _gather(chans, conn, member, table, ids, dim, dtype=np.float32, dest=None, epoch=1):
    out = np.zeros((ids.size, dim), dtype=dtype)
    run(chans, conn.gather(member, epoch, table, ids, out, 0, dest))
    return out


def test_tcp_and_grpc_give_the_same_rows_writes_and_pushes(served):
    store, server, chans, member = served
    assert server.data_address and server.data_address != server.address
    tcp, grpc_ = TcpConnector(FULL, store.max_request_bytes), GrpcConnector(chans, store.max_request_bytes)
    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(ROWS, 3000, replace=False))
    assert np.array_equal(_gather(chans, tcp, member, "t", ids, DIM), _gather(chans, grpc_, member, "t", ids, DIM))
    assert np.array_equal(_gather(chans, tcp, member, "t", ids, DIM), store.gather("t", ids))
    perm = rng.permutation(ids.size)  # scattered into the caller's array
    assert np.array_equal(_gather(chans, tcp, member, "t", ids, DIM, dest=perm)[perm], store.gather("t", ids))
    # a reply gathered on the shard's loop (small, decode's) and one gathered in blocks on its workers
    edge = INLINE_REPLY_BYTES // (DIM * 4)
    for n in (1, edge, edge + 1):
        some = ids[:n]
        assert np.array_equal(_gather(chans, tcp, member, "t", some, DIM), store.gather("t", some)), n
    bids = np.arange(0, 4096, 3)
    assert np.array_equal(_gather(chans, tcp, member, "b", bids, 32, np.uint16), store.gather("b", bids))
    # A write, then a push (SGD lr 1, gradient -1 adds 1.0), each over one transport, then the other.
    w = np.arange(10, 20)
    for k, conn in enumerate((tcp, grpc_)):
        assert run(chans, conn.write(member, 1, "t", w, np.full((10, DIM), 5.0, np.float32), "float32",
                                     (f"c{k}", 1))) == 10
        assert run(chans, conn.push(member, 1, "t", w, -np.ones((10, DIM), np.float32), "float32", 1.0, 0, "w",
                                    (f"c{k}", 2))) == 10
        assert np.array_equal(store.gather("t", w), np.full((10, DIM), 6.0, np.float32))
        # the same key again: applied once
        run(chans, conn.push(member, 1, "t", w, -np.ones((10, DIM), np.float32), "float32", 1.0, 0, "w",
                             (f"c{k}", 2)))
        assert np.array_equal(store.gather("t", w), np.full((10, DIM), 6.0, np.float32))
    run(chans, tcp.aclose())


def test_rows_land_in_the_callers_array_and_the_copies_are_counted(served):
    """Contiguous rows (distinct ids, one shard) arrive straight into the caller's array: no copy on
    the client. Scattered rows take one copy from the connection's staging block. gRPC: one always."""
    store, server, chans, member = served
    tcp, grpc_ = TcpConnector(FULL, store.max_request_bytes), GrpcConnector(chans, store.max_request_bytes)
    ids = np.arange(0, 2000, 2)
    nbytes = ids.size * DIM * 4
    out = np.zeros((ids.size + 5, DIM), np.float32)
    run(chans, tcp.gather(member, 1, "t", ids, out, 5, None))
    assert np.array_equal(out[5:], store.gather("t", ids)) and not out[:5].any()
    assert tcp.counts["direct_bytes"] == nbytes and tcp.counts["staged_bytes"] == 0
    dest = np.arange(ids.size)[::-1].copy()
    _gather(chans, tcp, member, "t", ids, DIM, dest=dest)
    assert tcp.counts["direct_bytes"] == nbytes and tcp.counts["staged_bytes"] == nbytes
    _gather(chans, grpc_, member, "t", ids, DIM)
    assert grpc_.counts["staged_bytes"] == nbytes and grpc_.counts["direct_bytes"] == 0
    assert tcp.counts["gather"] == 2 and grpc_.counts["gather"] == 1
    run(chans, tcp.aclose())


def test_the_shards_own_errors_come_back_typed_and_the_connection_recovers(served):
    store, server, chans, member = served
    tcp = TcpConnector(FULL, store.max_request_bytes)
    cases = [(lambda: _gather(chans, tcp, member, "nope", np.array([1]), DIM), UnknownTable, "unknown table"),
             (lambda: _gather(chans, tcp, member, "t", np.array([1]), DIM, epoch=7), StaleEpoch, "epoch 7"),
             (lambda: _gather(chans, tcp, member, "t", np.array([ROWS + 3]), DIM), InvalidArgument, str(ROWS + 3)),
             (lambda: run(chans, tcp.push(member, 1, "t", np.array([1]), np.full((1, DIM), np.nan, np.float32),
                                          "float32", 1.0, 0, "w", ("e", 1))), InvalidArgument, "NaN"),
             (lambda: run(chans, tcp.write(member, 1, "t", np.array([1, 2]), np.ones((2, DIM + 1), np.float32),
                                           "float32", ("e", 2))), InvalidArgument, "bytes")]
    for call, cls, words in cases:
        with pytest.raises(cls, match=words):
            call()
        assert np.array_equal(_gather(chans, tcp, member, "t", np.arange(5), DIM), store.gather("t", np.arange(5)))
    # A reply over the shard's reply limit (4 x 1 MiB here) is refused before any row is copied; the
    # connector itself never asks for one (it splits a gather within the limits).
    big = np.arange(ROWS)  # 50k x 256 B = 12.8 MB
    meta = pb.GatherRequest(table="t", ids=big.astype("<i8").tobytes(), epoch=1).SerializeToString()
    with pytest.raises(RequestTooLarge, match="reply limit"):
        run(chans, tcp._call(member, P.GATHER, meta))
    assert np.array_equal(_gather(chans, tcp, member, "t", big, DIM), store.gather("t", big))
    run(chans, tcp.aclose())


def test_credentials_are_checked_and_read_only_may_only_gather(served):
    store, server, chans, member = served
    ids = np.arange(8)
    with pytest.raises(Unauthenticated, match="not this cluster's"):
        _gather(chans, TcpConnector("wrong-credential-0123456789", 1 << 20), member, "t", ids, DIM)
    ro = TcpConnector(READ, 1 << 20)
    assert np.array_equal(_gather(chans, ro, member, "t", ids, DIM), store.gather("t", ids))
    before = store.gather("t", ids)
    with pytest.raises(PermissionDenied, match="read-only"):
        run(chans, ro.push(member, 1, "t", ids, -np.ones((8, DIM), np.float32), "float32", 1.0, 0, "w", ("r", 1)))
    with pytest.raises(PermissionDenied, match="read-only"):
        run(chans, ro.write(member, 1, "t", ids, np.ones((8, DIM), np.float32), "float32", ("r", 2)))
    assert np.array_equal(store.gather("t", ids), before)
    # A finished rotation cuts off connections opened with an old credential.
    old = TcpConnector(FULL, 1 << 20)
    _gather(chans, old, member, "t", ids, DIM)  # connected and pooled
    server.set_credentials(Security(credentials=("rotated-credential-0123456789",), read_only_credentials=(READ,)))
    try:
        with pytest.raises(Unauthenticated, match="no longer accepted"):
            _gather(chans, old, member, "t", ids, DIM)
    finally:
        server.set_credentials(Security(credentials=(FULL,), read_only_credentials=(READ,)))
    for c in (ro, old):
        run(chans, c.aclose())


def _raw_exchange(address: str, data: bytes, timeout: float = 5.0) -> bytes:
    """Send `data` on a fresh connection, half-close, read everything the shard answers."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        out = b""
        try:
            while True:
                k = s.recv(1 << 16)
                if not k:
                    return out
                out += k
        except OSError:
            return out


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    """The frames in a reply byte string: (op, meta); an ERROR's meta is its class and message."""
    out, i = [], 0
    while i + P.HEADER.size <= len(data):
        magic, version, op, flags, meta_len, bulk_len = P.HEADER.unpack_from(data, i)
        assert magic == P.MAGIC and version == P.VERSION and op in (P.OK, P.ERROR), data[i:i + 20]
        out.append((op, data[i + P.HEADER.size:i + P.HEADER.size + meta_len]))
        i += P.HEADER.size + meta_len + bulk_len
    return out


def test_any_bytes_get_a_defined_refusal_and_the_shard_keeps_serving(served):
    """A seeded fuzzer: random bytes, mutated frames, lying sizes, before and after HELLO. Every
    answer is a well-formed frame (an ERROR names a class the client knows) or a closed connection;
    the shard serves a correct gather after each batch, and every refusal is counted."""
    from engram_mem.errors import ERROR_CLASSES

    store, server, chans, member = served
    rng = np.random.default_rng(20)
    hello = P.frame(P.HELLO, FULL.encode())
    gather = P.frame(P.GATHER, pb.GatherRequest(table="fz", ids=np.arange(4, dtype="<i8").tobytes(),
                                                 epoch=1).SerializeToString())
    push = pb.PushRequest(table="fz", ids=np.arange(2, dtype="<i8").tobytes(), dtype="float32", epoch=1,
                          step=pb.StepInfo(lr=1.0)).SerializeToString()
    valid = [gather, P.frame(P.PUSH, push, 2 * DIM * 4) + np.zeros((2, DIM), np.float32).tobytes()]
    before = store.gather("t", np.arange(100))  # the fuzz aims at table "fz"; "t" must not change
    m0 = server.servicer.metrics.summary()

    def mutate(b: bytes) -> bytes:
        b = bytearray(b)
        op = rng.integers(0, 5)
        if op == 0 and b:
            for _ in range(int(rng.integers(1, 6))):
                b[int(rng.integers(0, len(b)))] ^= 1 << int(rng.integers(0, 8))
        elif op == 1:
            b = b[:int(rng.integers(0, len(b) + 1))]
        elif op == 2:  # lying sizes
            metas, bulks = (0, 1, 7, 2**31, 2**32 - 1), (0, 3, 2**40, 2**64 - 1)
            meta, bulk = metas[int(rng.integers(0, len(metas)))], bulks[int(rng.integers(0, len(bulks)))]
            b[:P.HEADER.size] = struct.pack("<4sBBHIQ", P.MAGIC, P.VERSION, int(rng.integers(0, 6)), 0, meta, bulk)
        elif op == 3:
            b = bytearray(rng.bytes(int(rng.integers(0, 200))))
        else:
            b += rng.bytes(int(rng.integers(1, 50)))
        return bytes(b)

    n = 600
    for i in range(n):
        authed = rng.random() < 0.7
        body = mutate(valid[int(rng.integers(0, len(valid)))]) if rng.random() < 0.8 else rng.bytes(int(rng.integers(0, 64)))
        if not authed and rng.random() < 0.5:
            body = mutate(hello) + body
        reply = _raw_exchange(server.data_address, (hello if authed else b"") + body)
        frames = _frames(reply)
        for op, meta in frames:
            if op == P.ERROR:
                cls = meta.decode().partition("\n")[0]
                assert cls in ERROR_CLASSES, meta
        if i % 100 == 99:
            tcp = TcpConnector(FULL, 1 << 20)
            assert np.array_equal(_gather(chans, tcp, member, "t", np.arange(100), DIM), store.gather("t", np.arange(100)))
            run(chans, tcp.aclose())
    assert np.array_equal(store.gather("t", np.arange(100)), before)
    m = server.servicer.metrics.summary()
    refused = sum(m["errors"].values()) - sum(m0["errors"].values())
    assert refused > n // 4, m["errors"]  # every refusal counted (most fuzzed requests are refused)
    assert m["requests"].get("Frame", 0) > m0["requests"].get("Frame", 0)
    assert m["requests"].get("Hello", 0) > m0["requests"].get("Hello", 0)
    # and gRPC is unaffected
    async def health():
        return await chans.stubs(member["address"]).health(pb.HealthRequest())

    assert run(chans, health()).status == pb.HealthReply.SERVING


def test_sizes_are_checked_before_anything_is_allocated(served):
    store, server, chans, member = served
    hello = P.frame(P.HELLO, FULL.encode())
    for meta_len, bulk_len, words in ((2**32 - 1, 0, "meta"), (10, 2**63, "bulk")):
        reply = _raw_exchange(server.data_address, hello + P.pack_header(P.PUSH, meta_len, bulk_len))
        frames = _frames(reply)
        assert frames[0][0] == P.OK and frames[1][0] == P.ERROR
        cls, _, msg = frames[1][1].decode().partition("\n")
        assert cls == "RequestTooLarge" and words in msg, msg
    # a frame that is not this protocol (an HTTP request, gRPC's preface) is told what this port is
    for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"):
        frames = _frames(_raw_exchange(server.data_address, junk))
        assert frames and frames[0][0] == P.ERROR and b"not a frame of this protocol" in frames[0][1]


def test_a_tls_cluster_serves_no_plain_data_plane_and_clients_use_grpc():
    pki = throwaway_pki(HOST)
    store = ShardStore(0, shm_dir=tempfile.mkdtemp(dir="/dev/shm"), max_request_bytes=1 << 20)
    try:
        store.add_table(TableSpec("t", rows=1000, dim=8, seed=1, num_slots=2), range(2), epoch=1)
        server = ShardServer(store, host=HOST, security=Security(credentials=(FULL,), tls_cert=pki["cert"],
                                                                 tls_key=pki["key"], tls_ca=pki["ca"]))
        server.start()
        try:
            assert server.address and server.data_address == ""
        finally:
            server.stop(grace=0.5)
    finally:
        store.close()
        shutil.rmtree(store.shm_dir, ignore_errors=True)


def test_a_client_moves_its_rows_over_the_data_plane_through_ray(ray_local):
    """Through a real cluster (2 shards): gathers, writes and pushes go over TCP by default and equal
    a gRPC-only client's bit for bit; a cluster started with data_plane="grpc" serves no data port."""
    import engram_mem

    with engram_mem.connect(name="dp-tcp", shards=2) as mem:
        assert all(s["data_address"] for s in mem.view.shards.values())
        mem.create_table("t", rows=20_000, dim=16, seed=3)
        ids = np.random.default_rng(1).integers(0, 20_000, (64, 33))
        mem.write("t", np.arange(100), np.full((100, 16), 2.0, np.float32))
        mem.push("t", np.arange(50), -np.ones((50, 16), np.float32), lr=1.0)
        tcp_rows = mem.gather("t", ids)
        counts = mem.transport_counts()
        assert counts["tcp"]["gather"] >= 2 and counts["tcp"]["write"] >= 1 and counts["tcp"]["push"] >= 1
        assert counts["grpc"]["gather"] == counts["grpc"]["write"] == counts["grpc"]["push"] == 0
        # Rows land in the caller's own buffer (here: a torch tensor); ids on one shard arrive straight in.
        import torch

        t = mem.view.table("t")
        one = np.nonzero(t.placement[np.arange(20_000) // t.spec.slot_rows] == 0)[0][:500]
        buf = torch.empty((500, 16), dtype=torch.float32)
        before = mem.transport_counts()["tcp"]["direct_bytes"]
        got = mem.gather("t", one, out=buf)
        assert mem.transport_counts()["tcp"]["direct_bytes"] - before == 500 * 16 * 4
        assert np.shares_memory(got, buf.numpy()) and np.array_equal(buf.numpy(), mem.gather("t", one))
        with pytest.raises(InvalidArgument, match="out= must be"):
            mem.gather("t", one, out=np.empty((500, 8), np.float32))
        # A few repeats (3 in 503): every id is asked for in order, rows land straight in, and each
        # repeat's row is copied from its first occurrence (counted).
        rep = np.concatenate([one, one[[7, 7, 300]]])
        c0 = mem.transport_counts()
        got = mem.gather("t", rep)
        c1 = mem.transport_counts()
        assert c1["tcp"]["direct_bytes"] - c0["tcp"]["direct_bytes"] == rep.size * 16 * 4
        assert c1["tcp"]["staged_bytes"] == c0["tcp"]["staged_bytes"]
        assert c1["client"]["repeat_bytes"] - c0["client"]["repeat_bytes"] == 3 * 16 * 4
        assert np.array_equal(got, mem.gather("t", one)[np.r_[np.arange(500), [7, 7, 300]]])
        # A gather of 1 MB or more returns an array of the client's: once the caller has dropped it,
        # the next one writes into its memory (counted), never while anything still refers to it.
        big = np.random.default_rng(2).integers(0, 20_000, 20_000)
        c0 = mem.transport_counts()["client"]
        first = mem.gather("t", big)
        addr = first.ctypes.data
        second = mem.gather("t", big[::-1].copy())
        assert not np.shares_memory(first, second) and np.array_equal(second, first[::-1])
        del first
        gc.collect()
        third = mem.gather("t", big)
        c1 = mem.transport_counts()["client"]
        assert third.ctypes.data == addr and np.array_equal(third, second[::-1])
        assert c1["reply_arrays_reused"] - c0["reply_arrays_reused"] == 1
        assert c1["reply_arrays_fresh"] - c0["reply_arrays_fresh"] == 2
        # The model's fetcher: remote rows land in its own array, with no copy between.
        from engram_mem.worker.fetcher import RowFetcher

        f = RowFetcher(mem, node_local=False)
        try:
            before = mem.transport_counts()["tcp"]
            uniq, rows, inverse = f.fetch("t", np.concatenate([one, one[:50]]))
            after = mem.transport_counts()["tcp"]
            assert after["direct_bytes"] - before["direct_bytes"] == 500 * 16 * 4
            assert after["staged_bytes"] == before["staged_bytes"]
            assert np.array_equal(rows[inverse], mem.gather("t", np.concatenate([one, one[:50]])))
            # Three shards after a scale, whose moved slots interleave them: the distinct ids in
            # shard order (each shard's sorted), so each shard's rows land in place too.
            from engram_mem.client.routing import split_by_shard

            mem.scale(3)
            mem.refresh()
            t = mem.view.table("t")
            assert split_by_shard(t, np.unique(ids), 3)[2] is not None   # sorted ids are not grouped now
            before = mem.transport_counts()["tcp"]
            uniq, rows, inverse = f.fetch("t", ids)
            after = mem.transport_counts()["tcp"]
            assert np.array_equal(rows[inverse].reshape(ids.shape + (16,)), tcp_rows)
            assert np.array_equal(np.sort(uniq), np.unique(ids)) and len(set(t.placement[uniq // t.spec.slot_rows])) == 3
            assert after["direct_bytes"] - before["direct_bytes"] == uniq.size * 16 * 4
            assert after["staged_bytes"] == before["staged_bytes"]
            # ... and a push of them goes as they are (grouped ids need no sort): rows change as pushed
            keep = uniq >= 100   # (the rows below 100 are checked at the end)
            f.push_async("t", uniq[keep], -np.ones((int(keep.sum()), 16), np.float32), lr=1.0).result()
            assert np.array_equal(mem.gather("t", uniq[keep]), rows[keep] + 1.0)
            tcp_rows = mem.gather("t", ids)
        finally:
            f.close()
        with engram_mem.connect(name="dp-tcp", data_plane="grpc") as g:
            assert np.array_equal(g.gather("t", ids), tcp_rows)
            assert g.transport_counts()["grpc"]["gather"] >= 2 and "tcp" not in g.transport_counts()
        head = mem.gather("t", np.arange(100))
        assert np.array_equal(head[:50], np.full((50, 16), 3.0, np.float32))
        assert np.array_equal(head[50:], np.full((50, 16), 2.0, np.float32))
    with engram_mem.connect(name="dp-grpc", shards=1, data_plane="grpc") as mem:
        assert all(not s["data_address"] for s in mem.view.shards.values())
        mem.create_table("t", rows=1000, dim=4)
        assert mem.gather("t", np.arange(10)).shape == (10, 4)
        assert mem.transport_counts()["grpc"]["gather"] == 1



@pytest.mark.parametrize("scattered", [False, True])
def test_replies_of_megabytes_move_over_blocking_sockets_on_threads_with_the_same_rows(served, scattered):
    """Replies of at least protocol.THREAD_BYTES: sent by the shard's send threads, received on the
    client's pool threads (straight into the caller's array, or a block at a time and scattered)."""
    store, server, chans, member = served
    tcp = TcpConnector(FULL, store.max_request_bytes)
    ids = np.random.default_rng(7).permutation(ROWS)[:30_000]  # 7.3 MB in replies of up to 4 MB
    assert max(b - a for a, b in tcp.gather_batches(ids.size, DIM * 4)) * DIM * 4 >= P.THREAD_BYTES
    dest = np.random.default_rng(8).permutation(ids.size) if scattered else None
    for _ in range(3):  # the connections go back to the pool and serve again
        out = _gather(chans, tcp, member, "t", ids, DIM, dest=dest)
        want = store.gather("t", ids)
        assert np.array_equal(out[dest] if scattered else out, want)
    assert tcp.counts["staged_bytes" if scattered else "direct_bytes"] == 3 * ids.size * DIM * 4
    # the two replies of each gather (4 MB reply limit) came at once, over two connections, reused
    assert len(list(tcp.stream_ranges(ids.size, DIM * 4))) == 2 and tcp.connects == 2
    run(chans, tcp.aclose())


def test_a_reply_that_stops_mid_way_can_be_given_up_and_its_connection_is_not_reused(served):
    """A shard that stops sending half-way through a large reply (a real socket that says OK, sends
    half and stalls): cancelling the request wakes the receiving thread at once, no byte lands in
    the caller's array after the cancel returns, and the connection is closed, not pooled."""
    import asyncio
    import threading

    store, server, chans, member = served
    n, row = 8192, DIM * 4
    lst = socket.create_server((HOST, 0))
    stalled, done = threading.Event(), threading.Event()

    def fake_shard():
        conn, _ = lst.accept()
        with conn:
            conn.recv(P.HEADER.size + len(FULL))
            conn.sendall(P.frame(P.OK))
            conn.recv(1 << 20)  # the GATHER
            conn.sendall(P.frame(P.OK, b"", n * row) + b"\x01" * (n * row // 2))
            stalled.set()
            done.wait(30)

    t = threading.Thread(target=fake_shard, daemon=True)
    t.start()
    tcp = TcpConnector(FULL, store.max_request_bytes)
    fake = {"address": "fake:0", "data_address": f"{HOST}:{lst.getsockname()[1]}"}
    out = np.zeros((n, DIM), np.float32)

    async def give_up():
        task = asyncio.ensure_future(tcp.gather(fake, 1, "t", np.arange(n), out, 0, None))
        while not stalled.is_set():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return True
        return False

    import time
    t0 = time.monotonic()
    assert run(chans, give_up())
    assert time.monotonic() - t0 < 10  # not the stall limit: the cancel woke the thread
    landed = out.copy()
    time.sleep(0.3)
    assert np.array_equal(out, landed)  # nothing written after the cancel returned
    assert not tcp._idle.get("fake:0") and not tcp._open  # closed, never pooled
    done.set()
    lst.close()
    run(chans, tcp.aclose())


def test_a_client_that_never_reads_its_large_reply_holds_up_no_one_else(served):
    """A raw client asks for megabytes and reads none of them: the shard's other connections are
    served meanwhile, and stopping the server does not wait for the stalled send."""
    import time

    store, _, chans, _ = served
    server = ShardServer(store, host=HOST, security=Security(credentials=(FULL,)))
    server.start()
    member = {"address": server.address, "data_address": server.data_address}
    raw = socket.create_connection((HOST, int(server.data_address.rpartition(":")[2])))
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.sendall(P.frame(P.HELLO, FULL.encode()))
    assert P.parse_header(raw.recv(P.HEADER.size), 0, 0, ops={P.OK: "OK"})[0] == P.OK
    ids = np.arange(16_000, dtype="<i8")  # 4 MB, more than the socket buffers hold
    raw.sendall(P.frame(P.GATHER, pb.GatherRequest(table="t", ids=ids.tobytes(), epoch=1).SerializeToString()))
    tcp = TcpConnector(FULL, store.max_request_bytes)
    for _ in range(3):
        big = np.arange(20_000)
        assert np.array_equal(_gather(chans, tcp, member, "t", big, DIM), store.gather("t", big))
    run(chans, tcp.aclose())
    t0 = time.monotonic()
    server.stop(grace=0.5)
    assert time.monotonic() - t0 < 10  # the stalled send was woken, not waited out (protocol.STALL_S)
    raw.close()
