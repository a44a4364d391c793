"""One shard's gRPC server over real loopback gRPC, spoken to with the generated protobuf stub."""

import os
import shutil
import tempfile

import grpc
import numpy as np
import pytest

from engram_mem.security import authorized_stub
from engram_mem.pb.v1 import memory_pb2 as pb
from engram_mem.shard.server import ShardServer
from engram_mem.storage.store import ShardStore
from engram_mem.table import TableSpec


SERVED: dict = {}  # the served shard's address and credential, for tests that make their own channels


@pytest.fixture(scope="module")
def served():
    shm = tempfile.mkdtemp(dir="/dev/shm")
    store = ShardStore(0, shm_dir=shm, max_request_bytes=1 << 20)
    spec = TableSpec("t", rows=50_000, dim=32, seed=9, num_slots=16)
    store.add_table(spec, range(16), epoch=4)
    store.add_table(TableSpec("half", rows=100, dim=8, dtype="float16"), range(100), epoch=4)
    server = ShardServer(store, host="127.0.0.2")
    address = server.start()
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20),
                                                      ("grpc.max_receive_message_length", 64 << 20)])
    stub = authorized_stub(channel, server.security.credentials[0])
    SERVED.update(address=address, credential=server.security.credentials[0])
    yield store, spec, stub
    channel.close()
    server.stop(grace=1.0)
    store.close()
    shutil.rmtree(shm, ignore_errors=True)


def _ids(*ids):
    return np.asarray(ids, dtype="<i8").tobytes()


def _gather(stub, table, ids, **kw):
    chunks = list(stub.Gather(pb.GatherRequest(table=table, ids=np.asarray(ids, "<i8").tobytes(), **kw)))
    return b"".join(c.rows for c in chunks), len(chunks)


def test_gather_streams_chunks_a_standard_client_can_parse(served):
    store, spec, stub = served
    ids = np.random.default_rng(0).integers(0, spec.rows, 5000)
    data, n_chunks = _gather(stub, "t", ids, epoch=4, chunk_rows=1000)
    assert n_chunks == 5
    assert np.array_equal(np.frombuffer(data, np.float32).reshape(-1, 32), spec.init_rows(ids))
    data, n_chunks = _gather(stub, "t", [])
    assert data == b"" and n_chunks == 1


def test_write_push_describe_stats_health(served):
    store, spec, stub = served
    rows = np.arange(64, dtype=np.float32).reshape(2, 32)
    assert stub.Write(pb.WriteRequest(table="t", ids=_ids(10, 11), rows=rows.tobytes(), dtype="float32")).rows_written == 2
    step = pb.StepInfo(step=1, lr=0.5)
    r = stub.Push(pb.PushRequest(table="t", ids=_ids(10, 10), grads=np.ones((2, 32), np.float32).tobytes(),
                                 dtype="float32", step=step))
    assert r.rows_updated == 1
    got = np.frombuffer(_gather(stub, "t", [10, 11])[0], np.float32).reshape(2, 32)
    assert np.array_equal(got, rows - np.array([[1.0], [0.0]], np.float32))
    d = stub.Describe(pb.DescribeRequest())
    assert d.epoch == 4 and {t.name for t in d.tables} == {"t", "half"}
    t = next(t for t in d.tables if t.name == "t")
    assert np.array_equal(np.frombuffer(t.owned_slots, "<i4"), np.arange(16)) and t.shm_path
    st = stub.Stats(pb.StatsRequest())
    assert st.requests["Gather"] >= 1 and st.rows_gathered > 0 and st.table_bytes >= spec.nbytes
    assert stub.Health(pb.HealthRequest()).status == pb.HealthReply.SERVING


