"""Generation: greedy / temperature / top-k / top-p sampling, cached decoding equal to decoding
without a cache, EOS handling, the text API.

    pytest tests/unit/test_generate.py -q
"""

import dataclasses

import pytest
import torch

from engram_model.config import load_config
from engram_model.generate import generate, generate_tokens, sample_next
from engram_model.model import EngramModel
from engram_model.rows import LocalRows, table_specs
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
    # batching prompts of equal length together changes nothing
    alone = [generate(model, tok, [p], max_new_tokens=5, stop_at_eos=False)[0] for p in prompts]
    assert outs == alone
    a = generate(model, tok, prompts, max_new_tokens=5, temperature=1.0, top_k=20, seed=3)
    b = generate(model, tok, prompts, max_new_tokens=5, temperature=1.0, top_k=20, seed=3)
    assert a == b
