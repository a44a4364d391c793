"""Who may call a shard: credentials, read-only credentials, TLS and mutual TLS, over real loopback gRPC.

Each test starts a ShardServer (no Ray: the server is what decides) and calls it as an outside
client would, with the stub generated from proto/engram_mem/v1/memory.proto. A throwaway CA and
certificates are made with `cryptography`.

    pytest -q tests/integration/test_security.py
"""

import shutil
import tempfile

import grpc
import numpy as np
import pytest

from engram_mem.security import ClientSecurity, Security, authorized_stub, load_security, same_host
from engram_mem.errors import InvalidArgument
from engram_mem.shard.metrics import summarize
from engram_mem.pb.v1 import memory_pb2 as pb
from engram_mem.pb.v1 import memory_pb2_grpc
from engram_mem.shard.server import ShardServer
from engram_mem.storage.store import ShardStore
from engram_mem.table import TableSpec
from tests.pki import throwaway_pki

HOST = "127.0.0.2"
FULL, READ = "full-credential-0123456789abcdef", "read-credential-0123456789abcdef"


@pytest.fixture(scope="module")
def pki():
    return throwaway_pki(HOST)


def _serve(security: Security):
    store = ShardStore(0, shm_dir=tempfile.mkdtemp(dir="/dev/shm"), max_request_bytes=1 << 20)  # _stop removes it
    spec = TableSpec("t", rows=1000, dim=8, seed=3, num_slots=4)
    store.add_table(spec, range(4), epoch=1)
    server = ShardServer(store, host=HOST, security=security, metrics_port=None)
    return store, spec, server, server.start()


