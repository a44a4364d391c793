"""The user's training data: text files, directories and globs of them, JSON Lines, Parquet; streamed.

    engram-train --data notes/ 'papers/**/*.txt' dump.jsonl shard-*.parquet --config small

    files = expand_data_paths(["corpus/", "extra/*.jsonl"])       # sorted, every pattern must match
    for doc in iter_documents(files): ...                          # Document(key, text, last) pieces
    corpus = build_data_corpus(tok, ["corpus/"], val_fraction=0.05, cache_dir="runs/cache")

Formats, by file suffix:
  .jsonl / .ndjson   one document per line, a JSON object with a string field "text";
  .parquet           one document per row of its "text" column (pyarrow, read in record batches);
  anything else      UTF-8 text; a file is one document, read in pieces of about 1 MiB on line
                     boundaries, so a file of any size streams. Each piece is its own unit of the
                     train/validation split, so one large file still splits.
A directory means every file under it (hidden ones skipped); a pattern with * ? or [ is a glob
(** recurses). Malformed input raises DataError naming the file and the line (or Parquet row).

The split is by document (piece), deterministic: blake2b of "<file name>:<record>" against val_fraction,
as the stdlib corpus splits by file path; the same --data gives the same split, whatever else runs.
Tokens go to two flat int32 files under cache_dir (keyed by the tokenizer, the files' sizes and
mtimes and val_fraction), written as they are produced, and are read back as memory maps: nothing
holds the whole corpus in memory, neither while tokenizing nor while training.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PIECE_CHARS = 1 << 20


class DataError(ValueError):
    """Training data that cannot be read; the message names the file and the line."""


@dataclass
class Document:
    key: str          # "<file name>:<record>": what the train/validation split hashes (not the
                      # directory, so a dataset keeps its split wherever it is mounted)
    text: str
    last: bool        # the last piece of its document: EOS follows


def expand_data_paths(patterns: Iterable[str]) -> list[Path]:
    """Files named by paths, directories and glob patterns, in a deterministic order."""
    out: list[Path] = []
    for pat in patterns:
        if any(c in pat for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(pat, recursive=True) if Path(p).is_file())
            if not found:
                raise DataError(f"--data {pat!r}: the pattern matches no file")
            out += found
        elif Path(pat).is_dir():
            found = sorted(p for p in Path(pat).rglob("*")
                           if p.is_file() and not any(part.startswith(".") for part in p.relative_to(pat).parts))
            if not found:
                raise DataError(f"--data {pat!r}: the directory holds no file")
            out += found
        elif Path(pat).is_file():
            out.append(Path(pat))
        else:
            raise DataError(f"--data {pat!r}: no such file or directory")
    seen, unique = set(), []
    for p in out:
        if p not in seen:
            seen.add(p)
            unique.append(p)
    return unique


def _text_pieces(path: Path) -> Iterator[Document]:
    buf, size, piece, line_no = [], 0, 0, 0
    with open(path, "rb") as f:
        for raw in f:
            line_no += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{line_no}: not UTF-8 text ({e.reason} at byte {e.start} of the line); "
                                f"convert the file to UTF-8 or leave it out") from None
            buf.append(line)
            size += len(line)
            if size >= PIECE_CHARS:
                yield Document(f"{path.name}:{piece}", "".join(buf), False)
                buf, size, piece = [], 0, piece + 1
    yield Document(f"{path.name}:{piece}", "".join(buf), True)


def _jsonl_docs(path: Path) -> Iterator[Document]:
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{path}:{line_no}: not a JSON object ({e}); each line must be like "
                                f'{{"text": "..."}}') from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                got = type(obj.get("text")).__name__ if isinstance(obj, dict) and "text" in obj else "no 'text' field"
                raise DataError(f"{path}:{line_no}: each line needs a string field 'text' ({got})")
            yield Document(f"{path.name}:{line_no}", obj["text"], True)


def _parquet_docs(path: Path) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if "text" not in names:
        raise DataError(f"{path}: Parquet file has no 'text' column (columns: {', '.join(names)})")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=["text"]):
        for value in batch.column(0).to_pylist():
            row += 1
            if not isinstance(value, str):
                raise DataError(f"{path}: row {row}: 'text' is {type(value).__name__}, not a string")
            yield Document(f"{path.name}:{row}", value, True)


def iter_documents(files: Iterable[Path]) -> Iterator[Document]:
    for path in files:
        suffix = path.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            yield from _jsonl_docs(path)
        elif suffix == ".parquet":
            yield from _parquet_docs(path)
        else:
            yield from _text_pieces(path)


def is_validation_key(key: str, val_fraction: float) -> bool:
    """A stable split by key: blake2b (crc32 is linear, so keys that differ by one digit cluster)."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return h % 10_000 < int(round(val_fraction * 10_000))


