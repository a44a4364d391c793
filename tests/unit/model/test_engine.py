"""Continuous batching: requests that join and leave a running decode batch get, greedy, exactly the
tokens each gets decoded alone (prefilled whole or in chunks between decode steps); seeded sampling does not depend on the batch; stop strings, limits,
cancellation and a failing model.

    pytest tests/unit/model/test_engine.py -q
"""

import threading

import pytest
import torch

from engram_model.config import load_config
from engram_model.engine import Engine, EngineConfig, PromptTooLong, SamplingParams
from engram_model.generate import generate_tokens
from engram_model.model import EngramModel
from engram_model.rows import LocalRows, table_specs
from engram_model.tokenizer import CompressedTokenizer


@pytest.fixture(scope="module")
def model_tok():
    text = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(300))
    tok = CompressedTokenizer.train([text], vocab_size=300)
    m, _ = load_config("tiny")
    cfg = m.for_tokenizer(tok)
    torch.manual_seed(0)
    model = EngramModel(cfg, rows=LocalRows(table_specs(cfg), optimizer=None), compress_lookup=tok.lookup).eval()
    with torch.no_grad():   # Engram starts silent; make it matter, so that its rows and conv state are tested
        for block in model.blocks:
            if block.engram is not None:
                for p in block.engram.parameters():
                    p.add_(0.2 * torch.randn_like(p))
    return model, tok


def alone(model, tok, prompt, n):
    ids = torch.tensor([[tok.eos_id] + tok.encode(prompt)])
    return generate_tokens(model, ids, n).squeeze(0).tolist()


PROMPTS = ["def f1(x):", "x", "def f22(x):\n    return x * 22 +", " + 1\n", "def f3", "return x * 9 + 2\n" * 3]
BUDGETS = [12, 5, 20, 9, 15, 7]


@pytest.mark.parametrize("chunk", [128, 3])     # whole prompts, or prefills spread over turns
def test_join_and_leave_give_the_tokens_of_decoding_alone(model_tok, chunk):
    model, tok = model_tok
    engine = Engine(model, tok, EngineConfig(max_batch=4, prefill_chunk=chunk))
    try:
        seqs, lock, events = [], threading.Lock(), {}
        first_two_started = threading.Event()

        def sink(i):
            def on_event(delta, finish):
                with lock:
                    events.setdefault(i, []).append((delta, finish))
                    if i == 0 and len(seqs[0].out_ids) >= 3:
                        first_two_started.set()
            return on_event

        params = lambda i: SamplingParams(max_tokens=BUDGETS[i], stop_at_eos=False)
        for i in range(2):
            seqs.append(engine.submit(PROMPTS[i], params(i), sink(i)))
        assert first_two_started.wait(60)
        for i in range(2, len(PROMPTS)):                 # join a batch that is already decoding
            seqs.append(engine.submit(PROMPTS[i], params(i), sink(i)))
        deadline = threading.Event()
        while not all(s.done for s in seqs) and not deadline.wait(0.05):
            pass
        for i, s in enumerate(seqs):
            assert s.finish_reason == "length"
            assert s.out_ids == alone(model, tok, PROMPTS[i], BUDGETS[i]), f"prompt {i}"
            assert "".join(d for d, _ in events[i]) == tok.decode(s.out_ids)
            assert [f for _, f in events[i]][-1] == "length"
        st = engine.summary()
        # rows joined a running batch (more than max_batch requests overall, batches of > 1 rows)
        assert st["prefills"] >= 2 and st["mean_batch"] > 1 and st["finished"] == len(PROMPTS)
    finally:
        engine.close()


def test_static_policy_and_generate_helper_agree(model_tok):
    model, tok = model_tok
    p = SamplingParams(max_tokens=8, stop_at_eos=False)
    outs = {}
    for policy in ("continuous", "static"):
        engine = Engine(model, tok, EngineConfig(max_batch=3, policy=policy))
        try:
            outs[policy] = engine.generate(PROMPTS, p)
        finally:
            engine.close()
    want = [tok.decode(alone(model, tok, q, 8)) for q in PROMPTS]
    assert outs["continuous"] == outs["static"] == want


def test_seeded_sampling_does_not_depend_on_the_batch(model_tok):
    model, tok = model_tok
    engine = Engine(model, tok, EngineConfig(max_batch=8))
    try:
        p = SamplingParams(max_tokens=10, temperature=1.0, top_k=20, seed=7, stop_at_eos=False)
        one = engine.generate([PROMPTS[0]], p)[0]
        many = engine.generate(PROMPTS, p)
        assert many[0] == one
        assert engine.generate(PROMPTS, p) == many
    finally:
        engine.close()


def test_stop_strings_limits_and_errors(model_tok):
    model, tok = model_tok
    engine = Engine(model, tok, EngineConfig(max_batch=4))
    try:
        full = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=16, stop_at_eos=False))[0]
        assert len(full) > 3
        stop = full[2:4]
        cut = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=16, stop=[stop], stop_at_eos=False))[0]
        assert cut == full[:full.find(stop)] and stop not in cut
        with pytest.raises(PromptTooLong, match="context"):
            engine.submit("x" * 10_000, SamplingParams(), lambda d, f: None)
        with pytest.raises(ValueError, match="top_p"):
            SamplingParams(top_p=0)
        # A prompt near the context limit gets only as many tokens as fit ("length").
        long = (tok.encode(PROMPTS[2]) * 10)[:40]                  # token ids: 41 with the start token
        got = []
        seq = engine.submit(long, SamplingParams(max_tokens=50, stop_at_eos=False), lambda d, f: got.append(f))
        while not got or got[-1] is None:
            threading.Event().wait(0.02)
        assert got[-1] == "length" and len(seq.out_ids) == model.cfg.max_seq_len - 41 + 1
        # A model failure fails the requests in flight; the engine keeps serving.
        real_forward = model.forward
        model.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
        try:
            with pytest.raises(RuntimeError, match="boom"):
                engine.generate([PROMPTS[1]], SamplingParams(max_tokens=4))
        finally:
            model.forward = real_forward
        assert engine.generate([PROMPTS[1]], SamplingParams(max_tokens=4, stop_at_eos=False)) == \
            [tok.decode(alone(model, tok, PROMPTS[1], 4))]
    finally:
        engine.close()
