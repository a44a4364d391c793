"""The id-trace recorder (engram_model.trace) and the planner reading a trace.

    pytest tests/unit/plan/test_plan_trace.py -q
"""

import dataclasses

import numpy as np
import pytest
import torch

from engram_mem.plan.workload import TraceDistribution
from engram_model.config import load_config
from engram_model.model import EngramModel
from engram_model.rows import LocalRows, table_specs
from engram_model.tokenizer import CompressedTokenizer
from engram_model.trace import IdRecorder, load_trace
from engram_model.train import train

from tests.unit.model.test_train import corpus, synthetic_text, tok  # noqa: F401  (module fixtures)


def test_recorder_keeps_every_forwards_ids_and_passes_rows_through(tok, tmp_path):  # noqa: F811
    m, _ = load_config("tiny")
    cfg = m.for_tokenizer(tok)
    local = LocalRows(table_specs(cfg))
    torch.manual_seed(0)
    model = EngramModel(cfg, rows=local, compress_lookup=tok.lookup).eval()
    x = torch.tensor([tok.encode(synthetic_text(20))[:32], tok.encode(synthetic_text(20, seed=1))[:32]])
    with torch.inference_mode():
        ref = model(x)[0]
        rec = IdRecorder(local, str(tmp_path / "ids.npz"))
        model.rows = rec
        out = model(x)[0]
        model(x[:, :10])
    assert torch.equal(out, ref)                                  # recording changes nothing
    path = rec.save()
    tr = load_trace(path)
    expect = model.row_ids(x)
    assert tr.layers == list(cfg.engram_layers)
    for layer in cfg.engram_layers:
        ids = tr.ids(layer)
        n = expect[layer].numel()
        assert np.array_equal(ids[:n], expect[layer].reshape(-1).numpy())
        assert tr.calls(layer) == 2 and list(tr.call_sizes(layer)) == [n, model.row_ids(x[:, :10])[layer].numel()]
        assert tr.distinct_per_call(layer) > 0
        assert tr.table_rows[layer] == table_specs(cfg)[layer].rows
    assert not tr.truncated
    dist = TraceDistribution.load(path, layer=cfg.engram_layers[0])
    assert dist.counts.sum() == tr.ids(cfg.engram_layers[0]).size
    assert 0 < dist.hit_rate(10) < 1


def test_recorder_bounds_memory_and_says_so(tmp_path):
    rec = IdRecorder(None, str(tmp_path / "t.npz"), max_ids=10)
    rec.record(1, np.arange(6))
    rec.record(1, np.arange(6))        # would exceed 10: dropped
    tr = load_trace(rec.save())
    assert tr.truncated and tr.ids(1).size == 6


def test_bad_trace_files_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_trace(str(tmp_path / "none.npz"))
    np.savez(tmp_path / "other.npz", a=np.arange(3))
    with pytest.raises(ValueError, match="not an id trace"):
        load_trace(str(tmp_path / "other.npz"))


def test_train_records_ids_with_record_ids(tok, corpus, tmp_path):  # noqa: F811
    m, t = load_config("tiny")
    t = dataclasses.replace(t, steps=3, eval_every=0)
    res = train(m, t, tokenizer=tok, corpus=corpus, progress=False, log=lambda *a: None,
                record_ids=str(tmp_path / "train.npz"))
    tr = load_trace(str(tmp_path / "train.npz"))
    # 3 training forwards + the final evaluation's forwards, every Engram layer each time
    assert tr.calls(tr.layers[0]) >= 3
    assert tr.ids(tr.layers[0]).size >= 3 * t.batch_size * t.seq_len * 4
    assert isinstance(res.rows, IdRecorder)


def test_generate_records_ids_with_record_ids(tok, corpus, tmp_path, capsys):  # noqa: F811
    from engram_model.generate import main as generate_main

    m, t = load_config("tiny")
    t = dataclasses.replace(t, steps=2, eval_every=0)
    train(m, t, tokenizer=tok, corpus=corpus, out_dir=tmp_path / "run", progress=False, log=lambda *a: None)
    generate_main(["--checkpoint", str(tmp_path / "run" / "ckpt"), "--prompt", "def alpha", "--max-new-tokens", "5",
                   "--device", "cpu", "--record-ids", str(tmp_path / "gen.npz")])
    assert "row ids saved to" in capsys.readouterr().out
    tr = load_trace(str(tmp_path / "gen.npz"))
    # the prompt's forward, then one forward per new token (up to 5), each over every Engram layer
    assert 2 <= tr.calls(tr.layers[0]) <= 6 and tr.layers == sorted(tr.layers)


def test_the_planner_imports_neither_ray_nor_grpc():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    code = "import sys, engram_mem.plan.cli, engram_mem.plan.simulate; print(sorted(m for m in ('ray', 'grpc') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": root})
    assert out.stdout.strip() == "[]", out.stderr
