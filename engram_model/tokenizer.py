"""CompressedTokenizer: a cased byte-level BPE plus Engram's token-id compression.

    tok = CompressedTokenizer.train(texts, vocab_size=8192)   # Hugging Face `tokenizers` BPE
    tok.save("runs/tokenizer.json"); tok = CompressedTokenizer.load("runs/tokenizer.json")
    ids = tok.encode("def f(x):")                              # model ids
    cids = tok.compress(ids)                                    # compressed ids, for hashing only
    print(tok.compressed_vocab_size, f"{tok.reduction:.2%}")

Compression folds tokens that mean the same text once normalized, so that "Great", "great" and
" GREAT" share n-gram rows. Each token id maps to a key:
  1. decode the single token;
  2. if the text holds U+FFFD (a partial UTF-8 sequence), the key is the raw token string;
  3. otherwise NFKC, NFD, strip accents, lowercase, collapse runs of [ \\t\\r\\n] to one space,
     strip; a whitespace-only token stays " "; an empty result falls back to the original text.
Compressed ids go to keys in order of first appearance. The normalizer chain is Hugging Face's
(same Unicode tables as the reference implementation), so the mapping matches it exactly.

Only the model's embedding and output use the full vocabulary; only the hash uses compressed ids.
The lookup is recomputed from tokenizer.json on load (it is a pure function of the vocabulary).

A Hugging Face tokenizer.json made elsewhere loads too (CompressedTokenizer.load): its end-of-text
token is the first of EOS_ALIASES it has (<|endoftext|>, </s>, DeepSeek's <｜end▁of▁sentence｜>, ...);
its pad is the id a checkpoint's config names (`pad_token_id`), else the first of PAD_ALIASES it
has, else a <|pad|> special token appended to its vocabulary (never for a published checkpoint:
appending changes the compressed vocabulary every hash multiplier derives from, so
`from_checkpoint` reads the pad id and checks the compressed size against the config). The
compression mapping is built from its vocabulary the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOS, PAD]
# A tokenizer.json made elsewhere names its end-of-text and padding tokens in its own way.
# DeepSeek's checkpoints (V3, V4.1) spell theirs with fullwidth bars and U+2581: <｜end▁of▁sentence｜>.
EOS_ALIASES = [EOS, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>", "[SEP]",
               "<\uff5cend\u2581of\u2581sentence\uff5c>"]
PAD_ALIASES = [PAD, "<pad>", "[PAD]", "<|finetune_right_pad_id|>", "<\uff5c\u2581pad\u2581\uff5c>"]
_SENTINEL = "\ue000"   # private-use char: protects a lone " " from Strip


def key_normalizer() -> normalizers.Normalizer:
    """The normalization of step 3, as one Hugging Face normalizer."""
    return normalizers.Sequence([
        normalizers.NFKC(),
        normalizers.NFD(),
        normalizers.StripAccents(),
        normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
        normalizers.Replace(Regex(r"^ $"), _SENTINEL),   # whitespace-only token: keep its one space
        normalizers.Strip(),
        normalizers.Replace(_SENTINEL, " "),
    ])


def compression_keys(texts: list[str], raw_tokens: list[str]) -> list[str]:
    """Key per token from its decoded text and its raw vocabulary string (steps 2 and 3)."""
    norm = key_normalizer()
    keys = []
    for text, raw in zip(texts, raw_tokens):
        if "\ufffd" in text:
            keys.append(raw)
        else:
            n = norm.normalize_str(text)
            keys.append(n if n else text)
    return keys


def build_lookup(keys: list[str]) -> tuple[np.ndarray, int]:
    """Compressed id per token id, ids assigned in order of first appearance: (int64 [V], size)."""
    first: dict[str, int] = {}
    lookup = np.empty(len(keys), dtype=np.int64)
    for tid, key in enumerate(keys):
        lookup[tid] = first.setdefault(key, len(first))
    return lookup, len(first)


class CompressedTokenizer:
    def __init__(self, tokenizer: Tokenizer, pad_token_id: int | None = None,
                 compressed_vocab_size: int | None = None):
        """pad_token_id: the model token id that pads n-gram windows, as a checkpoint's config names
        it (V4.1: engram_pad_token_id); then nothing is appended to the vocabulary. compressed_vocab_size:
        the size the checkpoint's tables were hashed with (V4.1: engram_compressed_vocab_size); a
        tokenizer that compresses to another size is refused (its rows would be silently rehashed)."""
        self.tokenizer = tokenizer
        self.eos_token = self._find(EOS_ALIASES, "end-of-text")
        if pad_token_id is not None:
            token = tokenizer.id_to_token(int(pad_token_id))
            if token is None:
                raise ValueError(f"pad_token_id {pad_token_id} is not in the tokenizer's vocabulary "
                                 f"({tokenizer.get_vocab_size()} tokens)")
            self.pad_token = token
        else:
            if next((t for t in PAD_ALIASES if tokenizer.token_to_id(t) is not None), None) is None:
                tokenizer.add_special_tokens([PAD])        # a foreign tokenizer without one: append it
            self.pad_token = self._find(PAD_ALIASES, "padding")
        self.vocab_size = tokenizer.get_vocab_size()
        ids = list(range(self.vocab_size))
        texts = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
        raw = [tokenizer.id_to_token(i) for i in ids]
        self.lookup, self.compressed_vocab_size = build_lookup(compression_keys(texts, raw))  # int64 [V]
        self._lookup_t: dict[str, torch.Tensor] = {}
        self.eos_id = self.tokenizer.token_to_id(self.eos_token)
        self.pad_id = int(pad_token_id) if pad_token_id is not None else self.tokenizer.token_to_id(self.pad_token)
        if compressed_vocab_size is not None and compressed_vocab_size != self.compressed_vocab_size:
            raise ValueError(f"the tokenizer compresses {self.vocab_size} tokens to {self.compressed_vocab_size} ids; "
                             f"the checkpoint's tables were hashed with compressed_vocab_size="
                             f"{compressed_vocab_size}: not the tokenizer these tables were made with")

    def _find(self, aliases: list[str], what: str) -> str:
        for token in aliases:
            if self.tokenizer.token_to_id(token) is not None:
                return token
        raise ValueError(f"the tokenizer has no {what} token (looked for {', '.join(aliases)}); add one to its "
                         f"tokenizer.json or train one with CompressedTokenizer.train")

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8192, length: int | None = None) -> "CompressedTokenizer":
        """Train a cased byte-level BPE (GPT-2 style pre-tokenization) with EOS and PAD specials."""
        if not 256 + len(SPECIAL_TOKENS) <= vocab_size:
            raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (bytes + specials), got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer, length=length)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path, pad_token_id: int | None = None,
             compressed_vocab_size: int | None = None) -> "CompressedTokenizer":
        return cls(Tokenizer.from_file(str(path)), pad_token_id, compressed_vocab_size)

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> "CompressedTokenizer":
        """A published checkpoint's own tokenizer.json, with the pad id and compressed size its
        config.json gives (engram_pad_token_id, engram_compressed_vocab_size; either may be absent)."""
        import json

        d = Path(directory)
        cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").exists() else {}
        return cls.load(d / "tokenizer.json", cfg.get("engram_pad_token_id"), cfg.get("engram_compressed_vocab_size"))

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path))

    # ---- use ------------------------------------------------------------------------------
    @property
    def compressed_pad_id(self) -> int:
        return int(self.lookup[self.pad_id])

    @property
    def reduction(self) -> float:
        """Fraction of the vocabulary removed by compression (the paper: 23.43% on 128k)."""
        return 1.0 - self.compressed_vocab_size / self.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def compress(self, ids):
        """Token ids (list, numpy or torch, any shape) -> compressed ids of the same type and shape."""
        if isinstance(ids, torch.Tensor):
            key = str(ids.device)
            if key not in self._lookup_t:
                self._lookup_t[key] = torch.from_numpy(self.lookup).to(ids.device)
            return self._lookup_t[key][ids.long()]
        return self.lookup[np.asarray(ids, dtype=np.int64)]

    def __len__(self) -> int:
        return self.vocab_size
