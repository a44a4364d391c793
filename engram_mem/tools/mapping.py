"""Mapping files: which safetensors tensors make which engram-mem table, and how.

A mapping is a small JSON file (shipped ones: engram_mem/tools/mappings/*.json):

    {"format": "engram-mem/mapping/1",
     "tables": [{
        "table":  "engram.l{layer}",               # table name; {layer} expands over "layers"
        "layers": [1, 14],
        "dtype":  "fp8_e4m3", "block": 32,         # float32 | bfloat16 | float16 | fp8_e4m3 | bytes
        "values": "layers.{layer}.engram.embed.weight",      # one tensor, or a list (heads)
        "scales": "layers.{layer}.engram.embed.scale",       # fp8 only: ue8m0 bytes per block
        "aliases": [{"values": "model.layers.{layer}.engram.embed.weight",          # optional: other
                     "scales": "model.layers.{layer}.engram.embed.weight_scale_inv"}],  # spellings
        "concat": "rows",                          # a list of tensors is stacked along "rows" or "dim"
        "scale_dtype": ["F8_E8M0", "U8"]           # optional: accepted on import; the first is written on export
     }]}

Tensor names may also use {head} with "heads": N (one tensor per head). With "concat": "rows" the
heads' rows follow one another (table row = head offset + head-local row, as the DeepSeek Engram
demo's MultiHeadEmbedding and engram_model's tables lay them out); with "dim" a table row is the
heads' rows side by side. An fp8 table's stored row is all values, then all scale bytes (quant.py).
"aliases" are other spellings of the same tensors (the reference loader's parameter names beside
the checkpoint's own): the first spelling whose tensors are all present is read; export writes
the spelling of its --like files, else the first.

Values tensors must be F32/BF16/F16 (the table's dtype), F8_E4M3 (fp8), or anything (bytes: the
row is the tensor row's raw bytes). Scales may be U8 or F8_E8M0 (exponent bytes) or F32 (exact
powers of two, turned into exponent bytes on import).

`resolve(entry, index)` checks every tensor against the files' headers (present, dtype, 2-D,
row counts, widths) and returns the row pieces an import reads: nothing is read or written before
every table of a mapping has passed. A directory with a model.safetensors.index.json is read by
its index (`index_directory`): only the files that hold mapped tensors are opened, and a file the
index names that is absent, or that lacks a tensor the index puts there, is refused by name.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from engram_mem.errors import InvalidArgument
from engram_mem.table import TableSpec

MAPPINGS_DIR = Path(__file__).parent / "mappings"
FORMAT = "engram-mem/mapping/1"
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
TABLE_TENSOR_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "fp8_e4m3": "F8_E4M3"}
SCALE_DTYPES = ("U8", "F8_E8M0", "F32")
INDEX_FILE = "model.safetensors.index.json"


# ---- safetensors headers ---------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int      # absolute byte offset of the data in the file
    end: int

    @property
    def row_bytes(self) -> int:
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n * ITEMSIZE[self.dtype]


def read_header(path: str) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, from its header alone (8-byte length + JSON)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise InvalidArgument(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 << 20:
            raise InvalidArgument(f"{path}: header length {n} is implausible; not a safetensors file?")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise InvalidArgument(f"{path}: header is not JSON ({e}); not a safetensors file?") from None
    base, size = 8 + n, os.path.getsize(path)
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        if t["dtype"] not in ITEMSIZE:
            raise InvalidArgument(f"{path}: tensor {name!r} has dtype {t['dtype']!r}, which engram-mem cannot read")
        info = TensorInfo(name, path, t["dtype"], tuple(int(x) for x in t["shape"]), base + a, base + b)
        expect = info.row_bytes * (info.shape[0] if info.shape else 1)
        if info.end - info.start != expect or info.end > size:
            raise InvalidArgument(f"{path}: tensor {name!r} spans bytes [{a}, {b}) but {info.dtype} {info.shape} "
                                  f"needs {expect} (file size {size}): the file is truncated or corrupt")
        out[name] = info
    return out


def index_files(paths: list[str]) -> dict[str, TensorInfo]:
    """Headers of all safetensors files among `paths` (files, directories or globs), by tensor name."""
    files: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(glob.glob(os.path.join(p, "*.safetensors")))
        elif any(c in p for c in "*?["):
            files += sorted(glob.glob(p))
        elif os.path.exists(p):
            files.append(p)
        else:
            raise InvalidArgument(f"{p}: no such file or directory")
    if not files:
        raise InvalidArgument(f"no .safetensors files in {paths}")
    index: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_header(os.path.abspath(f)).items():
            if name in index:
                raise InvalidArgument(f"tensor {name!r} is in both {index[name].file} and {info.file}")
            index[name] = info
    return index


def index_directory(directory: str, names: list[str]) -> dict[str, TensorInfo]:
    """Headers of the files that a checkpoint's model.safetensors.index.json says hold `names`
    (names it does not list are left out: resolve says they are missing). A named file that is
    absent, or whose header lacks a tensor the index puts in it, is refused naming both."""
    path = os.path.join(directory, INDEX_FILE)
    try:
        weight_map = json.loads(open(path).read())["weight_map"]
    except ValueError as e:
        raise InvalidArgument(f"{path}: not valid JSON ({e})") from None
    except (KeyError, TypeError):
        raise InvalidArgument(f"{path}: no 'weight_map' (tensor name -> file)") from None
    files: dict[str, list[str]] = {}
    for n in names:
        if n in weight_map:
            files.setdefault(weight_map[n], []).append(n)
    index: dict[str, TensorInfo] = {}
    for f, held in sorted(files.items()):
        full = os.path.join(directory, f)
        if not os.path.exists(full):
            raise InvalidArgument(f"{path}: tensor {held[0]!r} is in {f}, which is not in {directory}")
        header = read_header(os.path.abspath(full))
        for n in held:
            if n not in header:
                raise InvalidArgument(f"{path}: tensor {n!r} is listed in {f}, but {full} holds no such tensor")
        index.update(header)
    return index


def is_checkpoint_dir(paths: list[str]) -> bool:
    """One directory holding a safetensors index: a checkpoint as published."""
    return len(paths) == 1 and os.path.isfile(os.path.join(paths[0], INDEX_FILE))


# ---- mapping entries -------------------------------------------------------------------------
@dataclass
class MappingTable:
    table: str
    dtype: str
    values: list[str]
    scales: list[str] = field(default_factory=list)
    block: int = 0
    concat: str = "rows"
    scale_dtype: tuple[str, ...] = ()          # accepted on import (any if empty); [0] written on export
    aliases: list[tuple[list[str], list[str]]] = field(default_factory=list)   # other (values, scales) spellings
    layer: int | None = None                   # the model layer, for entries expanded over "layers"

    @property
    def spellings(self) -> list[tuple[list[str], list[str]]]:
        return [(self.values, self.scales), *self.aliases]

    @property
    def names(self) -> list[str]:
        """Every tensor name this entry may read, in all its spellings."""
        return [n for v, s in self.spellings for n in (*v, *s)]

    def spelled(self, values: list[str], scales: list[str]) -> "MappingTable":
        return dataclasses.replace(self, values=values, scales=scales)

    def spec(self, rows: int, dim: int, **kw) -> TableSpec:
        return TableSpec(self.table, rows, dim, dtype=self.dtype, block=self.block, **kw)


def _names(value, fmt: dict, heads: int | None) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if heads is not None:
        return [str(v).format(**fmt, head=h) for v in items for h in range(heads)]
    return [str(v).format(**fmt) for v in items]


def load_mapping(path: str, layers: list[int] | None = None) -> list[MappingTable]:
    """A mapping file (a path, or the name of a shipped mapping) expanded into one entry per table;
    `layers` replaces the file's "layers" (a checkpoint's config.json names its own)."""
    p = Path(path)
    if not p.exists() and (MAPPINGS_DIR / f"{path}.json").exists():
        p = MAPPINGS_DIR / f"{path}.json"
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        shipped = ", ".join(sorted(x.stem for x in MAPPINGS_DIR.glob("*.json")))
        raise InvalidArgument(f"mapping {path!r}: no such file (shipped mappings: {shipped})") from None
    except ValueError as e:
        raise InvalidArgument(f"mapping {p}: not valid JSON ({e})") from None
    if doc.get("format") != FORMAT:
        raise InvalidArgument(f"mapping {p}: 'format' must be {FORMAT!r}, got {doc.get('format')!r}")
    out = []
    for i, e in enumerate(doc.get("tables") or []):
        known = {"table", "layers", "heads", "dtype", "block", "values", "scales", "concat", "scale_dtype", "comment",
                 "aliases"}
        if set(e) - known:
            raise InvalidArgument(f"mapping {p}: table entry {i} has unknown keys {sorted(set(e) - known)}")
        for k in ("table", "dtype", "values"):
            if k not in e:
                raise InvalidArgument(f"mapping {p}: table entry {i} needs {k!r}")
        if e.get("concat", "rows") not in ("rows", "dim"):
            raise InvalidArgument(f"mapping {p}: table entry {i}: concat must be 'rows' or 'dim'")
        if (e["dtype"] == "fp8_e4m3") != ("scales" in e):
            raise InvalidArgument(f"mapping {p}: table entry {i}: 'scales' is needed for, and only for, fp8_e4m3")
        sd = e.get("scale_dtype") or ()
        sd = (sd,) if isinstance(sd, str) else tuple(sd)
        if set(sd) - set(SCALE_DTYPES):
            raise InvalidArgument(f"mapping {p}: table entry {i}: scale_dtype must be among {SCALE_DTYPES}, got {sd}")
        spellings = [e, *(e.get("aliases") or [])]
        for a in spellings[1:]:
            if set(a) != ({"values", "scales"} if "scales" in e else {"values"}):
                raise InvalidArgument(f"mapping {p}: table entry {i}: an alias gives exactly the entry's "
                                      f"'values'{' and scales' if 'scales' in e else ''}, got {sorted(a)}")
        entry_layers = e.get("layers") if layers is None or "layers" not in e else layers
        for layer in entry_layers or [None]:
            fmt = {} if layer is None else {"layer": layer}
            heads = e.get("heads")
            named = [(_names(a["values"], fmt, heads), _names(a["scales"], fmt, heads) if "scales" in a else [])
                     for a in spellings]
            t = MappingTable(str(e["table"]).format(**fmt), e["dtype"], *named[0], int(e.get("block", 0)),
                             e.get("concat", "rows"), sd, named[1:], layer)
            for v, s in named:
                if s and len(s) != len(v):
                    raise InvalidArgument(f"mapping {p}: table {t.table!r} has {len(v)} values tensors but "
                                          f"{len(s)} scales tensors")
            out.append(t)
    if not out:
        raise InvalidArgument(f"mapping {p}: no tables")
    return out


# ---- resolving a mapping entry against the files ---------------------------------------------
@dataclass(frozen=True)
class Piece:
    """Table rows [row0, row0 + rows) x stored-row bytes [col0, col0 + width) come from
    tensor rows [src_row0, ...) of `info` (each source row is `info.row_bytes` bytes).
    kind: "raw" (copy bytes) or "f32_scale" (F32 powers of two -> ue8m0 exponent bytes)."""
    info: TensorInfo
    row0: int
    rows: int
    col0: int
    width: int
    kind: str = "raw"


def spelling(entry: MappingTable, index: dict[str, TensorInfo]) -> MappingTable:
    """The entry as the files spell it: the first of its spellings whose values tensors are present
    (else the first spelling, so that resolve names what is missing)."""
    for values, scales in entry.spellings:
        if all(n in index for n in values):
            return entry.spelled(values, scales)
    return entry


def resolve(entry: MappingTable, index: dict[str, TensorInfo]) -> tuple[int, int, list[Piece]]:
    """(rows, dim, pieces) of one table; raises InvalidArgument naming the first thing that is wrong."""
    where = f"table {entry.table!r}"
    entry = spelling(entry, index)

    def get(name: str) -> TensorInfo:
        t = index.get(name)
        if t is None:
            near = [n for n in index if n.split(".")[-1] == name.split(".")[-1]][:3]
            others = [v[0] for v, _ in entry.spellings if v[0] != name] if name in entry.values else []
            raise InvalidArgument(f"{where}: tensor {name!r} is in none of the files"
                                  + (f" (nor is {others})" if others else "")
                                  + (f" (similar: {near})" if near else ""))
        if len(t.shape) != 2:
            raise InvalidArgument(f"{where}: tensor {name!r} in {t.file} has shape {t.shape}; expected 2-D [rows, width]")
        return t

    values = [get(n) for n in entry.values]
    want = TABLE_TENSOR_DTYPE.get(entry.dtype)
    for v in values:
        if want is not None and v.dtype != want:
            raise InvalidArgument(f"{where}: tensor {v.name!r} in {v.file} is {v.dtype}; a {entry.dtype} table "
                                  f"needs {want}")
    scales = [get(n) for n in entry.scales]
    for s in scales:
        if s.dtype not in (entry.scale_dtype or SCALE_DTYPES):
            raise InvalidArgument(f"{where}: scales tensor {s.name!r} in {s.file} is {s.dtype}; expected "
                                  f"{' or '.join(entry.scale_dtype or SCALE_DTYPES)}")
    widths = [v.shape[1] if entry.dtype != "bytes" else v.row_bytes for v in values]
    if entry.concat == "rows":
        if len(set(widths)) != 1:
            raise InvalidArgument(f"{where}: heads stacked along rows must have one width, got {widths}")
        rows, dim = sum(v.shape[0] for v in values), widths[0]
    else:
        if len({v.shape[0] for v in values}) != 1:
            raise InvalidArgument(f"{where}: heads side by side must have the same rows, got "
                                  f"{[v.shape[0] for v in values]}")
        rows, dim = values[0].shape[0], sum(widths)
    if entry.dtype == "fp8_e4m3":
        for v, s in zip(values, scales):
            if v.shape[1] % entry.block or s.shape != (v.shape[0], v.shape[1] // entry.block):
                raise InvalidArgument(f"{where}: scales {s.name!r} in {s.file} have shape {s.shape}; values "
                                      f"{v.name!r} {v.shape} with block {entry.block} need "
                                      f"({v.shape[0]}, {v.shape[1] // max(1, entry.block)})")
    spec = entry.spec(rows, dim)  # validates dtype/block
    item = spec.itemsize
    pieces, r, c, sc = [], 0, 0, spec.dim  # sc: next scale byte column (fp8)
    for i, v in enumerate(values):
        vw = v.shape[1] * item if entry.dtype != "bytes" else v.row_bytes
        pieces.append(Piece(v, r, v.shape[0], c, vw))
        if scales:
            s = scales[i]
            pieces.append(Piece(s, r, s.shape[0], sc, s.shape[1], "f32_scale" if s.dtype == "F32" else "raw"))
        if entry.concat == "rows":
            r += v.shape[0]
        else:
            c += vw
            sc += scales[i].shape[1] if scales else 0
    return rows, dim, pieces
