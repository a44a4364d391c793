"""Any bytes get a defined status: a seeded fuzzer sends 12,000 malformed and random requests to a live shard.

Random bytes, mutated valid requests (bit flips, truncation, splices), random field values (table
names, id/row bytes, dtype strings, chunk_rows up to 2^32-1, NaN/negative learning rates) and
invalid UTF-8, across all six RPCs, over real loopback gRPC; 1 in 12 without the credential or with
a wrong one (each must be UNAUTHENTICATED), the rest with the cluster credential. Every
reply must be OK or a status with the project's error class in `engram-error` (never UNKNOWN or
INTERNAL); afterwards the shard is healthy, counted every error, and the rows written before are
unchanged. Also: reply size is bounded before any copy (RequestTooLarge) and chunk_rows is clamped.

    pytest -q tests/integration/test_fuzz.py
"""

import asyncio
import shutil
import tempfile

import grpc
import numpy as np
import pytest

from engram_mem.security import ClientSecurity
from engram_mem.shard.metrics import summarize
from engram_mem.pb.v1 import memory_pb2 as pb
from engram_mem.shard.server import ShardServer
from engram_mem.storage.store import ShardStore
from engram_mem.table import TableSpec
from engram_mem.wire import MAX_CHUNK_BYTES, gather_chunk_rows

RPCS = ("Gather", "Write", "Push", "Describe", "Stats", "Health")
N_REQUESTS = 12_000
KEEP_IDS = np.arange(0, 2000, 7)


@pytest.fixture(scope="module")
def shard():
    store = ShardStore(0, shm_dir=tempfile.mkdtemp(dir="/dev/shm"), max_request_bytes=1 << 20)
    store.add_table(TableSpec("keep", rows=2000, dim=16, seed=1, num_slots=8), range(8), epoch=1)
    store.add_table(TableSpec("fuzz", rows=500, dim=4, seed=2, num_slots=4), range(4), epoch=1)
    store.add_table(TableSpec("f16", rows=500, dim=4, dtype="float16", num_slots=4), range(4), epoch=1)
    store.add_table(TableSpec("wide", rows=10_000, dim=256, num_slots=4), range(4), epoch=1)
    store.write("keep", KEEP_IDS, np.random.default_rng(5).standard_normal((KEEP_IDS.size, 16)).astype(np.float32))
    server = ShardServer(store, host="127.0.0.2")
    address = server.start()
    yield store, server, address
    server.stop(grace=0.5)
    store.close()
    shutil.rmtree(store.shm_dir, ignore_errors=True)


def _valid(rng, rpc: str) -> bytes:
    table = str(rng.choice(["fuzz", "f16", "fuzz", "nope", ""]))
    n = int(rng.integers(0, 6))
    ids = rng.integers(-2, 520, n).astype("<i8").tobytes()
    dim = 4
    if rpc == "Gather":
        m = pb.GatherRequest(table=table, ids=ids, epoch=int(rng.choice([0, 1, 2])),
                             chunk_rows=int(rng.choice([0, 1, 3, 2**32 - 1])))
    elif rpc in ("Write", "Push"):
        dtype = str(rng.choice(["float32", "float16", "bfloat16", "int8", "float64", "", "\u00e9"]))
        rows = rng.standard_normal((n, dim + int(rng.choice([0, 0, 1])))).astype(np.float32)
        if rpc == "Push" and rng.random() < 0.1:  # (Write stores what it is given, NaN included)
            rows[0:1] = np.nan
        if rpc == "Write":
            m = pb.WriteRequest(table=table, ids=ids, rows=rows.tobytes(), dtype=dtype, epoch=int(rng.choice([0, 1])))
        else:
            step = pb.StepInfo(step=int(rng.integers(0, 2**63)), worker=str(rng.integers(0, 9)))
            if rng.random() < 0.8:
                step.lr = float(rng.choice([0.01, -1.0, np.nan, np.inf, -np.inf]))
            m = pb.PushRequest(table=table, ids=ids, grads=rows.tobytes(), dtype=dtype, epoch=int(rng.choice([0, 1])),
                               step=step)
    else:
        m = getattr(pb, f"{rpc}Request")()
    return m.SerializeToString()