def _stop(server, store):
    server.stop(grace=0.5)
    store.close()
    shutil.rmtree(store.shm_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def plain():
    store, spec, server, address = _serve(Security(credentials=(FULL,), read_only_credentials=(READ,)))
    yield store, spec, server, address
    _stop(server, store)


def _ids(*ids):
    return np.asarray(ids, "<i8").tobytes()


CALLS = {
    "Gather": lambda s: list(s.Gather(pb.GatherRequest(table="t", ids=_ids(1, 2)))),
    "Write": lambda s: s.Write(pb.WriteRequest(table="t", ids=_ids(5), rows=np.full(8, 667, np.float32).tobytes(),
                                               dtype="float32")),
    "Push": lambda s: s.Push(pb.PushRequest(table="t", ids=_ids(5), grads=np.ones(8, np.float32).tobytes(),
                                            dtype="float32", step=pb.StepInfo(lr=1.0))),
    "Describe": lambda s: s.Describe(pb.DescribeRequest()),
    "Stats": lambda s: s.Stats(pb.StatsRequest()),
    "Health": lambda s: s.Health(pb.HealthRequest()),
}


def _code(call, stub):
    try:
        call(stub)
        return "OK", None
    except grpc.RpcError as e:
        return e.code().name, e


@pytest.mark.parametrize("presented", [None, "wrong-credential-0123456789", READ + "x", FULL[:-1]])
def test_missing_or_wrong_credential_is_refused_on_every_rpc_and_counted(plain, presented):
    store, spec, server, address = plain
    before = store.gather("t", [5]).copy()
    refused0 = summarize(server.servicer.metrics.registry.collect())["errors_by_code"].get("UNAUTHENTICATED", 0)
    with grpc.insecure_channel(address) as ch:
        stub = authorized_stub(ch, presented) if presented else memory_pb2_grpc.MemoryStub(ch)
        for rpc, call in CALLS.items():
            code, err = _code(call, stub)
            assert code == "UNAUTHENTICATED", (rpc, code)
            assert dict(err.trailing_metadata())["engram-error"] == "Unauthenticated"
            assert rpc in err.details()
    assert np.array_equal(store.gather("t", [5]), before)  # the Write and Push did nothing
    m = summarize(server.servicer.metrics.registry.collect())
    assert m["errors_by_code"]["UNAUTHENTICATED"] == refused0 + len(CALLS)


def test_full_credential_may_do_everything_read_only_may_not_write_or_push(plain):
    store, spec, server, address = plain
    with grpc.insecure_channel(address) as ch:
        full, ro = authorized_stub(ch, FULL), authorized_stub(ch, READ)
        assert all(_code(call, full)[0] == "OK" for call in CALLS.values())
        before = store.gather("t", [5]).copy()
        for rpc, call in CALLS.items():
            code, err = _code(call, ro)
            if rpc in ("Write", "Push"):
                assert code == "PERMISSION_DENIED", (rpc, code)
                assert dict(err.trailing_metadata())["engram-error"] == "PermissionDenied"
                assert "read-only" in err.details()
            else:
                assert code == "OK", (rpc, code, err)
        assert np.array_equal(store.gather("t", [5]), before)


def test_describe_reveals_shm_paths_only_to_same_host_peers(plain):
    store, spec, server, address = plain
    with grpc.insecure_channel(address) as ch:
        d = authorized_stub(ch, READ).Describe(pb.DescribeRequest())
    assert d.tables[0].shm_path.startswith("/dev/shm/")  # loopback: same machine
    assert same_host("ipv4:127.0.0.1:5000") and same_host("ipv6:[::1]:5000")
    assert not same_host("ipv4:203.0.113.9:5000", local=frozenset()) and not same_host("", local=frozenset())


def test_credentials_from_files_and_environment(tmp_path):
    f = tmp_path / "cred"
    f.write_text(FULL + "\nprevious-credential-0123456789\n")
    s = load_security(str(f), env={"ENGRAM_MEM_READONLY_CREDENTIAL": READ})
    assert s.credentials == (FULL, "previous-credential-0123456789") and s.read_only_credentials == (READ,)
    assert s.level("previous-credential-0123456789") == "full" and s.client()["credential"] == FULL
    assert load_security(env={"ENGRAM_MEM_CREDENTIAL": FULL}).credentials == (FULL,)
    assert len(load_security(env={}).credentials[0]) >= 32  # none given: a new random one
    with pytest.raises(InvalidArgument, match="16 printable"):
        Security(credentials=("short",))
    with pytest.raises(InvalidArgument, match="--tls-ca"):
        Security(credentials=(FULL,), tls_cert="x", tls_key="y")


def _tls_call(address, sec: ClientSecurity):
    import asyncio

    async def run():
        ch = sec.channel(address, [])
        try:
            stub = ch.unary_unary("/engram_mem.v1.Memory/Health", request_serializer=lambda m: m.SerializeToString(),
                                  response_deserializer=pb.HealthReply.FromString)
            return (await sec.wrap(stub)(pb.HealthRequest(), timeout=10)).status
        finally:
            await ch.close()

    try:
        return asyncio.run(run())
    except grpc.RpcError as e:
        return e.code().name


def test_tls_round_trip_and_client_verifies_the_server(pki):
    sec = Security(credentials=(FULL,), tls_cert=pki["cert"], tls_key=pki["key"], tls_ca=pki["ca"])
    store, spec, server, address = _serve(sec)
    try:
        assert _tls_call(address, ClientSecurity(**sec.client())) == pb.HealthReply.SERVING
        # the credential is still required inside TLS
        assert _tls_call(address, ClientSecurity(tls_ca=pki["ca"])) == "UNAUTHENTICATED"
        # a client that trusts another CA refuses the server; a plaintext client cannot talk to it
        assert _tls_call(address, ClientSecurity(credential=FULL, tls_ca=pki["rogue_cert"])) == "UNAVAILABLE"
        assert _tls_call(address, ClientSecurity(credential=FULL)) == "UNAVAILABLE"
    finally:
        _stop(server, store)


def test_mutual_tls_requires_a_client_certificate_from_the_ca(pki):
    sec = Security(credentials=(FULL,), tls_cert=pki["cert"], tls_key=pki["key"], tls_ca=pki["ca"], mtls=True,
                   client_cert=pki["client_cert"], client_key=pki["client_key"])
    store, spec, server, address = _serve(sec)
    try:
        assert _tls_call(address, ClientSecurity(**sec.client())) == pb.HealthReply.SERVING
        assert _tls_call(address, ClientSecurity(credential=FULL, tls_ca=pki["ca"])) == "UNAVAILABLE"
        rogue = ClientSecurity(credential=FULL, tls_ca=pki["ca"], client_cert=pki["rogue_cert"],
                               client_key=pki["rogue_key"])
        assert _tls_call(address, rogue) == "UNAVAILABLE"
    finally:
        _stop(server, store)


def test_credential_rotation_accepts_old_and_new_until_finished(plain):
    from engram_mem.security import rotated

    store, spec, server, address = plain
    new = "new-credential-0123456789abcdefgh"
    health = CALLS["Health"]
    with grpc.insecure_channel(address) as ch:
        old_stub, new_stub = authorized_stub(ch, FULL), authorized_stub(ch, new)
        assert _code(health, new_stub)[0] == "UNAUTHENTICATED"
        server.set_credentials(rotated(server.security, [new]))           # step 1: both accepted
        assert _code(health, old_stub)[0] == "OK" and _code(CALLS["Push"], new_stub)[0] == "OK"
        assert server.security.client()["credential"] == new              # handed out from now on
        server.set_credentials(rotated(server.security, finish=True))     # step 2: only the new one
        assert _code(health, old_stub)[0] == "UNAUTHENTICATED" and _code(health, new_stub)[0] == "OK"
        server.set_credentials(Security(credentials=(FULL,), read_only_credentials=(READ,)))  # as the module began
