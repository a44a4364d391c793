"""ClusterConfig: how a memory cluster is laid out and run. Validated on creation.

    cfg = ClusterConfig(name="engram-mem", shards=4, data_dir="/var/lib/engram-mem")
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from engram_mem.errors import InvalidArgument

DEFAULT_NAME = "engram-mem"
NAMESPACE = "engram-mem"  # Ray namespace of the controller and shard actors
DATA_PLANES = ("tcp", "grpc")


@dataclass(frozen=True)
class ClusterConfig:
    name: str = DEFAULT_NAME            # the controller is the named Ray actor f"{name}-controller"
    shards: int = 2
    replicas: int = 1                   # members per shard, each on its own node: a primary and replicas-1 replicas
    replica_max_lag_bytes: int = 256 << 20  # a replica further behind than this rebuilds from a full copy
    replica_ack: str = "none"           # none: acknowledge once the primary logged it; all: once every in-sync replica applied it
    replica_ack_timeout_s: float = 10.0  # replica_ack=all: a replica this late to apply is dropped from the in-sync set
    cpus_per_shard: float = 1.0         # Ray CPU resource each shard reserves (its placement-group bundle)
    placement_strategy: str = "SPREAD"  # placement-group strategy for the shards
    shard_resources: dict | None = None  # extra Ray resources per shard bundle, e.g. {"memory_node": 1}
    shm_dir: str = "/dev/shm/engram-mem"  # shard row buffers live here, shared with same-node workers
    data_dir: str | None = None         # snapshots + write-ahead log; None = no persistence (rows restart from init)
    durability: str = "process"         # none | process (survives kill -9) | fsync (survives a machine crash)
    snapshot_interval_s: float = 60.0   # each shard snapshots this often (0 = not by time) ...
    snapshot_log_bytes: int = 1 << 30   # ... or when its log has grown by this much since the last one
    wal_segment_bytes: int = 256 << 20  # log segment size (whole segments are dropped behind a snapshot)
    keep_generations: int = 2           # snapshot generations kept per shard
    reinit_missing: bool = False        # start slots whose snapshot is missing or damaged from initial values
    max_lr: float = 1e3                 # a push's lr above this is refused
    max_grad_abs: float = 1e15          # a gradient value above this is refused (its square nears fp32's range)
    max_request_bytes: int = 256 << 20  # largest ids/rows/grads field a shard accepts
    move_batch_bytes: int = 256 << 20   # slots move between shards in batches of about this size
    storage: str = "shm"                # where shard rows live: "shm" or "disk:/dir" (storage.py)
    memory_budget: int = 0              # disk storage: bytes of page cache each shard keeps (0 = no bound)
    security: dict | None = None        # auth.Security as a dict: credentials, TLS; None = new random credentials
    data_plane: str = "tcp"             # bulk rows: "tcp" (framed TCP beside gRPC, transport/) or "grpc" (gRPC only)
    agent_cpus: tuple | None = None     # cores each node's fetch agent runs on (affinity.py); None: the OS decides
    shard_cpus: tuple | None = None     # cores each shard process runs on; None: the OS decides
    agent_nice: int | None = None       # nice value of each node's fetch agent (-20..19; affinity.py); None: as started
    shard_nice: int | None = None       # nice value of each shard process; None: as started

    def __post_init__(self):
        if not re.match(r"^[A-Za-z0-9_.\-]{1,64}$", self.name):
            raise InvalidArgument(f"cluster name {self.name!r} must be 1-64 characters of [A-Za-z0-9_.-]")
        if int(self.shards) < 1:
            raise InvalidArgument(f"shards must be >= 1, got {self.shards}")
        if int(self.replicas) < 1:
            raise InvalidArgument(f"replicas must be >= 1, got {self.replicas}")
        if self.replica_max_lag_bytes < 1 << 20:
            raise InvalidArgument(f"replica_max_lag_bytes must be >= 1 MiB, got {self.replica_max_lag_bytes}")
        if self.replica_ack not in ("none", "all"):
            raise InvalidArgument(f"replica_ack {self.replica_ack!r} is not one of none, all")
        if not (0 < self.replica_ack_timeout_s < float("inf")):
            raise InvalidArgument(f"replica_ack_timeout_s must be positive and finite, got {self.replica_ack_timeout_s}")
        if self.cpus_per_shard < 0:
            raise InvalidArgument(f"cpus_per_shard must be >= 0, got {self.cpus_per_shard}")
        if self.placement_strategy not in ("SPREAD", "STRICT_SPREAD", "PACK", "STRICT_PACK"):
            raise InvalidArgument(f"placement_strategy {self.placement_strategy!r} is not a Ray placement strategy")
        if self.max_request_bytes < 1 << 16:
            raise InvalidArgument(f"max_request_bytes must be >= 65536, got {self.max_request_bytes}")
        if self.durability not in ("none", "process", "fsync"):
            raise InvalidArgument(f"durability {self.durability!r} is not one of none, process, fsync")
        if not (0 < self.max_lr < float("inf")) or not (0 < self.max_grad_abs <= 1e18):
            raise InvalidArgument("max_lr must be positive and finite; max_grad_abs in (0, 1e18]")
        if self.keep_generations < 1 or self.wal_segment_bytes < 1 << 16 or self.snapshot_log_bytes < 1 << 16:
            raise InvalidArgument("keep_generations must be >= 1; wal_segment_bytes and snapshot_log_bytes >= 65536")
        if self.snapshot_interval_s < 0:
            raise InvalidArgument("snapshot_interval_s must be >= 0")
        if self.data_plane not in DATA_PLANES:
            raise InvalidArgument(f"data_plane {self.data_plane!r} is not one of {', '.join(DATA_PLANES)}")
        from engram_mem.affinity import parse_cpus, parse_nice

        for field, parse in (("agent_cpus", parse_cpus), ("shard_cpus", parse_cpus), ("agent_nice", parse_nice),
                             ("shard_nice", parse_nice)):
            try:
                object.__setattr__(self, field, parse(getattr(self, field), field))
            except ValueError as e:
                raise InvalidArgument(str(e)) from None
        if self.memory_budget < 0:
            raise InvalidArgument(f"memory_budget must be >= 0 bytes, got {self.memory_budget}")
        from engram_mem.storage.disk import parse_storage

        try:
            object.__setattr__(self, "storage", parse_storage(self.storage))
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        object.__setattr__(self, "shards", int(self.shards))
        object.__setattr__(self, "replicas", int(self.replicas))
        from engram_mem.security import Security

        object.__setattr__(self, "security", Security.from_dict(self.security).to_dict())  # validated; never None

    @property
    def controller_name(self) -> str:
        return f"{self.name}-controller"

    def to_dict(self) -> dict:
        return asdict(self)

    def public_dict(self) -> dict:
        """to_dict() without secrets (credentials, TLS keys), for describe() and status output."""
        from engram_mem.security import redact

        return dict(self.to_dict(), security=redact(self.security))

def member_name(cluster: str, shard_id: int, member: int = 0) -> str:
    """The Ray actor name of a shard's member: its primary (0) or replica k."""
    return f"{cluster}-shard-{shard_id}" if member == 0 else f"{cluster}-shard-{shard_id}-r{member}"
