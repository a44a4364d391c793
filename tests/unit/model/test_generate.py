"""Generation: greedy / temperature / top-k / top-p sampling, cached decoding equal to decoding
without a cache, EOS handling, the text API, left-padded batches of mixed prompt lengths equal to
decoding each prompt alone.

    pytest tests/unit/model/test_generate.py -q
"""

import dataclasses

import pytest
import torch

from engram_model.config import load_config
from engram_model.generate import generate, generate_tokens, sample_next
from engram_model.model import EngramModel
from engram_model.rows import LocalRows, RowSource, table_specs
from engram_model.tokenizer import CompressedTokenizer


def test_greedy_and_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9, -1.0]] * 2)
    assert sample_next(logits).tolist() == [1, 1]
    assert sample_next(logits, temperature=5.0, top_k=1, generator=g).tolist() == [1, 1]
    assert sample_next(logits, temperature=1.0, top_p=1e-6, generator=g).tolist() == [1, 1]
    draws = torch.stack([sample_next(logits, 1.0, top_k=2, generator=g) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {1, 3}
    # top_p: p = [.024, .474, .064, .429, .009]. 0.8 keeps tokens 1 and 3 (the mass above 3 is .474 < .8);
    # 0.95 also keeps 2 (mass above it .903) but not 0 (mass above it .967)
    p = logits[0].softmax(-1)
    assert 0.9 < p[1] + p[3] < 0.95 < p[1] + p[3] + p[2]
    draws = torch.stack([sample_next(logits, 1.0, top_p=0.8, generator=g) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {1, 3}
    draws = torch.stack([sample_next(logits, 1.0, top_p=0.95, generator=g) for _ in range(500)])
    assert set(draws.flatten().tolist()) == {1, 2, 3}
    draws = torch.stack([sample_next(logits, 1.0, generator=g) for _ in range(2000)])
    assert set(draws.flatten().tolist()) == {0, 1, 2, 3, 4}
    a = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(7))
    b = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        sample_next(logits, temperature=-1.0)
    with pytest.raises(ValueError):
        sample_next(logits, 1.0, top_p=0.0)


@pytest.fixture(scope="module")
def model():
    cfg, _ = load_config("tiny")
    torch.manual_seed(0)
    m = EngramModel(cfg, rows=LocalRows(table_specs(cfg))).eval()
    with torch.no_grad():     # Engram starts silent; give it weights so decoding exercises it
        for block in m.blocks:
            if block.engram is not None:
                for p in block.engram.parameters():
                    p.add_(0.2 * torch.randn_like(p))
    return m


def test_cached_decoding_equals_uncached(model):
    prompt = torch.randint(0, 512, (2, 7))
    new = generate_tokens(model, prompt, max_new_tokens=12)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):                            # greedy without any cache: full forward each time
            logits, _ = model(seq)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(new, seq[:, 7:])


def test_context_limit_and_eos(model):
    prompt = torch.randint(0, 512, (1, 60))
    assert generate_tokens(model, prompt, max_new_tokens=50).shape == (1, 5)     # max_seq_len 64
    first = generate_tokens(model, prompt[:, :10], max_new_tokens=1)[0, 0].item()
    out = generate_tokens(model, prompt[:, :10], max_new_tokens=20, eos_id=first)
    assert out.tolist() == [[first]]                                              # stops once all rows are done
    with pytest.raises(ValueError):
        generate_tokens(model, torch.zeros(1, 0, dtype=torch.long), 3)


def test_text_api():
    text = "def f(x):\n    return x + 1\n" * 30
    tok = CompressedTokenizer.train([text], vocab_size=270)
    cfg, _ = load_config("tiny")
    cfg = dataclasses.replace(cfg, vocab_size=tok.vocab_size, compressed_vocab_size=tok.compressed_vocab_size,
                              pad_id=tok.compressed_pad_id)
    torch.manual_seed(0)
    model = EngramModel(cfg, rows=LocalRows(table_specs(cfg)), compress_lookup=tok.lookup)
    prompts = ["def f(x):", "return", "def f(y):"]
    outs = generate(model, tok, prompts, max_new_tokens=5, stop_at_eos=False)
    assert len(outs) == 3 and all(isinstance(o, str) for o in outs)
    # batching prompts together changes nothing
    alone = [generate(model, tok, [p], max_new_tokens=5, stop_at_eos=False)[0] for p in prompts]
    assert outs == alone
    a = generate(model, tok, prompts, max_new_tokens=5, temperature=1.0, top_k=20, seed=3)
    b = generate(model, tok, prompts, max_new_tokens=5, temperature=1.0, top_k=20, seed=3)
    assert a == b


# ---- left-padded batches of mixed prompt lengths ------------------------------------------------

def left_pad(prompts: list[torch.Tensor], pad_id: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D prompts -> (tokens [B, T0] right-aligned, n_pad [B])."""
    T0 = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), T0), pad_id, dtype=torch.int64)
    for b, p in enumerate(prompts):
        tokens[b, T0 - len(p):] = p
    return tokens, torch.tensor([T0 - len(p) for p in prompts])


def mixed_prompts(lengths=(9, 3, 1, 6), seed=1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=g) for n in lengths]


def test_mixed_lengths_equal_one_by_one(model):
    assert model.cfg.engram_layers, "this test is meant to exercise Engram layers"
    prompts = mixed_prompts()
    tokens, n_pad = left_pad(prompts)
    with torch.no_grad():
        padded, _ = model(tokens, n_pad=n_pad)                                      # [B, T0, V]
        for b, p in enumerate(prompts):
            alone, _ = model(p[None])
            # every real position, the last of which gives the first generated token
            torch.testing.assert_close(padded[b, n_pad[b]:], alone[0], rtol=0, atol=1e-5)
    new = generate_tokens(model, tokens, max_new_tokens=15, n_pad=n_pad)
    assert new.shape == (4, 15)
    for b, p in enumerate(prompts):
        assert torch.equal(new[b], generate_tokens(model, p[None], max_new_tokens=15)[0])


def test_mixed_lengths_sampling(model):
    prompts = mixed_prompts(seed=2)
    tokens, n_pad = left_pad(prompts)
    draw = lambda seed, **kw: generate_tokens(model, tokens, 10, temperature=0.9, n_pad=n_pad,
                                              generator=torch.Generator().manual_seed(seed), **kw)
    a, b = draw(5, top_k=3), draw(5, top_k=3)
    assert torch.equal(a, b)                                                  # a seed makes it reproducible
    # Valid: each drawn token is in the top 3 of the logits that row computes alone on its own prefix.
    with torch.no_grad():
        for row, p in enumerate(prompts):
            logits, _ = model(torch.cat([p, a[row]])[None])                      # [1, len + 10, V]
            top3 = logits[0, len(p) - 1:-1].topk(3, dim=-1).indices               # [10, 3]
            assert (top3 == a[row, :, None]).any(-1).all()
    # top_k=1 leaves nothing to chance: equal to greedy decoding of each prompt alone
    one = draw(6, top_k=1)
    for row, p in enumerate(prompts):
        assert torch.equal(one[row], generate_tokens(model, p[None], 10)[0])


def test_padded_kv_cache_decode_equals_padded_full_forward(model):
    prompts = mixed_prompts(lengths=(12, 4, 9))
    tokens, n_pad = left_pad(prompts)                                          # n_pad [0, 8, 3]
    real = torch.arange(12)[None] >= n_pad[:, None]                            # [B, 12]
    with torch.no_grad():
        full, _ = model(tokens, n_pad=n_pad)
        # chunks whose boundaries fall inside the padding too ([2, ...], [5, ...])
        for chunks in ([12], [1] * 12, [2, 10], [5, 1, 6]):
            cache, outs, t = model.new_cache(3, max_len=12), [], 0
            for i, n in enumerate(chunks):
                logits, _ = model(tokens[:, t:t + n], cache=cache, n_pad=n_pad if i == 0 else None)
                outs.append(logits)
                t += n
            got = torch.cat(outs, 1)
            assert torch.isfinite(got).all()                       # padding positions too: no NaN anywhere
            torch.testing.assert_close(got[real], full[real], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="first call"):
        model(tokens[:, :1], cache=cache, n_pad=n_pad)
    with pytest.raises(ValueError, match="n_pad"):
        model(tokens, n_pad=torch.tensor([0, -1, 2]))
    with pytest.raises(ValueError, match="real token"):
        generate_tokens(model, tokens, 3, n_pad=torch.tensor([0, 12, 3]))


class RecordingRows(RowSource):
    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def prefetch(self, layer, row_ids):
        self.calls.append(("prefetch", layer, row_ids.clone()))

    def get(self, layer, row_ids):
        self.calls.append(("get", layer, row_ids.clone()))
        return self.inner.get(layer, row_ids)

    def step(self, lr, step):
        self.inner.step(lr, step)

    def zero_grad(self):
        self.inner.zero_grad()


def test_padded_row_source_calls(model):
    """Padding keeps the call pattern, and real positions ask for the rows they would alone."""
    prompts = mixed_prompts(lengths=(6, 2))
    tokens, n_pad = left_pad(prompts)
    rec = RecordingRows(model.rows)
    model.rows = rec
    try:
        with torch.no_grad():
            model(tokens, n_pad=n_pad)
            padded = dict((layer, ids) for kind, layer, ids in rec.calls if kind == "get")
            assert [(c[0], c[1]) for c in rec.calls] == [("prefetch", 1), ("prefetch", 2), ("get", 1), ("get", 2)]
            for b, p in enumerate(prompts):
                rec.calls.clear()
                model(p[None])
                for kind, layer, ids in rec.calls:
                    assert torch.equal(padded[layer][b, n_pad[b]:], ids[0])
    finally:
        model.rows = rec.inner


def test_text_api_mixed_lengths(monkeypatch):
    import engram_model.generate as gen

    text = "def f(x):\n    return x + 1\n" * 30
    tok = CompressedTokenizer.train([text], vocab_size=270)
    cfg, _ = load_config("tiny")
    cfg = dataclasses.replace(cfg, vocab_size=tok.vocab_size, compressed_vocab_size=tok.compressed_vocab_size,
                              pad_id=tok.compressed_pad_id)
    torch.manual_seed(0)
    model = EngramModel(cfg, rows=LocalRows(table_specs(cfg)), compress_lookup=tok.lookup)
    with torch.no_grad():
        for block in model.blocks:
            if block.engram is not None:
                for p in block.engram.parameters():
                    p.add_(0.2 * torch.randn_like(p))
    prompts = ["def f(x):\n    return", "x", "def f(x):", " + 1\n"]
    assert len({len(tok.encode(p)) for p in prompts}) == 4
    calls = []
    real_generate_tokens = gen.generate_tokens
    monkeypatch.setattr(gen, "generate_tokens", lambda *a, **kw: calls.append(a[1].shape) or real_generate_tokens(*a, **kw))
    outs = generate(model, tok, prompts, max_new_tokens=8, stop_at_eos=False)
    assert len(calls) == 1 and calls[0][0] == 4                                # one batch of all four
    calls.clear()
    assert outs == [generate(model, tok, [p], max_new_tokens=8, stop_at_eos=False)[0] for p in prompts]
    # Near the context limit (64) a long prompt gets fewer tokens; it must get as many as alone.
    long = "def f(x):\n    return x + 1\n" * 4
    n_long = len(tok.encode(long)) + 1
    assert 64 - 8 < n_long <= 64, n_long
    outs = generate(model, tok, [long, "x"], max_new_tokens=8, stop_at_eos=False)
    assert outs == [generate(model, tok, [p], max_new_tokens=8, stop_at_eos=False)[0] for p in [long, "x"]]
    a = generate(model, tok, prompts, max_new_tokens=8, temperature=1.0, top_k=20, seed=3)
    assert a == generate(model, tok, prompts, max_new_tokens=8, temperature=1.0, top_k=20, seed=3)
    assert all(isinstance(t, str) for t in a) and len(a) == 4
