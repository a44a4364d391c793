"""Training: a few steps reduce the loss, tables and dense weights both learn, tables get 5x the
dense lr, the schedule, CLI overrides, and a checkpoint round trip that resumes bit for bit.

    pytest tests/unit/model/test_train.py -q
"""

import dataclasses
import json

import numpy as np
import pytest
import torch

from engram_model.model import EngramModel
from engram_model.checkpoint import load_checkpoint, load_model
from engram_model.config import TrainConfig, load_config
from engram_model.data import Corpus, is_validation, split_files, stdlib_files
from engram_model.rows import LocalRows, table_specs
from engram_model.tokenizer import CompressedTokenizer
from engram_model.train import evaluate, lr_at, train
from engram_model.train_cli import _apply_overrides


def synthetic_text(n_lines=600, seed=0):
    """Python-like lines with strong local n-gram structure."""
    rng = np.random.default_rng(seed)
    names = ["alpha", "beta", "Gamma", "delta", "Epsilon", "zeta"]
    out = []
    for _ in range(n_lines):
        a, b = rng.choice(names, 2)
        k = int(rng.integers(0, 20))
        out.append(rng.choice([f"def {a}_{k}(self, {b}):\n    return self.{b} + {k}\n",
                               f"    {a} = {b}.get('{a}', {k})\n",
                               f"class {a.title()}{k}({b.title()}):\n    pass\n"]))
    return "".join(out)


@pytest.fixture(scope="module")
def tok():
    return CompressedTokenizer.train([synthetic_text()], vocab_size=300)


@pytest.fixture(scope="module")
def corpus(tok):
    ids = []
    for seed in range(3):
        ids += tok.encode(synthetic_text(seed=seed)) + [tok.eos_id]
    return Corpus.from_tokens(np.array(ids), val_fraction=0.15)


def tiny(**train_kw):
    m, t = load_config("tiny")
    return m, dataclasses.replace(t, **train_kw)


def test_a_few_steps_reduce_the_loss(tok, corpus):
    m, t = tiny(steps=30, eval_every=0)
    res = train(m, t, tokenizer=tok, corpus=corpus, progress=False, log=lambda *a: None)
    # the same model at initialization, evaluated on the same fixed validation batches
    torch.manual_seed(t.seed)
    cfg = m.for_tokenizer(tok)
    fresh = EngramModel(cfg, rows=LocalRows(table_specs(cfg)), compress_lookup=tok.lookup)
    batches = corpus.eval_batches(t.batch_size, t.seq_len, t.eval_batches)
    initial = evaluate(fresh, batches, torch.device("cpu"))
    final = res.history["val_loss"][-1]
    assert initial > 5.0 and final < initial - 1.0, (initial, final)
    assert np.mean(res.history["loss"][-5:]) < np.mean(res.history["loss"][:5]) - 1.0
    # the Engram tables learned too, and only rows that were looked up changed
    init_rows = LocalRows(table_specs(cfg))
    for layer, w in res.rows.weights.items():
        changed = (w != init_rows.weights[layer]).any(dim=1)
        assert 0 < changed.sum() < w.shape[0]
    assert res.history["val_step"] == [30] and len(res.history["loss"]) == 30


class LrRecorder(LocalRows):
    def step(self, lr, step):
        self.seen = getattr(self, "seen", []) + [(step, lr)]
        super().step(lr, step)


def test_tables_step_at_five_times_the_dense_lr(tok, corpus):
    m, t = tiny(steps=6, warmup_steps=2, eval_every=0)
    cfg = m.for_tokenizer(tok)
    rec = LrRecorder(table_specs(cfg))
    train(m, t, tokenizer=tok, corpus=corpus, rows=rec, progress=False, log=lambda *a: None)
    assert [s for s, _ in rec.seen] == list(range(1, 7))
    assert all(lr == pytest.approx(5 * lr_at(s - 1, t)) for s, lr in rec.seen)


def test_lr_schedule():
    t = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, t) == pytest.approx(0.1) and lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(99, t) == pytest.approx(0.1, abs=1e-3)
    assert all(lr_at(i, t) >= lr_at(i + 1, t) for i in range(10, 99))


def test_overrides():
    m, t = load_config("tiny")
    m2, t2 = _apply_overrides(m, t, ["lr=0.01", "train.steps=7", "model.dim=48", "model.engram.head_dim=4", "dtype=bf16"])
    assert (t2.lr, t2.steps, t2.dtype, m2.dim, m2.engram.head_dim) == (0.01, 7, "bf16", 48, 4)
    with pytest.raises(ValueError):
        _apply_overrides(m, t, ["nonsense=1"])


def test_checkpoint_round_trip_and_exact_resume(tok, corpus, tmp_path):
    m, t = tiny(steps=8, eval_every=4, checkpoint_every=0)
    quiet = dict(tokenizer=tok, corpus=corpus, progress=False, log=lambda *a: None)
    straight = train(m, t, out_dir=tmp_path / "a", **quiet)
    # the checkpoint reproduces the model, the tables and their optimizer state
    ck = load_checkpoint(tmp_path / "a" / "ckpt")
    assert ck.step == 8 and ck.model_cfg == straight.model_cfg and ck.train_cfg == t
    x = torch.randint(0, ck.model_cfg.vocab_size, (2, 16))
    straight.model.eval()
    torch.testing.assert_close(ck.model(x)[0], straight.model(x)[0], rtol=0, atol=0)
    for k, v in straight.rows.state_dict().items():
        assert torch.equal(ck.rows.state_dict()[k], v), k
    for k, v in straight.model.state_dict().items():
        assert torch.equal(ck.model.state_dict()[k], v), k
    assert set(ck.optimizer_state) and all(k.split(".")[-1] in ("exp_avg", "exp_avg_sq", "step") for k in ck.optimizer_state)
    np.testing.assert_array_equal(ck.tokenizer.lookup, tok.lookup)
    assert json.loads((tmp_path / "a" / "history.json").read_text())["val_step"] == [4, 8]
    assert (tmp_path / "a" / "loss.png").stat().st_size > 0
    # stop at step 3, resume from the checkpoint: the same losses as the uninterrupted run
    train(m, t, out_dir=tmp_path / "b", stop_at=3, **quiet)
    resumed = train(m, t, out_dir=tmp_path / "b", resume=tmp_path / "b" / "ckpt", **quiet)
    assert resumed.history["step"] == list(range(1, 9))
    assert resumed.history["loss"] == straight.history["loss"]
    assert resumed.history["val_loss"][-1] == straight.history["val_loss"][-1]
    # generation loads read-only tables
    model, tok2 = load_model(tmp_path / "a" / "ckpt")
    assert not model.training and model.rows.optimizer is None


def test_stdlib_split_is_deterministic_and_by_file():
    files = stdlib_files()
    assert len(files) > 500 and files == sorted(files)
    assert not any("site-packages" in f for f in files)
    train_files, val_files = split_files(files, 0.05)
    assert set(train_files).isdisjoint(val_files) and len(train_files) + len(val_files) == len(files)
    assert 0.02 < len(val_files) / len(files) < 0.1
    assert all(is_validation(f, 0.05) for f in val_files)
    assert split_files(files, 0.05) == (train_files, val_files)
