"""Who may call a shard: the cluster credential, read-only credentials, TLS and mutual TLS.

Every RPC carries `authorization: Bearer <credential>` in its gRPC metadata. A shard's server
interceptor compares it in constant time with the cluster's credentials:

    full credential       -> all six RPCs
    read-only credential  -> Gather, Describe, Stats, Health; Write and Push get PERMISSION_DENIED
    missing / wrong       -> UNAUTHENTICATED

Both refusals carry the error class in the trailing metadata `engram-error` (like every other
error of a shard) and are counted. The credentials live in `ClusterConfig.security` (created at
`engram-mem up`, or read from a file / environment variable); clients that attach through Ray
ask the controller for them (Ray's token authentication guards that path), clients outside Ray
pass one to `connect(credential=...)`.

TLS is optional: with a certificate and key the shards serve TLS and clients verify them against
the CA; with `mtls` the shards also require a client certificate signed by that CA.

    sec = Security.create()                                   # fresh random credentials, no TLS
    sec = load_security(credential_file="cred.txt", tls_cert="s.pem", tls_key="s.key", tls_ca="ca.pem")
    server.add_generic_rpc_handlers(...); interceptors=[AuthInterceptor(sec, on_refused)]
    channel = ClientSecurity(**ctl.client_security(read_only=True)).channel("127.0.0.2:5000", opts)
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import os
import secrets
from dataclasses import asdict, dataclass, field

import grpc

from engram_mem.errors import InvalidArgument, PermissionDenied, Unauthenticated

METADATA_KEY = "authorization"
ENV_CREDENTIAL = "ENGRAM_MEM_CREDENTIAL"            # comma-separated: first = current, rest = still accepted
ENV_READ_ONLY_CREDENTIAL = "ENGRAM_MEM_READONLY_CREDENTIAL"
READ_RPCS = frozenset({"Gather", "Describe", "Stats", "Health"})
_SECRET_FIELDS = ("credentials", "read_only_credentials", "tls_key", "client_key")


def new_credential() -> str:
    return secrets.token_urlsafe(32)


def _check_credential(c: str, what: str) -> str:
    if not isinstance(c, str) or len(c) < 16 or not c.isascii() or not c.isprintable() or " " in c or "," in c:
        raise InvalidArgument(f"{what} must be at least 16 printable ASCII characters without spaces or commas; "
                              f"create one with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    return c


@dataclass(frozen=True)
class Security:
    """The cluster's credentials and TLS material (PEM text, not paths: shards run on other nodes)."""

    credentials: tuple = ()              # full-access credentials; [0] is handed out, the rest still accepted
    read_only_credentials: tuple = ()    # Gather/Describe/Stats/Health only; [0] is handed out
    tls_cert: str = ""                   # shard certificate chain (PEM); "" = no TLS
    tls_key: str = ""
    tls_ca: str = ""                     # CA clients verify shards with (and shards verify clients with, if mtls)
    mtls: bool = False                   # shards require a client certificate signed by tls_ca
    client_cert: str = ""                # handed to clients that attach through Ray, for mtls
    client_key: str = ""
    server_name: str = ""                # name the shard certificate holds, if not the node IPs

    def __post_init__(self):
        object.__setattr__(self, "credentials", tuple(self.credentials))
        object.__setattr__(self, "read_only_credentials", tuple(self.read_only_credentials))
        if not self.credentials:
            raise InvalidArgument("security needs at least one full-access credential")
        for c in self.credentials:
            _check_credential(c, "a cluster credential")
        for c in self.read_only_credentials:
            _check_credential(c, "a read-only credential")
        if set(self.credentials) & set(self.read_only_credentials):
            raise InvalidArgument("a credential cannot be both full-access and read-only; use different ones")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InvalidArgument("TLS needs both a certificate and its key (--tls-cert and --tls-key)")
        if self.tls_cert and not self.tls_ca:
            raise InvalidArgument("TLS needs the CA certificate clients verify the shards with (--tls-ca)")
        if self.mtls and not (self.tls_cert and self.client_cert and self.client_key):
            raise InvalidArgument("mutual TLS needs the shard TLS files and a client certificate and key "
                                  "(--tls-client-cert, --tls-client-key) for clients that attach through Ray")

    @classmethod
    def create(cls, **tls) -> "Security":
        """Fresh random full and read-only credentials."""
        return cls(credentials=(new_credential(),), read_only_credentials=(new_credential(),), **tls)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Security":
        return cls.create() if not d else cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def client(self, read_only: bool = False) -> dict:
        """What a client needs (ClientSecurity kwargs): one credential and the TLS files for its side."""
        creds = self.read_only_credentials if read_only else self.credentials
        if not creds:
            raise PermissionDenied("this cluster has no read-only credential; start it with one")
        return {"credential": creds[0], "tls_ca": self.tls_ca if self.tls else "",
                "client_cert": self.client_cert if self.mtls else "",
                "client_key": self.client_key if self.mtls else "", "server_name": self.server_name}

    # ---- server side -----------------------------------------------------------------------
    def level(self, presented: str | None) -> str:
        """'full', 'read' or '' for a presented credential; every comparison runs (constant time)."""
        p = (presented or "").encode()
        full = [hmac.compare_digest(p, c.encode()) for c in self.credentials]
        read = [hmac.compare_digest(p, c.encode()) for c in self.read_only_credentials]
        return "full" if any(full) else "read" if any(read) else ""

    def add_port(self, server, address: str) -> int:
        if not self.tls:
            return server.add_insecure_port(address)
        creds = grpc.ssl_server_credentials([(self.tls_key.encode(), self.tls_cert.encode())],
                                            root_certificates=self.tls_ca.encode() if self.mtls else None,
                                            require_client_auth=self.mtls)
        return server.add_secure_port(address, creds)


