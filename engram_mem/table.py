"""TableSpec: what a hashed embedding table is, independent of where its rows live.

A table is a named `rows x dim` array (float32, bfloat16 or float16) with a seed. Two more dtypes
hold rows the service does not do arithmetic on: "fp8_e4m3" (dim FP8 E4M3 values plus one ue8m0
power-of-two scale byte per `block` values, quant.py) and "bytes" (an opaque fixed-width row of dim
bytes). Both are stored, sent and cached as `storage_dim` uint8 values a row. Its row space
is cut into `num_slots` contiguous ranges of `slot_rows` rows; placement (placement.py) maps
slots to shards. The initial value of row r is a function of (seed, dim, r) alone, so a table
that is re-sharded, restarted from nothing, or built in-process by the model starts from the
same rows bit for bit.

Nothing here allocates a table: a 100B-parameter spec is as cheap to describe as a tiny one.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np
import torch

from engram_mem.errors import InvalidArgument

# Storage dtypes. bfloat16 has no numpy dtype: it is stored as uint16 bit patterns and viewed as
# torch.bfloat16 wherever arithmetic happens.
DTYPES = {
    "float32": (np.dtype("<f4"), torch.float32),
    "float16": (np.dtype("<f2"), torch.float16),
    "bfloat16": (np.dtype("<u2"), torch.bfloat16),
    # Rows kept as raw bytes: [rows, storage_dim] uint8 in storage and on the wire.
    "fp8_e4m3": (np.dtype("u1"), torch.uint8),
    "bytes": (np.dtype("u1"), torch.uint8),
}
BYTE_DTYPES = ("fp8_e4m3", "bytes")  # no arithmetic at the shard: Write (import) yes, Push no
DEFAULT_SLOTS = 4096
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
# Rows are initialized in blocks of this many values; each block has its own counter-keyed
# generator, so any row can be produced without producing the rows before it.
_INIT_BLOCK_VALUES = 16384


def np_dtype(dtype: str) -> np.dtype:
    return DTYPES[dtype][0]


def torch_dtype(dtype: str) -> torch.dtype:
    return DTYPES[dtype][1]


def as_torch(arr: np.ndarray, dtype: str) -> torch.Tensor:
    """Zero-copy torch view of a storage array (bfloat16 bit patterns become torch.bfloat16)."""
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def rows_to_float(rows: np.ndarray, spec, device=None) -> torch.Tensor:
    """Stored rows of any numeric table -> float32 torch [..., spec.dim] on `device`.

    fp8 tables are dequantized on the device; float32/bfloat16/float16 rows are viewed and cast."""
    if spec.dtype == "fp8_e4m3":
        from engram_mem.quant import dequantize

        return dequantize(rows, spec.dim, spec.block, device)
    if spec.dtype == "bytes":
        raise ValueError(f"table {spec.name!r} holds opaque byte rows; they have no float value")
    t = rows if isinstance(rows, torch.Tensor) else as_torch(np.ascontiguousarray(rows), spec.dtype)
    if device is not None:
        t = t.to(device, non_blocking=True)
    return t.float()


def from_float32(x: np.ndarray, dtype: str) -> np.ndarray:
    """Cast float32 values to a storage dtype (round to nearest even for bfloat16)."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16).view(torch.uint16).numpy()
    return x.astype(np_dtype(dtype), copy=False)


