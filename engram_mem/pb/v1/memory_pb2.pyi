from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GatherRequest(_message.Message):
    __slots__ = ("table", "ids", "epoch", "chunk_rows")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ROWS_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    epoch: int
    chunk_rows: int
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ..., epoch: _Optional[int] = ..., chunk_rows: _Optional[int] = ...) -> None: ...

class RowsChunk(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: bytes
    def __init__(self, rows: _Optional[bytes] = ...) -> None: ...

class WriteRequest(_message.Message):
    __slots__ = ("table", "ids", "rows", "dtype", "epoch", "client", "seq")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    rows: bytes
    dtype: str
    epoch: int
    client: str
    seq: int
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ..., rows: _Optional[bytes] = ..., dtype: _Optional[str] = ..., epoch: _Optional[int] = ..., client: _Optional[str] = ..., seq: _Optional[int] = ...) -> None: ...

class WriteReply(_message.Message):
    __slots__ = ("rows_written",)
    ROWS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    rows_written: int
    def __init__(self, rows_written: _Optional[int] = ...) -> None: ...

class StepInfo(_message.Message):
    __slots__ = ("step", "lr", "worker")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    step: int
    lr: float
    worker: str
    def __init__(self, step: _Optional[int] = ..., lr: _Optional[float] = ..., worker: _Optional[str] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("table", "ids", "grads", "dtype", "epoch", "step", "client", "seq")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    grads: bytes
    dtype: str
    epoch: int
    step: StepInfo
    client: str
    seq: int
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ..., grads: _Optional[bytes] = ..., dtype: _Optional[str] = ..., epoch: _Optional[int] = ..., step: _Optional[_Union[StepInfo, _Mapping]] = ..., client: _Optional[str] = ..., seq: _Optional[int] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("rows_updated",)
    ROWS_UPDATED_FIELD_NUMBER: _ClassVar[int]
    rows_updated: int
    def __init__(self, rows_updated: _Optional[int] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TableInfo(_message.Message):
    __slots__ = ("name", "rows", "dim", "dtype", "seed", "init_std", "num_slots", "slot_rows", "owned_slots", "optimizer", "shm_path", "resident_rows", "frame_of", "frames")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    INIT_STD_FIELD_NUMBER: _ClassVar[int]
    NUM_SLOTS_FIELD_NUMBER: _ClassVar[int]
    SLOT_ROWS_FIELD_NUMBER: _ClassVar[int]
    OWNED_SLOTS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    SHM_PATH_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_ROWS_FIELD_NUMBER: _ClassVar[int]
    FRAME_OF_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    name: str
    rows: int
    dim: int
    dtype: str
    seed: int
    init_std: float
    num_slots: int
    slot_rows: int
    owned_slots: bytes
    optimizer: str
    shm_path: str
    resident_rows: int
    frame_of: bytes
    frames: int
    def __init__(self, name: _Optional[str] = ..., rows: _Optional[int] = ..., dim: _Optional[int] = ..., dtype: _Optional[str] = ..., seed: _Optional[int] = ..., init_std: _Optional[float] = ..., num_slots: _Optional[int] = ..., slot_rows: _Optional[int] = ..., owned_slots: _Optional[bytes] = ..., optimizer: _Optional[str] = ..., shm_path: _Optional[str] = ..., resident_rows: _Optional[int] = ..., frame_of: _Optional[bytes] = ..., frames: _Optional[int] = ...) -> None: ...

class DescribeReply(_message.Message):
    __slots__ = ("shard_id", "epoch", "node_ip", "node_id", "tables", "layout_path", "layout_version")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    NODE_IP_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_PATH_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_VERSION_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    epoch: int
    node_ip: str
    node_id: str
    tables: _containers.RepeatedCompositeFieldContainer[TableInfo]
    layout_path: str
    layout_version: int
    def __init__(self, shard_id: _Optional[int] = ..., epoch: _Optional[int] = ..., node_ip: _Optional[str] = ..., node_id: _Optional[str] = ..., tables: _Optional[_Iterable[_Union[TableInfo, _Mapping]]] = ..., layout_path: _Optional[str] = ..., layout_version: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("shard_id", "uptime_s", "requests", "errors", "rows_gathered", "bytes_sent", "rows_pushed", "rows_written", "requests_per_s", "gather_gbps", "table_bytes", "rss_bytes", "optimizer_state_bytes")
    class RequestsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class ErrorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    ROWS_GATHERED_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    ROWS_PUSHED_FIELD_NUMBER: _ClassVar[int]
    ROWS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_S_FIELD_NUMBER: _ClassVar[int]
    GATHER_GBPS_FIELD_NUMBER: _ClassVar[int]
    TABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    uptime_s: float
    requests: _containers.ScalarMap[str, int]
    errors: _containers.ScalarMap[str, int]
    rows_gathered: int
    bytes_sent: int
    rows_pushed: int
    rows_written: int
    requests_per_s: float
    gather_gbps: float
    table_bytes: int
    rss_bytes: int
    optimizer_state_bytes: int
    def __init__(self, shard_id: _Optional[int] = ..., uptime_s: _Optional[float] = ..., requests: _Optional[_Mapping[str, int]] = ..., errors: _Optional[_Mapping[str, int]] = ..., rows_gathered: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., rows_pushed: _Optional[int] = ..., rows_written: _Optional[int] = ..., requests_per_s: _Optional[float] = ..., gather_gbps: _Optional[float] = ..., table_bytes: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., optimizer_state_bytes: _Optional[int] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("status", "message", "epoch")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[HealthReply.Status]
        SERVING: _ClassVar[HealthReply.Status]
        NOT_READY: _ClassVar[HealthReply.Status]
    UNKNOWN: HealthReply.Status
    SERVING: HealthReply.Status
    NOT_READY: HealthReply.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    status: HealthReply.Status
    message: str
    epoch: int
    def __init__(self, status: _Optional[_Union[HealthReply.Status, str]] = ..., message: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...
