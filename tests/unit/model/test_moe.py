"""MoE routing: top-k selection, mixing weights, the bias that steers selection only, the fast
path against the reference loop and a per-token computation, balancing.

    pytest tests/unit/model/test_moe.py -q
"""

import pytest
import torch

from engram_model.config import ModelConfig
from engram_model.moe import MoE


def make_moe(score_func="sigmoid", **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, n_routed_experts=6, n_activated_experts=2,
                      moe_inter_dim=8, score_func=score_func, route_scale=1.5, **kw)
    m = MoE(cfg)
    with torch.no_grad():
        m.gate.weight.normal_(std=0.5)
    return m


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_gate_topk_and_weights(score_func):
    m = make_moe(score_func)
    x = torch.randn(50, 16)
    w, idx, scores = m.gate(x)
    assert w.shape == idx.shape == (50, 2) and scores.shape == (50, 6)
    logits = x @ m.gate.weight.T
    ref = logits.sigmoid() if score_func == "sigmoid" else logits.softmax(-1)
    torch.testing.assert_close(scores, ref)
    top = ref.topk(2, dim=-1)
    assert torch.equal(idx, top.indices)
    want = top.values / top.values.sum(-1, keepdim=True) if score_func == "sigmoid" else top.values
    torch.testing.assert_close(w, want * 1.5)


def test_bias_steers_selection_not_weights():
    m = make_moe()
    x = torch.randn(40, 16)
    m.gate.bias[3] = 10.0                      # expert 3 now always wins a slot
    w, idx, scores = m.gate(x)
    assert (idx == 3).any(dim=-1).all()
    picked = scores.gather(1, idx)
    torch.testing.assert_close(w, picked / picked.sum(-1, keepdim=True) * 1.5)   # unbiased scores


def test_fast_path_equals_reference_and_per_token():
    m = make_moe()
    x = torch.randn(37, 16)
    w, idx, _ = m.gate(x)
    fast, ref = m._experts(x, w, idx), m._experts_reference(x, w, idx)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    per_token = torch.stack([sum(w[n, j] * m.experts[int(idx[n, j])](x[n]) for j in range(2)) for n in range(37)])
    torch.testing.assert_close(fast, per_token, rtol=1e-5, atol=1e-6)
    y, _ = m(x.view(1, 37, 16))
    torch.testing.assert_close(y.view(37, 16), fast + m.shared(x), rtol=1e-5, atol=1e-6)


def test_gradients_flow_to_selected_experts_and_router():
    m = make_moe(aux_loss_coef=0.01)
    m.train()
    x = torch.randn(2, 9, 16)
    y, aux = m(x)
    assert aux.item() > 0
    (y.square().sum() + aux).backward()
    _, idx, _ = m.gate(x.view(-1, 16))
    used = set(idx.flatten().tolist())
    for i, e in enumerate(m.experts):
        has = e.w1.weight.grad is not None and e.w1.weight.grad.abs().sum() > 0
        assert has == (i in used)
    assert m.gate.weight.grad.abs().sum() > 0
    assert m.gate.bias.grad is None                  # a buffer: balancing, not learning


def test_load_counts_and_bias_update():
    m = make_moe()
    m.train()
    x = torch.randn(4, 25, 16)
    with torch.no_grad():
        m.gate.weight[0] += 3 * x.mean((0, 1))       # make expert 0 popular
    with torch.no_grad():
        m(x)                                          # no grad (validation): not counted
    assert m.load.sum() == 0
    m(x)
    counts = m.load.clone()
    assert counts.sum() == 100 * 2
    m.update_bias()
    mean = counts.mean()
    for i in range(6):
        expect = 0.0 if counts[i] == mean else (-1e-3 if counts[i] > mean else 1e-3)
        assert m.gate.bias[i].item() == pytest.approx(expect)
    assert m.load.sum() == 0
    m.eval()
    m(x)
    assert m.load.sum() == 0                          # eval forwards never count


def test_padding_mask_leaves_pads_out_of_statistics():
    m = make_moe(aux_loss_coef=0.01)
    m.train()
    x = torch.randn(2, 7, 16)
    real = torch.arange(7)[None] >= torch.tensor([[0], [4]])          # row 1: 4 left-padding tokens
    y, aux = m(x, mask=real)
    load = m.load.clone()
    m.load.zero_()
    y_real, aux_real = m(x[real][None])                                # the 10 real tokens alone
    assert load.sum() == 10 * 2 and torch.equal(load, m.load)
    torch.testing.assert_close(aux, aux_real)
    torch.testing.assert_close(y[real], y_real[0])                     # outputs are per token anyway
