"""The Engram module: gate and short-conv shapes, the gate formula, causality, and state carry-over.

    pytest tests/unit/model/test_engram.py -q
"""

import math

import pytest
import torch

from engram_model.config import EngramConfig
from engram_model.engram import Engram, ShortConv

D, K, d = 16, 4, 8


def make_engram(hc_mult=1, max_n=3):
    torch.manual_seed(0)
    cfg = EngramConfig(layer_ids=[1], max_ngram_size=max_n, n_head_per_ngram=2, head_dim=d,
                       engram_vocab_size=[101] * (max_n - 1), hc_mult=hc_mult)
    e = Engram(D, cfg)
    with torch.no_grad():   # non-trivial norms and biases, so the tests see every term
        for p in e.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return e, cfg


@pytest.mark.parametrize("hc_mult", [1, 3])
def test_shapes(hc_mult):
    e, cfg = make_engram(hc_mult)
    B, T = 2, 11
    hidden = torch.randn(B, T, D) if hc_mult == 1 else torch.randn(B, T, hc_mult, D)
    memory = torch.randn(B, T, cfg.heads_per_layer, d)
    out, state = e(hidden, memory)
    assert out.shape == hidden.shape
    assert state.shape == (B, e.short_conv.context, hc_mult * D) and e.short_conv.context == 3 * 3
    h4 = hidden if hc_mult > 1 else hidden.unsqueeze(2)
    g = e.gates(h4, memory.flatten(-2))
    assert g.shape == (B, T, hc_mult, 1) and ((g > 0) & (g < 1)).all()
    with pytest.raises(AssertionError):
        e(hidden, torch.randn(B, T, cfg.heads_per_layer, d + 1))


def test_gate_formula():
    e, cfg = make_engram()
    h, mem = torch.randn(2, 5, D), torch.randn(2, 5, K, d)
    emb = mem.flatten(-2)
    key = e.key_norms[0](e.key_projs[0](emb))
    q = e.query_norms[0](h)
    s = (key * q).sum(-1) / math.sqrt(D)
    want = torch.sigmoid(torch.sign(s) * torch.sqrt(s.abs().clamp_min(1e-6)))
    got = e.gates(h.unsqueeze(2), emb)[:, :, 0, 0]
    torch.testing.assert_close(got, want)
    # and the output is gated value + ShortConv(gated value)
    v = want.unsqueeze(-1) * e.value_proj(emb)
    conv, _ = e.short_conv(v.unsqueeze(2))
    torch.testing.assert_close(e(h, mem)[0], v + conv.squeeze(2))


def test_short_conv_causal_and_dilated():
    torch.manual_seed(0)
    conv = ShortConv(D, kernel_size=4, dilation=3)
    x = torch.randn(1, 30, 1, D)
    y, _ = conv(x)
    t0 = 12
    x2 = x.clone()
    x2[:, t0] += 5.0
    y2, _ = conv(x2)
    changed = (y2 - y).abs().amax(dim=(0, 2, 3)) > 1e-6          # [T]
    # the output at t depends on inputs t, t-3, t-6, t-9 only
    assert changed.nonzero().flatten().tolist() == [t0, t0 + 3, t0 + 6, t0 + 9]


def test_engram_causal():
    e, _ = make_engram()
    h, mem = torch.randn(2, 20, D), torch.randn(2, 20, K, d)
    out, _ = e(h, mem)
    for t0 in (0, 7, 19):
        h2, mem2 = h.clone(), mem.clone()
        h2[:, t0:] += torch.randn_like(h2[:, t0:])
        mem2[:, t0:] += torch.randn_like(mem2[:, t0:])
        out2, _ = e(h2, mem2)
        torch.testing.assert_close(out2[:, :t0], out[:, :t0], rtol=0, atol=0)
        assert (out2[:, t0] - out[:, t0]).abs().max() > 1e-4


@pytest.mark.parametrize("chunks", [[20], [1] * 20, [7, 1, 1, 5, 6], [3, 17]])
def test_state_carries_over(chunks):
    e, _ = make_engram()
    h, mem = torch.randn(2, 20, D), torch.randn(2, 20, K, d)
    full, _ = e(h, mem)
    outs, state, t = [], None, 0
    for n in chunks:
        o, state = e(h[:, t:t + n], mem[:, t:t + n], state)
        outs.append(o)
        t += n
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-6)


def test_gradients_reach_memory_and_weights():
    e, _ = make_engram()
    h = torch.randn(2, 6, D, requires_grad=True)
    mem = torch.randn(2, 6, K, d, requires_grad=True)
    out, _ = e(h, mem)
    out.square().sum().backward()
    assert mem.grad.abs().sum() > 0 and h.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in e.parameters())
