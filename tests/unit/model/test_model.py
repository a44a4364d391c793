"""EngramModel: KV-cache decode equals the full forward, causality end to end, the RowSource call
pattern (prefetch all layers after hashing, then get inside each Engram layer), configs.

    pytest tests/unit/model/test_model.py -q
"""

import dataclasses

import pytest
import torch

from engram_model.config import EngramConfig, ModelConfig, TrainConfig, load_config
from engram_model.model import EngramModel, count_params
from engram_model.rows import LocalRows, RowSource, table_specs


def tiny_cfg(**kw) -> ModelConfig:
    cfg, _ = load_config("tiny")
    return dataclasses.replace(cfg, **kw)


def make_model(cfg=None, seed=0):
    cfg = cfg or tiny_cfg()
    torch.manual_seed(seed)
    rows = LocalRows(table_specs(cfg)) if cfg.engram is not None else None
    model = EngramModel(cfg, rows=rows).eval()
    randomize_engram(model)
    return model


def randomize_engram(model):
    """Engram starts silent (zero value projection and conv); give it weights so tests see it."""
    with torch.no_grad():
        for block in model.blocks:
            if block.engram is not None:
                for p in block.engram.parameters():
                    p.add_(0.2 * torch.randn_like(p))


def test_engram_starts_silent():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    with_engram = EngramModel(cfg, rows=LocalRows(table_specs(cfg)))
    block = with_engram.blocks[1]
    h = torch.randn(2, 5, cfg.dim)
    out, _ = block.engram(h, torch.randn(2, 5, cfg.engram.heads_per_layer, cfg.engram.head_dim))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("variant", ["engram", "moe", "gqa_dense_first"])
def test_kv_cache_decode_equals_full_forward(variant):
    cfg = tiny_cfg()
    if variant == "moe":
        cfg = tiny_cfg(engram=None)
    elif variant == "gqa_dense_first":
        cfg = tiny_cfg(n_heads=4, n_kv_heads=2, n_dense_layers=1, dense_inter_dim=48,
                       engram=EngramConfig(layer_ids=[0, 2], max_ngram_size=4, n_head_per_ngram=2, head_dim=4,
                                           engram_vocab_size=[53, 59, 61]))
    model = make_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (3, 40))
    with torch.no_grad():
        full, _ = model(tokens)
        for chunks in ([40], [1] * 40, [13, 1, 1, 1, 24], [2, 38]):
            cache, outs, t = model.new_cache(3, max_len=40), [], 0
            for n in chunks:
                logits, _ = model(tokens[:, t:t + n], cache=cache)
                outs.append(logits)
                t += n
            assert cache.pos == 40
            torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-5)


def test_causal_end_to_end():
    model = make_model()
    tokens = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        ref, _ = model(tokens)
        for t0 in (0, 11, 29):
            changed = tokens.clone()
            changed[:, t0:] = torch.randint(0, 512, changed[:, t0:].shape)
            out, _ = model(changed)
            torch.testing.assert_close(out[:, :t0], ref[:, :t0], rtol=0, atol=0)
            assert (out[:, t0] - ref[:, t0]).abs().max() > 0


class RecordingRows(RowSource):
    """Wraps LocalRows and records every call."""

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


def test_row_source_call_pattern():
    cfg = tiny_cfg()
    rec = RecordingRows(LocalRows(table_specs(cfg)))
    model = EngramModel(cfg, rows=rec)
    randomize_engram(model)
    tokens = torch.randint(0, 512, (2, 9))
    model(tokens)
    assert [(c[0], c[1]) for c in rec.calls] == [("prefetch", 1), ("prefetch", 2), ("get", 1), ("get", 2)]
    K = cfg.engram.heads_per_layer
    expected = model.hasher.row_ids(model.compress_lookup[tokens])
    for kind, layer, ids in rec.calls:
        assert ids.shape == (2, 9, K) and ids.dtype == torch.int64
        assert torch.equal(ids, expected[layer])
    # decode: the same pattern, one position at a time, ids from the previous max_n-1 tokens
    rec.calls.clear()
    with torch.no_grad():
        cache = model.new_cache(2)
        model(tokens[:, :5], cache=cache)
        model(tokens[:, 5:6], cache=cache)
    kinds = [(c[0], c[1]) for c in rec.calls]
    assert kinds == [("prefetch", 1), ("prefetch", 2), ("get", 1), ("get", 2)] * 2
    assert torch.equal(rec.calls[-1][2], expected[2][:, 5:6])


