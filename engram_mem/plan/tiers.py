"""The tier model: where Engram rows can live and what reading them costs a worker.

    from engram_mem.plan.tiers import TIER_PRESETS, Tier, load_tiers
    t = TIER_PRESETS["rdma-200g"]
    t.fetch_s(rows=24_576, row_bytes=264, readers=8)   # seconds for one worker's batch of rows

A tier is a place rows are read from, seen from one worker: a fixed latency per request (one
round trip; requests to several shards of the tier go out together, so a fetch pays it once), a
per-link bandwidth (one worker's path: its NIC, its PCIe link), an aggregate bandwidth shared by
every reader of the tier (a DRAM socket, a CXL pool's links, a memory node's NIC), a capacity,
and how many readers share it. Reads smaller than `min_read_bytes` cost that many bytes (NVMe
reads whole 4 KiB pages). `cpu_s_per_row` / `cpu_s_per_fetch` are the worker CPU the read path
burns (de-duplication, hand-offs, decoding); they matter where the model computes on the same
CPU (this machine), not where it computes on a GPU.

Presets carry their source: published reference points (comments name them; ranges vary by
platform, the preset takes a mid value) or this project's own measurements on its 2-core test
machine (`measured=True`), which `engram-mem plan --calibrate` refits and saves to a JSON file
that `load_tiers` reads back. No Ray, no gRPC here: the planner imports this anywhere.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

GB = 1e9


class PlanInputError(ValueError):
    """A planner input (tier, model, workload, file) is invalid; the message names the field."""


@dataclass(frozen=True)
class Tier:
    name: str
    kind: str                      # hbm | host_dram | same_node | cxl_pool | remote | disk | cache
    latency_s: float               # one request round trip (a fetch's requests to a tier overlap)
    link_gbps: float               # GB/s of one reader's path to the tier
    aggregate_gbps: float          # GB/s the tier delivers to all its readers together
    capacity_bytes: float          # per tier instance (a node, a pool, a device)
    readers: int = 1               # readers sharing one instance (GPUs per host, hosts per pool)
    min_read_bytes: int = 0        # smallest read the device does (NVMe: 4096)
    cpu_s_per_row: float = 0.0     # worker CPU per row read (matters when compute shares the CPU)
    cpu_s_per_fetch: float = 0.0   # worker CPU per fetch (thread hand-off, request set-up)
    stretch: float = 1.0           # a fetch runs this much slower while the model computes on the same CPU
    push_cpu_s_per_row: float | None = None   # a gradient push's CPU taken from compute (None: as a fetch)
    push_cpu_s_per_call: float | None = None
    push_latency_s: float | None = None       # a push's round trip (None: latency_s)
    push_s_per_row: float | None = None       # a push's wall time per row beyond the bytes (the shard's update)
    price_per_gb_month: float | None = None
    measured: bool = False         # True: this project's own measurement, not a published figure
    source: str = ""

    def __post_init__(self):
        for f in ("latency_s", "link_gbps", "aggregate_gbps", "capacity_bytes", "cpu_s_per_row", "cpu_s_per_fetch"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or v < 0:
                raise PlanInputError(f"tier {self.name!r}: {f} must be a number >= 0, got {v!r}")
        if self.link_gbps <= 0 or self.aggregate_gbps <= 0:
            raise PlanInputError(f"tier {self.name!r}: link_gbps and aggregate_gbps must be > 0")
        if self.stretch < 1:
            raise PlanInputError(f"tier {self.name!r}: stretch must be >= 1, got {self.stretch}")
        if int(self.readers) < 1:
            raise PlanInputError(f"tier {self.name!r}: readers must be >= 1, got {self.readers}")

    def read_bytes(self, rows: float, row_bytes: float) -> float:
        """Bytes the device moves for `rows` random rows (page-granular devices read whole pages)."""
        return rows * max(row_bytes, self.min_read_bytes)

    def per_reader_gbps(self, readers: int | None = None) -> float:
        """Bandwidth one reader gets when `readers` (default: the tier's own count) read at once."""
        r = self.readers if readers is None else max(1, int(readers))
        return min(self.link_gbps, self.aggregate_gbps / r)

    def fetch_s(self, rows: float, row_bytes: float, readers: int | None = None) -> float:
        """Seconds to read `rows` rows in one fetch (one round trip, then the bytes at the reader's share)."""
        if rows <= 0:
            return 0.0
        return self.latency_s + self.read_bytes(rows, row_bytes) / (self.per_reader_gbps(readers) * GB)

    def cpu_s(self, rows: float, fetches: float = 1.0) -> float:
        return rows * self.cpu_s_per_row + fetches * self.cpu_s_per_fetch

    def push_cpu_s(self, rows: float) -> float:
        if self.push_cpu_s_per_row is None:
            return self.cpu_s(rows)
        return rows * self.push_cpu_s_per_row + (self.push_cpu_s_per_call or 0.0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Tier:
        known = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise PlanInputError(f"tier {d.get('name', '?')!r}: unknown fields {extra}; known: {sorted(known)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise PlanInputError(f"tier {d.get('name', '?')!r}: {e}") from None


def _t(**kw) -> Tier:
    return Tier(**kw)


TiB, GiB = 2**40, 2**30

# Published reference points. Mid values of the ranges; each comment names where the figure is from.
TIER_PRESETS: dict[str, Tier] = {t.name: t for t in [
    # NVIDIA H100/H800 SXM datasheet: 80 GB HBM3 at 3.35 TB/s.
    _t(name="hbm", kind="hbm", latency_s=1e-6, link_gbps=3350, aggregate_gbps=3350, capacity_bytes=80e9,
       price_per_gb_month=None, source="NVIDIA H100 SXM datasheet: 80 GB HBM3, 3.35 TB/s"),
    # Host DDR5 ~100 ns, 50-370 GB/s per socket; read by a GPU over PCIe Gen5 x16 (~64 GB/s, ~55 achieved)
    # as vLLM/the Engram paper do (UVA reads of pinned host memory). 8 GPUs share 2 sockets.
    _t(name="host-dram-pcie5", kind="host_dram", latency_s=2e-6, link_gbps=55, aggregate_gbps=400,
       capacity_bytes=2 * TiB, readers=8, price_per_gb_month=2.0,
       source="DDR5 ~100 ns, 50-370 GB/s/socket; PCIe 5.0 x16 ~64 GB/s (Engram paper's 100B host-memory setup)"),
    _t(name="host-dram-pcie4", kind="host_dram", latency_s=2e-6, link_gbps=26, aggregate_gbps=300,
       capacity_bytes=1 * TiB, readers=8, price_per_gb_month=2.0,
       source="DDR4/5 socket bandwidth; PCIe 4.0 x16 26-32 GB/s"),
    # One table copy per node in /dev/shm (vLLM dp_shared_memory, this project's same-node tier):
    # physically host DRAM, read over the same PCIe link.
    _t(name="same-node-shm", kind="same_node", latency_s=2e-6, link_gbps=55, aggregate_gbps=400,
       capacity_bytes=2 * TiB, readers=8, price_per_gb_month=2.0,
       source="host DRAM shared by a node's workers; PCIe 5.0 x16 to each GPU"),
    # CXL: Pond (Li et al., ASPLOS 2023) +70-90 ns over local DRAM; expanders 2-5x local latency
    # (Sun et al., "Demystifying CXL memory", MICRO 2023); PCIe5 x16 class ~64 GB/s per device;
    # a 16-host PCIe 5.0 x16 pool ~1 TB/s aggregate (16 x 64 GB/s). The GPU reads it through host PCIe.
    _t(name="cxl-pool", kind="cxl_pool", latency_s=2.5e-6, link_gbps=55, aggregate_gbps=1000,
       capacity_bytes=16 * TiB, readers=16, price_per_gb_month=1.5,
       source="Pond ASPLOS'23 (+70-90 ns); MICRO'23 (2-5x DRAM latency); 16-host PCIe5 x16 pool ~1 TB/s"),
    # RDMA remote memory ~3 us, 25-50 GB/s per 200-400 Gb/s NIC (Mooncake-style stores). Aggregate:
    # the memory node's own NIC (one 400 Gb/s NIC per memory node; shards spread over nodes add up).
    _t(name="rdma-200g", kind="remote", latency_s=3e-6, link_gbps=23, aggregate_gbps=46, capacity_bytes=2 * TiB,
       readers=1, price_per_gb_month=2.0, source="RDMA ~3 us; 200 Gb/s NIC = 25 GB/s line (~92% achieved); node 400 Gb/s"),
    _t(name="rdma-400g", kind="remote", latency_s=3e-6, link_gbps=46, aggregate_gbps=46, capacity_bytes=2 * TiB,
       readers=1, price_per_gb_month=2.0, source="RDMA ~3 us; 400 Gb/s NIC = 50 GB/s line (~92% achieved)"),
    # Kernel TCP (gRPC-class RPC): ~30 us request round trip in a datacenter, ~70% of line rate
    # per connection set. An assumption from common RPC measurements, not a single paper.
    _t(name="tcp-100g", kind="remote", latency_s=30e-6, link_gbps=8.75, aggregate_gbps=8.75, capacity_bytes=2 * TiB,
       readers=1, price_per_gb_month=2.0, source="100 Gb/s NIC = 12.5 GB/s; ~70% over kernel TCP; ~30 us RPC (assumed)"),
    _t(name="tcp-200g", kind="remote", latency_s=30e-6, link_gbps=17.5, aggregate_gbps=17.5, capacity_bytes=2 * TiB,
       readers=1, price_per_gb_month=2.0, source="200 Gb/s NIC = 25 GB/s; ~70% over kernel TCP; ~30 us RPC (assumed)"),
    # Datacenter NVMe (PCIe 4/5 spec sheets): ~1M random 4 KiB read IOPS, ~80 us read latency; a
    # 264 B row costs a whole 4 KiB page, so a drive delivers ~4 GB/s of pages, ~0.26 GB/s of rows.
    _t(name="nvme", kind="disk", latency_s=80e-6, link_gbps=4.1, aggregate_gbps=4.1, capacity_bytes=15e12,
       readers=8, min_read_bytes=4096, price_per_gb_month=0.08,
       source="datacenter NVMe spec class: ~1M 4 KiB random-read IOPS, ~80 us"),
    # This project's own figures (2-core test VM, bench/bench_tiers.py and bench_memory.py, 64k-row
    # 256-fp32 batches, README benchmark tables): refit by `engram-mem plan --calibrate`.
    _t(name="here-in-process", kind="host_dram", latency_s=0.0, link_gbps=3.5, aggregate_gbps=3.5,
       capacity_bytes=24 * GiB, measured=True, source="measured here: in-process np.take, 3.2-3.7 GB/s"),
    _t(name="here-same-node", kind="same_node", latency_s=1e-3, link_gbps=1.9, aggregate_gbps=3.2,
       capacity_bytes=24 * GiB, cpu_s_per_row=2.5e-7, cpu_s_per_fetch=1e-3, measured=True,
       source="measured here: same-node tier via RowFetcher 1.87 GB/s, raw shared-memory read 3.23 GB/s"),
    # The row paths to a shard on another local Ray node, RowFetcher, `engram-mem plan --calibrate`
    # (2026-12-07 13:26, bench/results/tiers-here.json, median of 3 runs, load average 3.6 -> 1.0,
    # 256..16k rows of 256 B, after bulk on threads and take(mode=clip)): framed TCP 0.71 ms +
    # 1.28 GB/s, 0.67 ms CPU per fetch; gRPC beside it 1.43 ms + 0.57 GB/s, 1.30 ms. (The run
    # before, 08:40, load 0.5 -> 1.0: TCP 0.68 ms + 1.08 GB/s, 0.50 ms; gRPC 1.45 ms + 0.66 GB/s.)
    # here-tcp is the software ceiling of the remote presets above (driven_by).
    _t(name="here-grpc", kind="remote", latency_s=1.429e-3, link_gbps=0.568, aggregate_gbps=0.568,
       capacity_bytes=24 * GiB, cpu_s_per_row=1.38e-7, cpu_s_per_fetch=1.298e-3, stretch=3.7, measured=True,
       push_cpu_s_per_row=1.74e-7, push_cpu_s_per_call=0.953e-3,
       source="measured here: RowFetcher over gRPC to another local Ray node, 1.43 ms + 0.57 GB/s (calibrate)"),
    _t(name="here-tcp", kind="remote", latency_s=0.706e-3, link_gbps=1.280, aggregate_gbps=1.280,
       capacity_bytes=24 * GiB, cpu_s_per_row=7.4e-8, cpu_s_per_fetch=0.671e-3, stretch=9.6, measured=True,
       push_cpu_s_per_row=8.8e-8, push_cpu_s_per_call=0.764e-3,
       source="measured here: RowFetcher over the framed-TCP data plane to another local Ray node, "
              "0.71 ms + 1.28 GB/s (calibrate)"),
    _t(name="here-cache", kind="cache", latency_s=0.0, link_gbps=2.9, aggregate_gbps=2.9, capacity_bytes=1 * GiB,
       measured=True, source="measured here: RowCache lookup, all hits, 2.9 GB/s"),
    # `engram-mem plan --calibrate` (2026-11-24, bench/results/tiers-here.json, median of 3 runs, load
    # average 1.9 -> 1.1): cold ShardStore.gather of a 256 MB disk-backed table under /var/tmp on this
    # VM's virtual disk, one isolated 4 KiB page per row: 0.87 ms + 0.286 GB/s of pages (~70k page
    # reads/s), and 8.4 us of the gathering thread's CPU per row (a madvise and a page fault each)
    # + 1.3 ms per gather. Capacity: the disk's free space then.
    _t(name="here-disk", kind="disk", latency_s=0.87e-3, link_gbps=0.286, aggregate_gbps=0.286, capacity_bytes=75 * GiB,
       min_read_bytes=4096, cpu_s_per_row=8.4e-6, cpu_s_per_fetch=1.3e-3, measured=True,
       source="measured here: cold ShardStore.gather of a disk-backed table (/var/tmp, VM disk), 4 KiB pages, "
              "0.87 ms + 0.286 GB/s of pages"),
]}


def load_tiers(path: str) -> dict[str, Tier]:
    """Tiers from a JSON file: {"tiers": [{...Tier fields...}, ...]} (what --calibrate writes) or a list."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise PlanInputError(f"tier file {path!r} does not exist; write one with `engram-mem plan --calibrate --out {path}`") from None
    except json.JSONDecodeError as e:
        raise PlanInputError(f"tier file {path!r} is not valid JSON: {e}") from None
    items = data.get("tiers") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise PlanInputError(f"tier file {path!r}: expected a list of tiers or {{'tiers': [...]}}")
    return {t.name: t for t in (Tier.from_dict(d) for d in items)}


def save_tiers(path: str, tiers: list[Tier], extra: dict | None = None) -> None:
    with open(path, "w") as f:
        json.dump({**(extra or {}), "tiers": [t.to_dict() for t in tiers]}, f, indent=1)


def resolve_tier(name_or_tier, extra: dict[str, Tier] | None = None) -> Tier:
    if isinstance(name_or_tier, Tier):
        return name_or_tier
    pool = {**TIER_PRESETS, **(extra or {})}
    if name_or_tier not in pool:
        raise PlanInputError(f"unknown tier {name_or_tier!r}; known: {sorted(pool)}")
    return pool[name_or_tier]


DATA_PLANE_TIER = "here-tcp"   # the data plane's own measured per-client rate


def driven_by(t: Tier, software: Tier | None) -> tuple[Tier, str]:
    """A preset network tier as this project's data plane drives it: a client's link is min(the line
    rate, the data plane's measured per-client rate), and (tier, what binds) says which one is used.
    Measured tiers are already the software's own figures; other kinds are not driven by it."""
    if t.measured:
        return t, f"measured here ({t.name}: the software's own rate, {t.link_gbps:.2f} GB/s)"
    if software is None or t.kind != "remote":
        return t, "line rate"
    if software.link_gbps >= t.link_gbps:
        return t, f"line rate ({t.link_gbps:g} GB/s; the data plane measured {software.link_gbps:.2f} GB/s a client)"
    bound = dataclasses.replace(t, link_gbps=software.link_gbps,
                                source=f"{t.source}; a client capped at the data plane's measured "
                                       f"{software.link_gbps:.2f} GB/s ({software.name})")
    return bound, (f"data plane software ({software.name}: {software.link_gbps:.2f} GB/s a client, "
                   f"under the {t.link_gbps:g} GB/s line rate)")


def with_readers(t: Tier, readers: int) -> Tier:
    return dataclasses.replace(t, readers=max(1, int(readers)))


__all__ = ["Tier", "TIER_PRESETS", "PlanInputError", "load_tiers", "save_tiers", "resolve_tier", "with_readers",
           "driven_by", "DATA_PLANE_TIER"]
