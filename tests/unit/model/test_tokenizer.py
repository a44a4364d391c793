"""CompressedTokenizer: the compression keys (case, accents, whitespace, U+FFFD), first-appearance
ids, and a small trained BPE end to end.

    pytest tests/unit/model/test_tokenizer.py -q
"""

import numpy as np
import pytest
import torch

from engram_model.tokenizer import CompressedTokenizer, build_lookup, compression_keys


def key(text, raw=None):
    return compression_keys([text], [raw if raw is not None else text])[0]


@pytest.mark.parametrize("a,b", [
    ("Hello", "hello"), ("GREAT", "great"),                     # case
    ("café", "cafe"), ("Ünïcödé", "unicode"), ("naïve", "NAIVE"),  # accents (NFD + strip)
    ("ﬁle", "file"), ("Ｆｕｌｌ", "full"),                       # NFKC compatibility forms
    (" the", "the"), ("the\n", "the"), ("\tx  ", "x"),           # surrounding whitespace is stripped
])
def test_keys_fold(a, b):
    assert key(a) == key(b)


@pytest.mark.parametrize("a,b", [("a b", "ab"), ("cat", "cot"), ("1", "l")])
def test_keys_keep_distinct(a, b):
    assert key(a) != key(b)


def test_whitespace():
    for ws in [" ", "  ", "\n", "\r\n", "\t\t", " \n\t ", "        "]:
        assert key(ws) == " ", repr(ws)           # whitespace-only tokens stay one space
    assert key("a  \t\n b") == "a b"              # inner runs collapse
    assert key("\u00a0") == " "                   # NBSP: NFKC makes it a space


def test_replacement_char_uses_raw_token():
    # A byte-level token that is half of a UTF-8 sequence decodes to U+FFFD: keep the raw string,
    # so that different partial bytes never collapse into one key.
    assert key("\ufffd", raw="Ã") == "Ã"
    assert key("\ufffd", raw="Ä") == "Ä"
    assert key("ab\ufffd", raw="abÃ") == "abÃ"


def test_empty_after_normalizing_keeps_original():
    accent = "\u0301"                              # a lone combining accent: stripping leaves ""
    assert key(accent) == accent


def test_lookup_first_appearance():
    lookup, n = build_lookup(["b", "a", "b", "c", "a"])
    assert lookup.tolist() == [0, 1, 0, 2, 1] and n == 3


@pytest.fixture(scope="module")
def tok():
    words = ["Hello", "hello", "HELLO", "café", "cafe", "Café", "world", "World", "naïve", "naive", "def", "Def"]
    text = "\n".join(" ".join(words[i:] + words[:i]) + "    \n\t" for i in range(len(words)))
    return CompressedTokenizer.train([text] * 20, vocab_size=300)


def test_trained_tokenizer(tok, tmp_path):
    assert tok.vocab_size <= 300 and tok.compressed_vocab_size < tok.vocab_size
    assert 0 < tok.reduction < 1
    ids = {w: tok.encode(w) for w in [" Hello", " hello", " world", " World"]}
    assert all(len(v) == 1 for v in ids.values()), ids
    c = lambda w: tok.compress(ids[w]).tolist()
    assert c(" Hello") == c(" hello") and c(" world") == c(" World") and c(" hello") != c(" world")
    # a byte token that is not valid UTF-8 on its own keeps its own compressed id
    lone = [i for i in range(tok.vocab_size) if "\ufffd" in tok.decode([i])]
    assert lone and len({int(tok.lookup[i]) for i in lone}) == len(lone)
    # compress: numpy and torch, any shape
    arr = np.array([[ids[" Hello"][0], ids[" hello"][0]]])
    assert tok.compress(arr).shape == (1, 2)
    assert torch.equal(tok.compress(torch.from_numpy(arr)), torch.from_numpy(tok.compress(arr)))
    assert tok.decode(tok.encode("Hello café\n")) == "Hello café\n"
    # specials exist; save / load reproduces the vocabulary and the compression
    assert tok.eos_id != tok.pad_id and 0 <= tok.compressed_pad_id < tok.compressed_vocab_size
    tok.save(tmp_path / "tok.json")
    again = CompressedTokenizer.load(tmp_path / "tok.json")
    np.testing.assert_array_equal(again.lookup, tok.lookup)
    assert again.encode("naïve World") == tok.encode("naïve World")


def test_train_rejects_tiny_vocab():
    with pytest.raises(ValueError):
        CompressedTokenizer.train(["abc"], vocab_size=100)