BAD = [
    ("unknown table", lambda s: s.Gather(pb.GatherRequest(table="nope", ids=_ids(1))), "NOT_FOUND", ["'nope'"]),
    ("id below 0", lambda s: s.Gather(pb.GatherRequest(table="t", ids=_ids(-5))), "OUT_OF_RANGE", ["'t'", "'ids'", "-5"]),
    ("id at rows", lambda s: s.Gather(pb.GatherRequest(table="t", ids=_ids(50_000))), "OUT_OF_RANGE", ["'t'", "'ids'", "50000"]),
    ("ids not multiple of 8", lambda s: s.Gather(pb.GatherRequest(table="t", ids=b"\x01" * 12)), "INVALID_ARGUMENT", ["'t'", "'ids'", "12 bytes"]),
    ("grad dtype", lambda s: s.Push(pb.PushRequest(table="t", ids=_ids(1), grads=b"\0" * 64, dtype="float16")), "INVALID_ARGUMENT", ["'t'", "'grads'", "float16"]),
    ("grad length", lambda s: s.Push(pb.PushRequest(table="t", ids=_ids(1), grads=b"\0" * 64, dtype="float32")), "INVALID_ARGUMENT", ["'t'", "'grads'", "64 bytes"]),
    ("row dim", lambda s: s.Write(pb.WriteRequest(table="t", ids=_ids(1, 2), rows=b"\0" * 4 * 31 * 2, dtype="float32")), "INVALID_ARGUMENT", ["'t'", "'rows'", "248 bytes"]),
    ("row dtype", lambda s: s.Write(pb.WriteRequest(table="t", ids=_ids(1), rows=b"\0" * 64, dtype="int16")), "INVALID_ARGUMENT", ["'t'", "'rows'", "int16"]),
    ("NaN gradient", lambda s: s.Push(pb.PushRequest(table="t", ids=_ids(3), grads=np.full(32, np.nan, np.float32).tobytes(), dtype="float32")), "INVALID_ARGUMENT", ["'t'", "'grads'", "NaN"]),
    ("Inf gradient", lambda s: s.Push(pb.PushRequest(table="t", ids=_ids(3, 4), grads=np.r_[np.ones(32), np.full(32, np.inf)].astype(np.float32).tobytes(), dtype="float32")), "INVALID_ARGUMENT", ["'t'", "'grads'", "row id 4"]),
    ("over size limit", lambda s: s.Gather(pb.GatherRequest(table="t", ids=np.zeros(200_000, "<i8").tobytes())), "RESOURCE_EXHAUSTED", ["'t'", "'ids'", "1600000 bytes", "limit"]),
    ("stale epoch", lambda s: s.Gather(pb.GatherRequest(table="t", ids=_ids(1), epoch=3)), "FAILED_PRECONDITION", ["epoch 3", "epoch 4"]),
]


@pytest.mark.parametrize("case, call, code, words", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_a_status_that_names_what_was_wrong(served, case, call, code, words):
    store, spec, stub = served
    before = np.frombuffer(_gather(stub, "t", [3, 4])[0], np.float32).copy()
    with pytest.raises(grpc.RpcError) as info:
        r = call(stub)
        list(r) if not hasattr(r, "DESCRIPTOR") else r
    err = info.value
    assert err.code().name == code, (err.code(), err.details())
    for w in words:
        assert w in err.details(), (w, err.details())
    assert dict(err.trailing_metadata()).get("engram-error")
    # Nothing was applied, and the server keeps serving.
    assert np.array_equal(np.frombuffer(_gather(stub, "t", [3, 4])[0], np.float32), before)
    assert stub.Health(pb.HealthRequest()).status == pb.HealthReply.SERVING


def test_shard_not_ready(served):
    store, spec, stub = served
    store.set_ready(False, "restoring slots from lmdb")
    try:
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Gather(pb.GatherRequest(table="t", ids=_ids(1))))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "not ready" in info.value.details()
        assert stub.Health(pb.HealthRequest()).status == pb.HealthReply.NOT_READY
    finally:
        store.set_ready(True)
    assert len(_gather(stub, "t", [1])[0]) == 128


def test_a_new_channel_for_an_address_leaves_calls_in_flight_on_the_old_one_to_finish(served):
    """ShardChannels.forget (a client re-resolving a shard) must not cancel other requests' calls
    on the old channel: those the shard may already have applied. And a call whose channel does
    close under it is a retryable ShardUnavailable that says it may have been sent, never asyncio's
    CancelledError."""
    import asyncio

    from engram_mem.security import ClientSecurity
    from engram_mem.transport.grpc_channels import CALL_ERRORS, ShardChannels, call_error
    from engram_mem.errors import ShardUnavailable

    store, spec, _ = served
    address = SERVED["address"]
    chans = ShardChannels(64 << 20, ClientSecurity(credential=SERVED["credential"]))
    ids = np.arange(30_000, dtype="<i8").tobytes()

    async def gather_all(stubs):
        n = 0
        try:
            async for chunk in stubs.gather(pb.GatherRequest(table="t", ids=ids, epoch=4, chunk_rows=500)):
                n += len(chunk)
                await asyncio.sleep(0.002)  # a slow reader: the call is still in flight below
        except CALL_ERRORS as e:
            return call_error(e, address)
        return n

    async def forgotten_mid_call():
        stubs = chans.stubs(address)
        call = asyncio.ensure_future(gather_all(stubs))
        await asyncio.sleep(0.02)
        chans.forget(address)                  # a new channel from here on; the old one drains
        assert chans.stubs(address) is not stubs
        return await call

    async def closed_mid_call():
        stubs = chans.stubs(address)
        call = asyncio.ensure_future(gather_all(stubs))
        await asyncio.sleep(0.02)
        await stubs.channel.close()            # what the old forget() did to every shard's channel
        return await call

    try:
        assert chans.submit(forgotten_mid_call()).result(30) == 30_000 * spec.dim * 4
        err = chans.submit(closed_mid_call()).result(30)
        assert isinstance(err, ShardUnavailable) and err.sent and err.address == address, repr(err)
    finally:
        chans.close()