def rotated(sec: Security, credentials=None, read_only_credentials=None, finish: bool = False) -> Security:
    """Step 1 (finish=False): new credentials (given, or fresh) first, the old ones still accepted.
    Step 2 (finish=True): only the current (first) ones are accepted."""
    import dataclasses

    if finish:
        return dataclasses.replace(sec, credentials=sec.credentials[:1],
                                   read_only_credentials=sec.read_only_credentials[:1])
    full = tuple(credentials or (new_credential(),))
    ro = tuple(read_only_credentials or (new_credential(),))
    return dataclasses.replace(sec, credentials=full + tuple(c for c in sec.credentials if c not in full),
                               read_only_credentials=ro + tuple(c for c in sec.read_only_credentials if c not in ro))


def redact(security: dict | None) -> dict | None:
    """security with its secrets blanked, for describe() and status output."""
    if not security:
        return security
    return {k: ("<redacted>" if k in _SECRET_FIELDS and v else v) for k, v in security.items()}


def read_pem_or_text(path: str | None, what: str) -> str:
    if not path:
        return ""
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        raise InvalidArgument(f"cannot read the {what} file {path!r}: {e.strerror}") from None


def split_credentials(text: str) -> tuple:
    return tuple(t.strip() for t in text.replace(",", "\n").splitlines() if t.strip())


def load_security(credential_file: str | None = None, read_only_credential_file: str | None = None, *,
                  tls_cert: str | None = None, tls_key: str | None = None, tls_ca: str | None = None,
                  mtls: bool = False, client_cert: str | None = None, client_key: str | None = None,
                  server_name: str = "", env=None) -> Security:
    """Security for `engram-mem up`: credentials from files (one per line, the first is current),
    else from ENGRAM_MEM_CREDENTIAL / ENGRAM_MEM_READONLY_CREDENTIAL (comma-separated), else new."""
    env = os.environ if env is None else env
    text = lambda path, what: read_pem_or_text(path, what)  # noqa: E731
    full = split_credentials(text(credential_file, "credential")) or split_credentials(env.get(ENV_CREDENTIAL, ""))
    ro = (split_credentials(text(read_only_credential_file, "read-only credential"))
          or split_credentials(env.get(ENV_READ_ONLY_CREDENTIAL, "")))
    if credential_file and not full:
        raise InvalidArgument(f"the credential file {credential_file!r} holds no credential")
    return Security(credentials=full or (new_credential(),), read_only_credentials=ro or (new_credential(),),
                    tls_cert=text(tls_cert, "TLS certificate"), tls_key=text(tls_key, "TLS key"),
                    tls_ca=text(tls_ca, "TLS CA"), mtls=mtls, client_cert=text(client_cert, "TLS client certificate"),
                    client_key=text(client_key, "TLS client key"), server_name=server_name)


