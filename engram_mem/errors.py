"""The few exceptions users of engram-mem see.

Every error carries a sentence that names what was wrong (table, field, value). A server maps
each class to one gRPC status code (server.py) and sends the class name in trailing metadata,
so the client raises the same class with the same message on the other side. `code` is the
name of a grpc.StatusCode member (kept as a string so that importing errors needs no gRPC).
"""

from __future__ import annotations


class EngramMemError(Exception):
    """Base class for all engram-mem errors."""

    code = "UNKNOWN"


class InvalidArgument(EngramMemError, ValueError):
    """A request field has a value the service cannot accept (shape, dtype, length, range)."""

    code = "INVALID_ARGUMENT"


class UnknownTable(EngramMemError, KeyError):
    code = "NOT_FOUND"

    def __str__(self):  # KeyError would repr() the message
        return self.args[0] if self.args else ""


class TableExists(EngramMemError):
    code = "ALREADY_EXISTS"


class RowOutOfRange(InvalidArgument):
    code = "OUT_OF_RANGE"


class NonFiniteGradient(InvalidArgument):
    """A pushed gradient holds NaN or Inf; nothing from that push was applied."""


class NonFiniteUpdate(InvalidArgument):
    """A write or push would make a row or its optimizer state NaN or Inf; nothing was applied."""


class SequenceTooOld(InvalidArgument):
    """A request's sequence number is too far behind its client's newest one to tell whether it was applied."""

    code = "FAILED_PRECONDITION"


class ReadOnlyTable(EngramMemError):
    """A push to a table whose rows are quantized or opaque bytes: such tables take Write (import),
    not gradients. Train a float32/bfloat16 table and quantize it on export instead."""

    code = "FAILED_PRECONDITION"


class CorruptData(EngramMemError):
    """A snapshot, log or cluster file is missing, truncated or fails its checksum; the message names it."""

    code = "DATA_LOSS"


class RequestTooLarge(EngramMemError):
    code = "RESOURCE_EXHAUSTED"


class ResourceExhausted(EngramMemError):
    """The shard cannot take an update now (its data directory's disk is full); nothing was
    applied, reads go on. The message names the directory."""

    code = "RESOURCE_EXHAUSTED"


class StaleEpoch(EngramMemError):
    """The request was routed with an old placement; re-read the placement and retry."""

    code = "FAILED_PRECONDITION"


class NotReady(EngramMemError):
    """The shard is starting, restoring or moving slots; retry shortly."""

    code = "UNAVAILABLE"


class ShardUnavailable(EngramMemError):
    """A shard could not be reached (after retries, where the client retries).

    address: the shard's address where known; sent: False only where the request provably never
    left (no connection), so a write or push cannot have been applied by that attempt."""

    code = "UNAVAILABLE"

    def __init__(self, message: str = "", *, address: str = "", sent: bool = True):
        super().__init__(message)
        self.address, self.sent = address, sent


class _Unresolved(ShardUnavailable):
    """A write or push that ended without an acknowledgement. table, kind ("write"/"push"), key
    (client id, seq) and shards (the shard ids it was still waiting for) say which."""

    def __init__(self, message: str = "", *, table: str = "", kind: str = "", key: tuple | None = None,
                 shards: tuple = ()):
        super().__init__(message)
        self.table, self.kind, self.key, self.shards = table, kind, key, tuple(shards)


class Unavailable(_Unresolved):
    """A write or push that reached no shard before it ended (deadline, cancel, closed client):
    nothing of it was applied. Sending it again, with its key or a new one, applies it once."""


class MaybeApplied(_Unresolved):
    """A write or push that may or may not have been applied, in whole or in part (a shard died with
    it in flight, or it ended with some parts acknowledged). Retry it with the same key
    (`push(..., key=e.key)`): the shards apply each part exactly once, whichever it was."""


class Unauthenticated(EngramMemError):
    """The call carried no cluster credential, or a wrong one."""

    code = "UNAUTHENTICATED"


class PermissionDenied(EngramMemError):
    """The credential is valid but does not allow this call (a read-only credential and Write/Push)."""

    code = "PERMISSION_DENIED"


ERROR_CLASSES = {
    cls.__name__: cls
    for cls in (EngramMemError, InvalidArgument, UnknownTable, TableExists, RowOutOfRange,
                NonFiniteGradient, NonFiniteUpdate, SequenceTooOld, CorruptData, ReadOnlyTable, RequestTooLarge,
                ResourceExhausted,
                StaleEpoch, NotReady, ShardUnavailable, Unavailable, MaybeApplied, Unauthenticated,
                PermissionDenied)
}