def to_float32(x: np.ndarray, dtype: str) -> np.ndarray:
    """Storage values as float32 (for bfloat16 tables, x holds uint16 bit patterns)."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(x)).view(torch.bfloat16).float().numpy()
    return x.astype(np.float32, copy=False)


@dataclass(frozen=True)
class TableSpec:
    name: str
    rows: int
    dim: int
    dtype: str = "float32"
    seed: int = 0
    init_std: float = 1.0
    num_slots: int = DEFAULT_SLOTS
    block: int = 0          # fp8_e4m3: values per ue8m0 scale byte (V4.1-Flash: 32); 0 for other dtypes
    storage: str = ""       # "" = the cluster's storage; "shm" or "disk:/path" (storage.py)

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise InvalidArgument(f"table name {self.name!r} must be 1-128 characters of [A-Za-z0-9_.-]")
        if int(self.rows) <= 0:
            raise InvalidArgument(f"table {self.name!r}: rows must be positive, got {self.rows}")
        if int(self.dim) <= 0:
            raise InvalidArgument(f"table {self.name!r}: dim must be positive, got {self.dim}")
        if self.dtype not in DTYPES:
            raise InvalidArgument(f"table {self.name!r}: dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.dtype == "fp8_e4m3":
            if int(self.block) <= 0 or int(self.dim) % int(self.block):
                raise InvalidArgument(f"table {self.name!r}: fp8_e4m3 needs block > 0 dividing dim {self.dim} "
                                      f"(values per scale, e.g. 32), got block={self.block}")
        elif int(self.block) != 0:
            raise InvalidArgument(f"table {self.name!r}: block={self.block} applies only to dtype 'fp8_e4m3'")
        if self.storage and not (self.storage == "shm" or self.storage.startswith("disk:/")):
            raise InvalidArgument(f"table {self.name!r}: storage {self.storage!r} must be '', 'shm' or "
                                  f"'disk:/absolute/path'")
        if not 0 <= int(self.seed) < 2**63:
            raise InvalidArgument(f"table {self.name!r}: seed must be in [0, 2**63), got {self.seed}")
        if not (self.init_std >= 0 and np.isfinite(self.init_std)):
            raise InvalidArgument(f"table {self.name!r}: init_std must be finite and >= 0, got {self.init_std}")
        if int(self.num_slots) <= 0:
            raise InvalidArgument(f"table {self.name!r}: num_slots must be positive, got {self.num_slots}")
        # Normalize ints (numpy ints sneak in from configs) and never have more slots than rows.
        object.__setattr__(self, "rows", int(self.rows))
        object.__setattr__(self, "dim", int(self.dim))
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "block", int(self.block))
        object.__setattr__(self, "num_slots", min(int(self.num_slots), int(self.rows)))

    # ---- geometry -------------------------------------------------------------------------
    @property
    def is_bytes(self) -> bool:
        """Rows the shard stores and serves as raw bytes (quantized or opaque): no Push."""
        return self.dtype in BYTE_DTYPES

    @property
    def storage_dtype(self) -> np.dtype:
        """The element type of a stored row (uint8 for quantized and opaque rows)."""
        return np_dtype(self.dtype)

    @property
    def storage_dim(self) -> int:
        """Elements of a stored row: dim, or for fp8_e4m3 dim values + dim / block scale bytes."""
        return self.dim + self.dim // self.block if self.dtype == "fp8_e4m3" else self.dim

    @property
    def itemsize(self) -> int:
        return np_dtype(self.dtype).itemsize

    @property
    def row_bytes(self) -> int:
        return self.storage_dim * self.itemsize

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    @property
    def params(self) -> int:
        return self.rows * self.dim

    @property
    def slot_rows(self) -> int:
        """Rows per slot; the last slot may be shorter."""
        return -(-self.rows // self.num_slots)

    @property
    def n_slots(self) -> int:
        """Number of non-empty slots (can be below num_slots when rows is not a multiple)."""
        return -(-self.rows // self.slot_rows)

    def slot_range(self, slot: int) -> tuple[int, int]:
        start = slot * self.slot_rows
        return start, min(start + self.slot_rows, self.rows)

    def slot_of(self, ids: np.ndarray) -> np.ndarray:
        return ids // self.slot_rows

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TableSpec":
        return cls(**d)

    # ---- deterministic initial values -----------------------------------------------------
    @property
    def _init_block_rows(self) -> int:
        return max(1, _INIT_BLOCK_VALUES // self.dim)

    def _block_seed(self, block: int) -> int:
        # splitmix64 of (seed, block): decorrelates neighbouring blocks and tables.
        x = (self.seed * 0x9E3779B97F4A7C15 + block + 1) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF

    def init_range(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Initial values of rows [start, stop) in the storage dtype: out is filled if given."""
        if not 0 <= start <= stop <= self.rows:
            raise InvalidArgument(f"table {self.name!r}: row range [{start}, {stop}) outside [0, {self.rows})")
        if out is None:
            out = np.empty((stop - start, self.storage_dim), dtype=np_dtype(self.dtype))
        if self.is_bytes:
            return self._init_bytes(start, stop, out)
        br = self._init_block_rows
        gen = torch.Generator()
        buf = torch.empty(br, self.dim, dtype=torch.float32)
        out_t = as_torch(out, self.dtype)
        for block in range(start // br, -(-stop // br) if stop > start else start // br):
            b0, b1 = block * br, block * br + br
            lo, hi = max(b0, start), min(b1, stop)
            gen.manual_seed(self._block_seed(block))
            torch.randn(br, self.dim, generator=gen, out=buf)
            # Multiplying after drawing keeps values a function of the spec, not of the block layout.
            out_t[lo - start:hi - start] = buf[lo - b0:hi - b0] * self.init_std
        return out

    def _init_bytes(self, start: int, stop: int, out: np.ndarray) -> np.ndarray:
        """Opaque rows start as zeros; fp8 rows as the same normal draws as a float32 table, quantized."""
        if self.dtype == "bytes" or self.init_std == 0:  # zero bytes are fp8 zeros (scale byte 0: 2**-127)
            out[...] = 0
            return out
        from engram_mem.quant import quantize

        f32 = TableSpec(self.name, self.rows, self.dim, "float32", self.seed, self.init_std, self.num_slots)
        step = max(1, (8 << 20) // (4 * self.dim))
        for a in range(start, stop, step):
            b = min(a + step, stop)
            out[a - start:b - start] = quantize(f32.init_range(a, b), self.block)
        return out

    def init_rows(self, ids: np.ndarray) -> np.ndarray:
        """Initial values of arbitrary rows (any order, repeats allowed): [len(ids), dim]."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = np.empty((ids.size, self.storage_dim), dtype=np_dtype(self.dtype))
        if ids.size == 0:
            return out
        if ids.min() < 0 or ids.max() >= self.rows:
            raise InvalidArgument(f"table {self.name!r}: row ids must be in [0, {self.rows})")
        br = self._init_block_rows
        uniq_blocks, inv = np.unique(ids // br, return_inverse=True)
        for i, block in enumerate(uniq_blocks):
            sel = np.nonzero(inv == i)[0]
            b0 = int(block) * br
            rows = self.init_range(b0, min(b0 + br, self.rows))
            out[sel] = rows[ids[sel] - b0]
        return out
