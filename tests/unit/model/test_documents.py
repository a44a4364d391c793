"""engram-train --data: text files, directories and globs, JSON Lines, Parquet, and a Hugging Face
tokenizer.json made elsewhere; each trains a few steps and lowers the loss. The split is by document
and deterministic; malformed files get an error naming the file and the line.

    pytest tests/unit/model/test_documents.py -q
"""

import json

import numpy as np
import pytest

from engram_model.documents import (DataError, build_data_corpus, expand_data_paths, is_validation_key,
                                    iter_documents)
from engram_model.tokenizer import CompressedTokenizer
from engram_model.train_cli import main as train_main

SETS = ["--config", "tiny", "--steps", "12", "--no-progress", "--set", "eval_every=0", "--set", "val_fraction=0.2",
        "--set", "warmup_steps=2", "--set", "tokenizer_vocab=300", "--batch-size", "4", "--seq-len", "32"]


def docs(n=60, seed=0):
    rng = np.random.default_rng(seed)
    names = ["alpha", "beta", "gamma", "delta"]
    return [f"def {rng.choice(names)}_{i}(x):\n    return x * {int(rng.integers(9))} + {i % 5}\n" * 3 for i in range(n)]


def write_formats(root):
    d = docs()
    (root / "txt").mkdir()
    for i, t in enumerate(d[:20]):
        (root / "txt" / f"doc{i}.txt").write_text(t)
    (root / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(d[20:40])))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": d[40:], "n": list(range(20))}), root / "b.parquet", row_group_size=7)
    return d


def run_train(tmp_path, monkeypatch, data, extra=()):
    monkeypatch.chdir(tmp_path)          # runs/ (tokenizer, token cache) goes under tmp_path
    out = tmp_path / "out"
    train_main(SETS + ["--out", str(out), "--data", *data, *extra])
    return json.loads((out / "history.json").read_text())


@pytest.mark.parametrize("fmt", ["txt-dir", "glob", "jsonl", "parquet"])
def test_each_format_trains_and_lowers_the_loss(tmp_path, monkeypatch, fmt):
    write_formats(tmp_path)
    data = {"txt-dir": [str(tmp_path / "txt")], "glob": [str(tmp_path / "txt" / "doc1*.txt"), str(tmp_path / "*.jsonl")],
            "jsonl": [str(tmp_path / "a.jsonl")], "parquet": [str(tmp_path / "b.parquet")]}[fmt]
    h = run_train(tmp_path, monkeypatch, data)
    assert h["step"][-1] == 12 and h["val_loss"]
    assert np.mean(h["loss"][-3:]) < np.mean(h["loss"][:3]) - 0.3
    assert (tmp_path / "out" / "loss.png").exists() and (tmp_path / "out" / "ckpt" / "tokenizer.json").exists()


def test_documents_split_deterministically_and_stream_as_memory_maps(tmp_path):
    d = write_formats(tmp_path)
    files = expand_data_paths([str(tmp_path / "txt"), str(tmp_path / "*.jsonl"), str(tmp_path / "b.parquet")])
    got = list(iter_documents(files))
    assert [g.text for g in got] == [d[int(f.stem[3:])] for f in files[:20]] + d[20:]
    assert all(g.last for g in got) and len({g.key for g in got}) == 60
    tok = CompressedTokenizer.train(d, vocab_size=300)
    data = [str(p) for p in files]
    a = build_data_corpus(tok, data, 0.2, cache_dir=tmp_path / "cache", log=lambda *a: None)
    b = build_data_corpus(tok, data, 0.2, cache_dir=tmp_path / "cache2", log=lambda *a: None)
    assert isinstance(a.train, np.memmap) and np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    n_val = sum(is_validation_key(g.key, 0.2) for g in got)
    assert 0 < n_val < 60 and a.n_val_files == n_val
    assert int((np.asarray(a.val) == tok.eos_id).sum()) == n_val     # every document ends with EOS


def test_a_large_text_file_streams_in_pieces(tmp_path, monkeypatch):
    import engram_model.documents as documents

    monkeypatch.setattr(documents, "PIECE_CHARS", 100)
    (tmp_path / "big.txt").write_text("".join(f"line {i}\n" for i in range(100)))
    pieces = list(iter_documents([tmp_path / "big.txt"]))
    assert len(pieces) > 5 and [p.last for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert "".join(p.text for p in pieces) == (tmp_path / "big.txt").read_text()


def test_malformed_files_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:4: not a JSON object"):
        list(iter_documents([bad]))
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: .*'text'"):
        list(iter_documents([bad]))
    bad.write_text('{"text": 5}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: .*\(int\)"):
        list(iter_documents([bad]))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("ok\nstill ok\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.txt:3: not UTF-8"):
        list(iter_documents([latin]))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p\.parquet: .*no 'text' column \(columns: body\)"):
        list(iter_documents([tmp_path / "p.parquet"]))
    pq.write_table(pa.table({"text": ["x", None]}), tmp_path / "q.parquet")
    with pytest.raises(DataError, match=r"q\.parquet: row 2"):
        list(iter_documents([tmp_path / "q.parquet"]))
    (tmp_path / "r.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"r\.parquet: not a readable Parquet file"):
        list(iter_documents([tmp_path / "r.parquet"]))
    with pytest.raises(DataError, match="matches no file"):
        expand_data_paths([str(tmp_path / "*.nothing")])
    with pytest.raises(DataError, match="no such file"):
        expand_data_paths([str(tmp_path / "missing.txt")])


def test_cli_reports_a_malformed_file(tmp_path, monkeypatch):
    (tmp_path / "bad.jsonl").write_text('{"text": "def f(x): return x"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        run_train(tmp_path, monkeypatch, [str(tmp_path / "bad.jsonl")])


def test_a_hugging_face_tokenizer_made_elsewhere(tmp_path, monkeypatch):
    """A Llama-style tokenizer.json (Metaspace, <s> </s> <unk>, no pad token) trains the model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = write_formats(tmp_path)
    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    hf.train_from_iterator(d, trainers.BpeTrainer(vocab_size=280, special_tokens=["<unk>", "<s>", "</s>"],
                                                  show_progress=False))
    path = tmp_path / "elsewhere" / "tokenizer.json"
    path.parent.mkdir()
    hf.save(str(path))
    tok = CompressedTokenizer.load(path)
    assert tok.eos_token == "</s>" and tok.pad_token == "<|pad|>" and tok.vocab_size == hf.get_vocab_size() + 1
    assert 0 < tok.compressed_vocab_size <= tok.vocab_size
    h = run_train(tmp_path, monkeypatch, [str(tmp_path / "a.jsonl")], extra=["--tokenizer", str(path)])
    assert np.mean(h["loss"][-3:]) < np.mean(h["loss"][:3]) - 0.3
    saved = CompressedTokenizer.load(tmp_path / "out" / "ckpt" / "tokenizer.json")
    assert saved.vocab_size == tok.vocab_size and np.array_equal(saved.lookup, tok.lookup)


def test_the_split_does_not_depend_on_where_the_data_lives(tmp_path):
    """The same files under two directories split the same way (the key is the file name and record)."""
    d = docs()
    for root in ("here", "there/deeper"):
        (tmp_path / root).mkdir(parents=True)
        (tmp_path / root / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in d[:40]))
    split = [[is_validation_key(g.key, 0.2) for g in iter_documents([tmp_path / root / "a.jsonl"])]
             for root in ("here", "there/deeper")]
    assert split[0] == split[1] and 0 < sum(split[0]) < 40