def _mutate(rng, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        op = rng.integers(0, 4)
        if op == 0 and b:
            i = int(rng.integers(0, len(b)))
            b[i] ^= 1 << int(rng.integers(0, 8))
        elif op == 1 and b:
            del b[int(rng.integers(0, len(b))):]
        elif op == 2:
            i = int(rng.integers(0, len(b) + 1))
            b[i:i] = rng.bytes(int(rng.integers(1, 12)))
        else:
            b += bytes([0x0A, 0x03, 0xFF, 0xFE, 0xFD])  # field 1 (table name, a string) with invalid UTF-8
    return bytes(b)


def _request(rng, rpc: str) -> bytes:
    kind = rng.integers(0, 3)
    if kind == 0:
        return rng.bytes(int(rng.integers(0, 200)))
    valid = _valid(rng, rpc)
    return valid if kind == 1 and rng.random() < 0.3 else _mutate(rng, valid)


async def _fuzz(address: str, credential: str, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    ch = ClientSecurity().channel(address, [])
    ident = lambda b: b  # noqa: E731 - raw bytes in and out
    raw = {rpc: ch.unary_stream(f"/engram_mem.v1.Memory/{rpc}", request_serializer=ident, response_deserializer=ident)
           if rpc == "Gather" else
           ch.unary_unary(f"/engram_mem.v1.Memory/{rpc}", request_serializer=ident, response_deserializer=ident)
           for rpc in RPCS}
    # 1 call in 12 carries no credential or a wrong one (UNAUTHENTICATED); the rest the right one
    creds = {"right": credential, "none": None, "wrong": "x" * 16 + credential[16:]}
    codes: dict = {}
    unclassified: list = []
    sem = asyncio.Semaphore(32)

    async def one(rpc: str, data: bytes, who: str):
        md = (("authorization", f"Bearer {creds[who]}"),) if creds[who] else ()
        async with sem:
            try:
                if rpc == "Gather":
                    async for _ in raw[rpc](data, timeout=30, metadata=md):
                        pass
                else:
                    await raw[rpc](data, timeout=30, metadata=md)
                code = "OK"
            except grpc.aio.AioRpcError as e:
                code = e.code().name
                if not dict(e.trailing_metadata() or ()).get("engram-error"):
                    unclassified.append((rpc, code, e.details()))
            codes[(rpc, code)] = codes.get((rpc, code), 0) + 1
            if who != "right" and code != "UNAUTHENTICATED":
                unclassified.append((rpc, code, f"{who} credential was not refused"))

    who = rng.choice(["right"] * 22 + ["none", "wrong"], n)
    try:
        await asyncio.gather(*(one(RPCS[int(i)], _request(rng, RPCS[int(i)]), str(w))
                               for i, w in zip(rng.integers(0, 6, n), who)))
    finally:
        await ch.close()
    return {"codes": codes, "unclassified": unclassified}


@pytest.mark.slow
def test_fuzzed_requests_get_defined_statuses_and_change_nothing_they_should_not(shard):
    store, server, address = shard
    keep = store.gather("keep", KEEP_IDS).copy()
    errors0 = sum(summarize(server.servicer.metrics.registry.collect())["errors"].values())
    out = asyncio.run(_fuzz(address, server.security.credentials[0], N_REQUESTS, seed=1234))
    codes = out["codes"]
    assert sum(codes.values()) == N_REQUESTS
    assert {rpc for rpc, _ in codes} == set(RPCS)
    bad = {k: v for k, v in codes.items() if k[1] in ("UNKNOWN", "INTERNAL")}
    assert not bad, bad
    assert not out["unclassified"], out["unclassified"][:5]
    assert sum(v for (rpc, c), v in codes.items() if c == "INVALID_ARGUMENT") > N_REQUESTS // 3  # mostly refused
    n_errors = sum(v for (_, c), v in codes.items() if c != "OK")
    m = summarize(server.servicer.metrics.registry.collect())
    assert sum(m["errors"].values()) - errors0 == n_errors  # every refusal counted, by class
    assert store.ready and np.array_equal(store.gather("keep", KEEP_IDS), keep)
    assert np.isfinite(store.gather("fuzz", np.arange(500))).all()  # no NaN/Inf lr or gradient got in


def test_reply_size_is_bounded_before_any_copy_and_chunk_rows_clamped(shard):
    store, server, address = shard

    async def gather(ids, chunk_rows=0):
        sec = ClientSecurity(credential=server.security.credentials[0])
        ch = sec.channel(address, [("grpc.max_receive_message_length", 64 << 20)])
        try:
            call = sec.wrap(ch.unary_stream("/engram_mem.v1.Memory/Gather",
                                            request_serializer=lambda m: m.SerializeToString(),
                                            response_deserializer=pb.RowsChunk.FromString))
            return [c.rows async for c in call(pb.GatherRequest(table="wide", ids=np.asarray(ids, "<i8").tobytes(),
                                                                chunk_rows=chunk_rows))]
        finally:
            await ch.close()

    # 5,000 rows x 1 KB = 5 MB is over the 4 MB reply limit of a 1 MB request limit: refused up front
    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(gather(np.zeros(5000, np.int64), chunk_rows=2**32 - 1))
    e = info.value
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(e.trailing_metadata())["engram-error"] == "RequestTooLarge" and "reply limit" in e.details()
    chunks = asyncio.run(gather(np.arange(3000), chunk_rows=2**32 - 1))  # 3 MB: allowed, in one clamped chunk
    assert len(chunks) == 1 and len(chunks[0]) == 3000 * 1024
    assert gather_chunk_rows(2**32 - 1, 1024) == MAX_CHUNK_BYTES // 1024 and gather_chunk_rows(0, 1024) == 1024
    assert store.ready
