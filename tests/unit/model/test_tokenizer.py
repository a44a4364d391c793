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


def _deepseek_style(tmp_path, specials):
    """A byte-level BPE tokenizer.json whose special tokens are named as DeepSeek's checkpoints name them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    text = ["def f(x):\n    return x + 1\n", "Hello World, hello world. CAFÉ café"] * 50
    hf.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tmp_path.mkdir(parents=True, exist_ok=True)
    hf.save(str(tmp_path / "tokenizer.json"))
    return hf


def test_a_deepseek_tokenizer_json_loads_with_its_own_special_tokens_and_nothing_appended(tmp_path):
    import json

    bos, eos, pad = "<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<\uff5c\u2581pad\u2581\uff5c>"
    hf = _deepseek_style(tmp_path, [bos, eos, pad])
    plain = CompressedTokenizer.load(tmp_path / "tokenizer.json")           # recognized by name
    assert plain.eos_token == eos and plain.pad_token == pad and plain.vocab_size == hf.get_vocab_size()

    (tmp_path / "config.json").write_text(json.dumps({"engram_pad_token_id": hf.token_to_id(pad),
                                                      "engram_compressed_vocab_size": plain.compressed_vocab_size}))
    tok = CompressedTokenizer.from_checkpoint(tmp_path)
    assert tok.vocab_size == hf.get_vocab_size()                            # no <|pad|> appended
    assert tok.pad_id == hf.token_to_id(pad) and tok.eos_id == hf.token_to_id(eos)
    assert tok.compressed_vocab_size == plain.compressed_vocab_size
    assert np.array_equal(tok.lookup, plain.lookup)

    (tmp_path / "config.json").write_text(json.dumps({"engram_pad_token_id": hf.token_to_id(pad),
                                                      "engram_compressed_vocab_size": plain.compressed_vocab_size + 1}))
    with pytest.raises(ValueError, match=rf"compresses {tok.vocab_size} tokens to {tok.compressed_vocab_size} ids; "
                                         rf".*compressed_vocab_size={tok.compressed_vocab_size + 1}"):
        CompressedTokenizer.from_checkpoint(tmp_path)


def test_a_pad_id_from_the_config_is_used_even_without_a_pad_token_name(tmp_path):
    """A tokenizer with an end-of-text token but no known pad: the config's pad id, no token appended."""
    eos = "<\uff5cend\u2581of\u2581sentence\uff5c>"
    hf = _deepseek_style(tmp_path / "nopad", [eos])
    tok = CompressedTokenizer.load(tmp_path / "nopad" / "tokenizer.json", pad_token_id=hf.token_to_id(eos))
    assert tok.vocab_size == hf.get_vocab_size() and tok.pad_id == tok.eos_id
    with pytest.raises(ValueError, match="pad_token_id 99999 is not in the tokenizer's vocabulary"):
        CompressedTokenizer.load(tmp_path / "nopad" / "tokenizer.json", pad_token_id=99999)
