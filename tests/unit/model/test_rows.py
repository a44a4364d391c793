"""RowSource / LocalRows: table specs from a config, init identical to TableSpec, gradient
leaves, per-row gradient sums, the engram_mem row-wise Adam, state round trip.

    pytest tests/unit/model/test_rows.py -q
"""

import dataclasses

import numpy as np
import pytest
import torch

from engram_mem.optim import make_optimizer
from engram_mem.table import as_torch
from engram_model.config import EngramConfig, load_config
from engram_model.rows import TABLE_OPTIMIZER, LocalRows, make_hasher, table_name, table_specs


def cfg_with(**engram):
    cfg, _ = load_config("tiny")
    return dataclasses.replace(cfg, engram=dataclasses.replace(cfg.engram, **engram)) if engram else cfg


def test_table_specs_follow_the_hasher():
    cfg = cfg_with()
    specs, h = table_specs(cfg), make_hasher(cfg)
    assert list(specs) == [1, 2]
    for layer, spec in specs.items():
        assert spec.name == table_name(layer) == f"engram.l{layer}"
        assert spec.rows == sum(p for order in h.table_sizes[layer] for p in order)
        assert spec.dim == cfg.engram.head_dim and spec.dtype == "float32"
    assert specs[1].seed != specs[2].seed
    assert table_specs(dataclasses.replace(cfg, engram=None)) == {}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_init_matches_table_spec(dtype):
    specs = table_specs(cfg_with(table_dtype=dtype))
    rows = LocalRows(specs)
    for layer, spec in specs.items():
        want = as_torch(spec.init_range(0, spec.rows), dtype)
        assert rows.weights[layer].dtype == want.dtype and torch.equal(rows.weights[layer], want)
        ids = np.array([5, 0, spec.rows - 1, 5])
        got = rows.get(layer, torch.from_numpy(ids).view(1, 1, 4))
        torch.testing.assert_close(got.view(4, -1), as_torch(spec.init_rows(ids), dtype).float())


def test_get_leaf_and_no_grad():
    rows = LocalRows(table_specs(cfg_with()))
    ids = torch.randint(0, 100, (2, 3, 4))
    out = rows.get(1, ids)
    assert out.shape == (2, 3, 4, 8) and out.is_leaf and out.requires_grad and len(rows._leaves) == 1
    with torch.no_grad():
        assert not rows.get(1, ids).requires_grad
    assert len(rows._leaves) == 1
    rows.zero_grad()
    assert rows._leaves == []
    with pytest.raises(ValueError):
        rows.get(1, torch.tensor([[[10**6]]]))
    with pytest.raises(ValueError):
        rows.get(7, ids)


def test_step_sums_duplicates_and_applies_row_adam():
    specs = table_specs(cfg_with())
    rows = LocalRows(specs)
    before = {L: w.clone() for L, w in rows.weights.items()}
    ids = torch.tensor([[[3, 9, 3, 4], [9, 9, 1, 0]]])              # duplicates within a batch
    out = rows.get(1, ids)
    g = torch.randn_like(out)
    out.backward(g)
    ids2 = torch.tensor([[[3, 50, 0, 0]]])                           # a second micro-batch, same layer
    out2 = rows.get(1, ids2)
    g2 = torch.randn_like(out2)
    out2.backward(g2)
    rows.step(lr=0.05, step=1)
    # expected: grads summed per unique row across both micro-batches, one Adam update
    all_ids, all_g = torch.cat([ids.flatten(), ids2.flatten()]), torch.cat([g.view(-1, 8), g2.view(-1, 8)])
    uniq, inv = torch.unique(all_ids, return_inverse=True)
    summed = torch.zeros(len(uniq), 8).index_add_(0, inv, all_g)
    opt = make_optimizer(TABLE_OPTIMIZER)
    w, st = before[1].clone(), opt.init_state(specs[1].rows, 8)
    opt.apply(w, st, uniq, summed, 0.05)
    # summation order of the two micro-batches may differ by an ulp
    torch.testing.assert_close(rows.weights[1], w, rtol=1e-6, atol=1e-7)
    assert torch.equal(rows.opt_state[1]["step"], st["step"])
    untouched = torch.ones(specs[1].rows, dtype=torch.bool)
    untouched[uniq] = False
    assert torch.equal(rows.weights[1][untouched], before[1][untouched])
    assert torch.equal(rows.weights[2], before[2]) and rows._leaves == []


def test_step_rejects_non_finite():
    from engram_mem.errors import NonFiniteGradient
    rows = LocalRows(table_specs(cfg_with()))
    out = rows.get(1, torch.tensor([[[1, 2, 3, 4]]]))
    out.backward(torch.full_like(out, float("nan")))
    w = rows.weights[1].clone()
    with pytest.raises(NonFiniteGradient):
        rows.step(0.1, 1)
    assert torch.equal(rows.weights[1], w)


def test_state_round_trip_and_read_only():
    specs = table_specs(cfg_with())
    a = LocalRows(specs)
    out = a.get(2, torch.tensor([[[1, 2, 3, 4]]]))
    out.sum().backward()
    a.step(0.1, 1)
    b = LocalRows(specs)
    b.load_state_dict(a.state_dict())
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k
    ro = LocalRows(specs, optimizer=None)
    ro.load_state_dict(a.state_dict())
    assert torch.equal(ro.weights[2], a.weights[2]) and ro.opt_state[2] == {}
    with pytest.raises(ValueError, match="mismatch"):
        b.load_state_dict({"engram.l1.weight": a.weights[1]})