# ---- the shard's interceptor -------------------------------------------------------------------
def _refusal(handler, code: grpc.StatusCode, message: str, cls: str):
    """A handler of the same kind as `handler` that only refuses the call."""
    async def refuse(context):
        context.set_trailing_metadata((("engram-error", cls),))
        await context.abort(code, message)

    if handler.unary_stream:
        async def stream(request, context):
            await refuse(context)
            yield b""  # never reached; makes this an async generator
        return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)

    async def unary(request, context):
        await refuse(context)
    return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid credential (UNAUTHENTICATED) or beyond it (PERMISSION_DENIED).

    on_refused(rpc, error_class, code_name) is called for every refusal (the shard counts them)."""

    def __init__(self, security: Security, on_refused=None, what: str = "shard"):
        self.security, self.on_refused, self.what = security, on_refused, what

    async def intercept_service(self, continuation, details):
        rpc = details.method.rsplit("/", 1)[-1]
        presented = None
        for key, value in details.invocation_metadata or ():
            if key == METADATA_KEY:
                presented = value.decode("latin-1") if isinstance(value, bytes) else value
                break
        if presented is not None and presented.startswith("Bearer "):
            presented = presented[7:]
        level = self.security.level(presented)
        if level == "full" or (level == "read" and rpc in READ_RPCS):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:  # not one of our methods: gRPC answers UNIMPLEMENTED
            return None
        if level == "read":
            err = PermissionDenied(f"{self.what}: {rpc} needs the full cluster credential; this one is read-only "
                                   f"(it allows {', '.join(sorted(READ_RPCS))})")
        elif presented is None:
            err = Unauthenticated(f"{self.what}: {rpc} needs the cluster credential in the '{METADATA_KEY}' "
                                  f"metadata; get it with `engram-mem credential` or connect through Ray")
        else:
            err = Unauthenticated(f"{self.what}: {rpc}: the credential presented is not this cluster's")
        if self.on_refused is not None:
            self.on_refused(rpc, type(err).__name__, err.code)
        return _refusal(handler, getattr(grpc.StatusCode, err.code), str(err), type(err).__name__)


# ---- the client's side -------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientSecurity:
    """A client's credential and TLS files; makes its channels and adds the metadata to its calls."""

    credential: str = ""
    tls_ca: str = ""
    client_cert: str = ""
    client_key: str = ""
    server_name: str = ""
    metadata: tuple = field(default=(), init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "metadata", ((METADATA_KEY, f"Bearer {self.credential}"),) if self.credential else ())

    def channel(self, address: str, options: list) -> grpc.aio.Channel:
        if not self.tls_ca:
            return grpc.aio.insecure_channel(address, options=options)
        creds = grpc.ssl_channel_credentials(root_certificates=self.tls_ca.encode(),
                                             private_key=self.client_key.encode() or None,
                                             certificate_chain=self.client_cert.encode() or None)
        if self.server_name:
            options = list(options) + [("grpc.ssl_target_name_override", self.server_name)]
        return grpc.aio.secure_channel(address, creds, options=options)

    def wrap(self, multicallable):
        """The stub callable with this client's metadata on every call."""
        return functools.partial(multicallable, metadata=self.metadata) if self.metadata else multicallable


def authorized_stub(channel, credential: str):
    """A generated MemoryStub (sync or aio channel) that sends `credential` with every call."""
    from engram_mem.pb.v1 import memory_pb2_grpc

    stub = memory_pb2_grpc.MemoryStub(channel)
    md = ((METADATA_KEY, f"Bearer {credential}"),)
    for rpc in ("Gather", "Write", "Push", "Describe", "Stats", "Health"):
        setattr(stub, rpc, functools.partial(getattr(stub, rpc), metadata=md))
    return stub


def client_security(credential: str | None, tls: dict | None = None) -> dict:
    """ClientSecurity kwargs for a client outside Ray: a credential and TLS files by path
    (tls = {"ca": ..., "cert": ..., "key": ..., "server_name": ...}; cert and key for mutual TLS)."""
    tls = dict(tls or {})
    unknown = set(tls) - {"ca", "cert", "key", "server_name"}
    if unknown:
        raise InvalidArgument(f"tls has unknown keys {sorted(unknown)}; use ca, cert, key, server_name")
    if tls.get("cert") and not tls.get("ca"):
        raise InvalidArgument("tls needs 'ca' (the CA that signed the shards' certificate) to verify the shards")
    return {"credential": _check_credential(credential, "the credential") if credential else "",
            "tls_ca": read_pem_or_text(tls.get("ca"), "TLS CA"),
            "client_cert": read_pem_or_text(tls.get("cert"), "TLS client certificate"),
            "client_key": read_pem_or_text(tls.get("key"), "TLS client key"), "server_name": tls.get("server_name", "")}


# ---- who is on this node -----------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _local_addresses() -> frozenset:
    import psutil

    out = set()
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            try:
                out.add(ipaddress.ip_address(a.address.split("%")[0]))
            except ValueError:
                pass
    return frozenset(out)


def peer_ip(peer: str) -> str:
    """'ipv4:127.0.0.1:5000' -> '127.0.0.1'; 'ipv6:[::1]:5000' -> '::1'; '' if not an IP peer."""
    kind, _, rest = (peer or "").partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]").split("%")[0]
    return ""


def same_host(peer: str, local=None) -> bool:
    """True if the gRPC peer runs on this machine (loopback, or one of this host's addresses)."""
    try:
        ip = ipaddress.ip_address(peer_ip(peer))
    except ValueError:
        return (peer or "").startswith("unix:")
    return ip.is_loopback or ip in (_local_addresses() if local is None else local)