def training_texts(files: list[Path], val_fraction: float, max_chars: int = 200 << 20) -> Iterator[str]:
    """Training-split text (for fitting a tokenizer), at most max_chars of it."""
    total = 0
    for doc in iter_documents(files):
        if not is_validation_key(doc.key, val_fraction):
            yield doc.text
            total += len(doc.text)
            if total >= max_chars:
                return


def data_fingerprint(files: list[Path]) -> str:
    h = hashlib.sha1()
    for p in files:
        st = p.stat()
        h.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


class _TokenFile:
    """Appends int32 token ids to a file in blocks."""

    def __init__(self, path: Path, block: int = 1 << 20):
        self.f, self.parts, self.n, self.pending, self.block = open(path, "wb"), [], 0, 0, block

    def add(self, ids: np.ndarray) -> None:
        self.parts.append(ids)
        self.pending += len(ids)
        if self.pending >= self.block:
            self.flush()

    def flush(self) -> None:
        if self.parts:
            np.concatenate(self.parts).astype(np.int32).tofile(self.f)
            self.n += self.pending
            self.parts, self.pending = [], 0

    def close(self) -> int:
        self.flush()
        self.f.close()
        return self.n


def build_data_corpus(tok, patterns: list[str], val_fraction: float = 0.05, cache_dir: str | Path = "runs/cache",
                      batch_docs: int = 256, log=print):
    """A data.Corpus over the user's files: train/val token streams as read-only memory maps."""
    from engram_model.data import Corpus

    files = expand_data_paths(patterns)
    h = hashlib.sha1(tok.tokenizer.to_str().encode())
    h.update(data_fingerprint(files).encode())
    h.update(str(val_fraction).encode())
    out = Path(cache_dir) / f"data-{h.hexdigest()[:16]}"
    meta = out / "meta.json"
    if not meta.exists():
        tmp = out.with_name(out.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        sinks = {"train": _TokenFile(tmp / "train.bin"), "val": _TokenFile(tmp / "val.bin")}
        counts = {"train": 0, "val": 0}
        eos = np.array([tok.eos_id], dtype=np.int32)
        pending: list[Document] = []

        def drain():
            for doc, ids in zip(pending, tok.encode_batch([d.text for d in pending])):
                split = "val" if is_validation_key(doc.key, val_fraction) else "train"
                sinks[split].add(np.asarray(ids, dtype=np.int32))
                counts[split] += 1
                if doc.last:
                    sinks[split].add(eos)
            pending.clear()

        for doc in iter_documents(files):
            pending.append(doc)
            if len(pending) >= batch_docs:
                drain()
        drain()
        n = {k: s.close() for k, s in sinks.items()}
        (tmp / "meta.json").write_text(json.dumps({"tokens": n, "documents": counts,
                                                   "files": [str(p) for p in files]}))
        if out.exists():
            import shutil
            shutil.rmtree(out)
        tmp.rename(out)
    info = json.loads(meta.read_text())
    n, docs = info["tokens"], info["documents"]
    if not n["train"] or not n["val"]:
        raise DataError(f"--data: val_fraction={val_fraction} puts {docs['train']} documents in training and "
                        f"{docs['val']} in validation; both need some: add documents or change val_fraction "
                        f"(--set val_fraction=0.2)")
    log(f"data: {len(files)} files, {docs['train']} + {docs['val']} documents, {n['train']:,} + {n['val']:,} tokens "
        f"(train + validation) in {out}")
    split = {k: np.memmap(out / f"{k}.bin", dtype=np.int32, mode="r", shape=(n[k],)) for k in ("train", "val")}
    return Corpus(split["train"], split["val"], docs["train"], docs["val"])
