"""The training corpus: the Python standard library's own source, split into train/val by file.

    files = stdlib_files()                              # sorted relative paths of *.py (no site-packages)
    train_files, val_files = split_files(files, 0.05)   # by a hash of the path: stable, deterministic
    corpus = Corpus.build(tok, val_fraction=0.05, cache_dir="runs/cache")
    x, y = corpus.batch("train", batch_size=16, seq_len=256, generator=g)   # int64 [B, T] each

Every machine with this Python has this corpus, byte for byte; nothing is downloaded. Files are
UTF-8 decoded (a few test files that are not are skipped), joined with the EOS token, and
tokenized once; the token streams are cached as .npy keyed by the tokenizer and the file list.
Training batches are random windows of seq_len + 1 tokens; validation uses a fixed set of windows.
"""

from __future__ import annotations

import hashlib
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative paths of the stdlib's *.py files, sorted; site-packages (machine-specific) excluded."""
    root = Path(root) if root is not None else stdlib_root()
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root).as_posix()
        if rel.startswith("site-packages/") or "/site-packages/" in rel or rel.startswith("config-"):
            continue
        out.append(rel)
    return sorted(out)


def is_validation(rel_path: str, val_fraction: float) -> bool:
    # crc32 of the path: the split of a file never depends on which other files exist.
    return zlib.crc32(rel_path.encode()) % 10_000 < int(round(val_fraction * 10_000))


def split_files(files: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    val = [f for f in files if is_validation(f, val_fraction)]
    train = [f for f in files if not is_validation(f, val_fraction)]
    return train, val


def read_texts(files: list[str], root: Path | None = None) -> list[str]:
    """UTF-8 text of each file; undecodable files are skipped."""
    root = Path(root) if root is not None else stdlib_root()
    texts = []
    for rel in files:
        try:
            texts.append((root / rel).read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return texts


def tokenize_texts(tok, texts: list[str], chunk: int = 256) -> np.ndarray:
    """All texts as one token stream, each followed by EOS: int32 [N]."""
    parts = []
    for i in range(0, len(texts), chunk):
        for ids in tok.encode_batch(texts[i:i + chunk]):
            parts.append(np.asarray(ids, dtype=np.int32))
            parts.append(np.array([tok.eos_id], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


@dataclass
class Corpus:
    train: np.ndarray      # int32 [N_train]
    val: np.ndarray        # int32 [N_val]
    n_train_files: int
    n_val_files: int

    @classmethod
    def build(cls, tok, val_fraction: float = 0.05, cache_dir: str | Path | None = None,
              root: Path | None = None) -> "Corpus":
        files = stdlib_files(root)
        train_files, val_files = split_files(files, val_fraction)
        if not train_files or not val_files:
            raise ValueError(f"val_fraction={val_fraction} leaves an empty split of {len(files)} files")
        cache = None
        if cache_dir is not None:
            h = hashlib.sha1(tok.tokenizer.to_str().encode())
            h.update("\n".join(files).encode())
            h.update(str(val_fraction).encode())
            cache = Path(cache_dir) / f"stdlib-{h.hexdigest()[:16]}.npz"
            if cache.exists():
                z = np.load(cache)
                return cls(z["train"], z["val"], int(z["n_train_files"]), int(z["n_val_files"]))
        train = tokenize_texts(tok, read_texts(train_files, root))
        val = tokenize_texts(tok, read_texts(val_files, root))
        corpus = cls(train, val, len(train_files), len(val_files))
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp.npz")
            np.savez(tmp, train=train, val=val, n_train_files=len(train_files), n_val_files=len(val_files))
            tmp.replace(cache)
        return corpus

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, val_fraction: float = 0.1) -> "Corpus":
        """A corpus from one token stream (tests, synthetic data): the tail is validation."""
        tokens = np.asarray(tokens, dtype=np.int32)
        cut = int(len(tokens) * (1 - val_fraction))
        return cls(tokens[:cut], tokens[cut:], 1, 1)

    def split(self, name: str) -> np.ndarray:
        if name not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {name!r}")
        return self.train if name == "train" else self.val

    def batch(self, split: str, batch_size: int, seq_len: int, generator: np.random.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: inputs and next-token targets, int64 [B, T] each (on CPU)."""
        data = self.split(split)
        if len(data) < seq_len + 1:
            raise ValueError(f"{split} split has {len(data)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        starts = generator.integers(0, len(data) - seq_len, size=batch_size)
        w = np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int64)   # [B, T+1]
        w = torch.from_numpy(w)
        return w[:, :-1], w[:, 1:]

    def eval_batches(self, batch_size: int, seq_len: int, n_batches: int, seed: int = 1234):
        """The fixed validation windows: the same ones at every evaluation and for every model."""
        g = np.random.default_rng(seed)
        return [self.batch("val", batch_size, seq_len, g) for _ in range(n_batches)]