class AheadRows(RecordingRows):
    """A source that prefetches: EngramModel.prefetch hashes for it."""

    prefetch_enabled = True

    def prefetch_ahead(self, layer, row_ids):
        self.calls.append(("ahead", layer, row_ids.clone()))


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_prefetch_ahead_posts_the_row_ids_the_later_forward_reads(chunk):
    """A left-padded prompt fed in chunks through a cache: for every chunk, the ids model.prefetch
    posts beforehand (knowing the tokens before the chunk and the padding) equal the ids that
    chunk's forward asks for, layer by layer; a source that does not prefetch gets no call."""
    cfg = tiny_cfg()
    rec = AheadRows(LocalRows(table_specs(cfg)))
    model = EngramModel(cfg, rows=rec)
    randomize_engram(model)
    prompt = torch.randint(0, 512, (3, 11))
    n_pad = torch.tensor([0, 4, 9])
    layers = cfg.engram_layers
    with torch.no_grad():
        cache = model.new_cache(3)
        for start in range(0, prompt.shape[1], chunk):
            end = min(prompt.shape[1], start + chunk)
            rec.calls.clear()
            model.prefetch(prompt[:, start:end], n_pad=n_pad, before=prompt[:, :start] if start else None)
            model(prompt[:, start:end], cache=cache, n_pad=n_pad if start == 0 else None)
            ahead = {c[1]: c[2] for c in rec.calls if c[0] == "ahead"}
            fwd = {c[1]: c[2] for c in rec.calls if c[0] == "prefetch"}
            assert sorted(ahead) == sorted(fwd) == layers
            for layer in layers:
                assert ahead[layer].shape == (3, end - start, cfg.engram.heads_per_layer)
                assert torch.equal(ahead[layer], fwd[layer]), (start, layer)
    # Without padding, and a whole batch known ahead.
    rec.calls.clear()
    model.prefetch(prompt)
    model(prompt)
    assert [torch.equal(a[2], b[2]) for a, b in zip(rec.calls[:2], rec.calls[2:4])] == [True, True]
    plain = RecordingRows(LocalRows(table_specs(cfg)))
    model.rows = plain
    model.prefetch(prompt)
    assert plain.calls == []


def test_model_needs_row_source_and_lookup():
    cfg = tiny_cfg()
    with pytest.raises(ValueError, match="RowSource"):
        EngramModel(cfg)(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="compress_lookup"):
        EngramModel(tiny_cfg(compressed_vocab_size=100))
    with pytest.raises(ValueError, match="max_seq_len"):
        make_model()(torch.zeros(1, 65, dtype=torch.long))


def test_compression_feeds_hash():
    # Tokens with the same compressed id give the same rows.
    cfg = tiny_cfg(compressed_vocab_size=256)
    lookup = torch.arange(512) % 256
    model = EngramModel(cfg, rows=LocalRows(table_specs(cfg)), compress_lookup=lookup)
    a = model.row_ids(torch.tensor([[1, 2, 3]]))
    b = model.row_ids(torch.tensor([[257, 258, 259]]))
    assert all(torch.equal(a[L], b[L]) for L in a)


def test_config_validation():
    with pytest.raises(ValueError, match="n_heads"):
        ModelConfig(dim=30, n_heads=4)
    with pytest.raises(ValueError, match="layer_ids"):
        tiny_cfg(n_layers=2)                          # engram at layer 2 of a 2-layer model
    with pytest.raises(ValueError, match="engram_vocab_size"):
        EngramConfig(max_ngram_size=3, engram_vocab_size=[100])
    with pytest.raises(ValueError, match="hc_mult"):
        EngramConfig(layer_ids=[1], hc_mult=0)
    with pytest.raises(ValueError, match="table_block"):
        EngramConfig(layer_ids=[1], head_dim=32, table_dtype="fp8_e4m3", table_block=24)
    with pytest.raises(ValueError, match="table_block"):
        EngramConfig(layer_ids=[1], head_dim=32, table_dtype="float32", table_block=32)
    with pytest.raises(ValueError, match="dtype"):
        TrainConfig(dtype="fp16")
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({"dimm": 3})
    for name in ("tiny", "small", "bench_engram", "bench_moe"):
        m, t = load_config(name)
        assert t.seq_len <= m.max_seq_len


def test_count_params():
    cfg = tiny_cfg()
    counts = count_params(cfg)
    model = make_model(cfg)
    assert counts["dense"] == sum(p.numel() for p in model.parameters())
    assert counts["engram_tables"] == sum(s.rows * s.dim for s in table_specs(cfg).values())
    assert counts["total"] == counts["dense"] + counts["engram_tables"]
    assert counts["activated"] < counts["dense"]
