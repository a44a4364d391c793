import numpy as np
import pytest
import torch

from engram_mem.errors import InvalidArgument
from engram_mem.optim import OptimizerSpec, make_optimizer


def _reference(name, w0, grads_per_step, lr):
    """torch.optim on each row as its own parameter, stepped only when the row got a gradient
    (row-wise state: for Adam each row counts its own steps for bias correction)."""
    rows = [torch.nn.Parameter(w0[i].clone()) for i in range(w0.shape[0])]
    make = {"sgd": lambda p: torch.optim.SGD([p], lr=lr),
            "adagrad": lambda p: torch.optim.Adagrad([p], lr=lr, eps=1e-8),
            "adam": lambda p: torch.optim.Adam([p], lr=lr, eps=1e-8)}[name]
    opts = [make(p) for p in rows]
    for idx, g in grads_per_step:
        for j, i in enumerate(idx.tolist()):
            rows[i].grad = g[j].clone()
            opts[i].step()
    return torch.stack([p.detach() for p in rows])


@pytest.mark.parametrize("name", ["sgd", "adagrad", "adam"])
def test_row_optimizers_match_torch(name):
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(20, 6, generator=gen)
    steps = [(torch.tensor(sorted(set(torch.randint(0, 20, (7,), generator=gen).tolist()))), None) for _ in range(5)]
    steps = [(i, torch.randn(i.numel(), 6, generator=gen)) for i, _ in steps]
    opt = make_optimizer({"name": name})
    w = w0.clone()
    state = opt.init_state(20, 6)
    for idx, g in steps:
        opt.apply(w, state, idx, g, lr=0.05)
    ref = _reference(name, w0, steps, 0.05)
    assert torch.allclose(w, ref, atol=1e-5), (w - ref).abs().max()


def test_untouched_rows_and_state_do_not_change():
    opt = make_optimizer({"name": "adam"})
    w = torch.ones(10, 4)
    state = opt.init_state(10, 4)
    opt.apply(w, state, torch.tensor([2, 5]), torch.ones(2, 4), lr=0.1)
    untouched = [i for i in range(10) if i not in (2, 5)]
    assert torch.all(w[untouched] == 1) and torch.all(state["step"][untouched] == 0)
    assert torch.all(state["step"][[2, 5]] == 1) and torch.all(w[[2, 5]] < 1)


def test_bfloat16_weights_update_in_float32():
    opt = make_optimizer({"name": "sgd"})
    w = torch.zeros(4, 8, dtype=torch.bfloat16)
    opt.apply(w, {}, torch.tensor([1]), torch.full((1, 8), 2.0), lr=0.25)
    assert w.dtype == torch.bfloat16 and torch.all(w[1] == -0.5) and torch.all(w[0] == 0)


def test_bad_optimizer_specs():
    with pytest.raises(InvalidArgument, match="name"):
        OptimizerSpec(name="lion")
    with pytest.raises(InvalidArgument, match="betas"):
        OptimizerSpec(name="adam", betas=(1.0, 0.9))
    with pytest.raises(InvalidArgument, match="lr"):
        OptimizerSpec(lr=float("nan"))


@pytest.mark.parametrize("name", ["sgd", "adagrad", "adam"])
def test_update_is_bitwise_independent_of_blocking_and_of_other_rows(name, monkeypatch):
    """A row's update is the same bits whether the rows go through in one block or many, and
    whether the other rows are in the same call: what lets a shard holding a slice of a table
    match an in-process table bit for bit."""
    import engram_mem.optim as optim

    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(300, 5, generator=gen)
    steps = [torch.randperm(300, generator=gen)[:120].sort().values for _ in range(6)]
    grads = [torch.randn(120, 5, generator=gen) for _ in steps]

    def run(chunk_elems, split):
        monkeypatch.setattr(optim, "CHUNK_ELEMS", chunk_elems)
        opt = make_optimizer({"name": name, "weight_decay": 0.01})
        w, state = w0.clone(), opt.init_state(300, 5)
        for idx, g in zip(steps, grads):
            low = idx < split  # two calls, as two shards would get them
            for sel in (low, ~low):
                opt.apply(w, state, idx[sel], g[sel], lr=0.03)
        return w, state

    w_ref, s_ref = run(1 << 30, 300)
    for chunk, split in ((5, 300), (35, 150), (1 << 30, 77)):
        w, s = run(chunk, split)
        assert torch.equal(w, w_ref), (chunk, split)
        assert all(torch.equal(s[k], s_ref[k]) for k in s_ref)
    assert not torch.equal(w_ref, w0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_all_finite_finds_every_kind_of_non_finite_value(dtype):
    from engram_mem.validate import all_finite

    big = torch.finfo(dtype).max
    x = torch.full((37, 5), big, dtype=dtype)
    assert all_finite(x) and all_finite(-x) and all_finite(x[:, ::2]) and all_finite(x[:0])
    if dtype != torch.bfloat16:
        assert all_finite(x.numpy())
    for bad in (float("nan"), float("inf"), float("-inf")):
        for at in ((0, 0), (36, 4), (17, 2)):
            y = x.clone()
            y[at] = bad
            assert not all_finite(y), (bad, at)
            assert not all_finite(y[:, at[1]:at[1] + 1]), (bad, at)  # a strided view
            if dtype != torch.bfloat16:
                assert not all_finite(y.numpy())


def test_a_non_finite_update_names_its_row_and_applies_nothing(monkeypatch):
    """fp16 rows, the overflow in the last of several blocks: refused, the row named, nothing written."""
    from engram_mem import optim
    from engram_mem.errors import NonFiniteUpdate

    monkeypatch.setattr(optim, "CHUNK_ELEMS", 4 * 3)  # 3 rows a block
    opt = make_optimizer({"name": "adam"})
    w = torch.zeros(10, 4, dtype=torch.float16)
    w[9] = -60000.0
    state = opt.init_state(10, 4)
    before = w.clone(), {k: v.clone() for k, v in state.items()}
    idx = torch.tensor([0, 2, 3, 5, 7, 9])
    grad = torch.ones(6, 4)
    with pytest.raises(NonFiniteUpdate, match="row 9 .*float16"):
        opt.apply(w, state, idx, grad, lr=1e4)   # Adam's first step is lr: row 9 to -70000, past fp16's -65504
    assert torch.equal(w, before[0]) and all(torch.equal(state[k], before[1][k]) for k in state)
    opt.apply(w, state, idx, grad, lr=1e3)      # in range: applied to every row
    assert bool((w[idx] != 0).all()) and int(state["step"][idx].min()) == 1
