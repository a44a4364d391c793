"""engram-serve over real HTTP on loopback: batching, equality with direct generation, bad input."""

import concurrent.futures
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from engram_model.config import load_config
from engram_model.generate import generate
from engram_model.model import EngramModel
from engram_model.rows import LocalRows, table_specs
from engram_model.serve import Batcher, make_http_server
from engram_model.tokenizer import CompressedTokenizer


@pytest.fixture(scope="module")
def server():
    text = "".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(200))
    tok = CompressedTokenizer.train([text], vocab_size=300)
    m, _ = load_config("tiny")
    cfg = m.for_tokenizer(tok)
    torch.manual_seed(0)
    model = EngramModel(cfg, rows=LocalRows(table_specs(cfg), optimizer=None), compress_lookup=tok.lookup).eval()
    batcher = Batcher(model, tok, max_batch=8, window_ms=200)
    httpd = make_http_server(batcher, "127.0.0.1", 0, max_new_tokens_limit=32)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", model, tok, batcher
    httpd.shutdown()
    httpd.server_close()
    batcher.close()


def _post(url, doc):
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    req = urllib.request.Request(url + "/generate", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_concurrent_requests_are_batched_and_match_direct_generation(server):
    url, model, tok, batcher = server
    prompts = ["def f1(x):", "def f2(x):", "def f3(x):", "def f4(x):"]  # equal token lengths
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda p: _post(url, {"prompt": p, "max_new_tokens": 8}), prompts))
    assert all(code == 200 for code, _ in replies)
    assert max(r["batch_size"] for _, r in replies) > 1
    want = generate(model, tok, prompts, max_new_tokens=8)
    assert [r["completion"] for _, r in replies] == want
    with urllib.request.urlopen(url + "/stats", timeout=10) as r:
        stats = json.loads(r.read())
    assert stats["requests"] >= 4 and stats["mean_batch"] > 1


@pytest.mark.parametrize("doc, words", [
    (b"not json", "not JSON"), ({"max_new_tokens": 4}, "'prompt'"), ({"prompt": "x", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature"), ({"prompt": "x", "top_p": 2.0}, "top_p"),
    ({"prompt": "x", "colour": 1}, "colour"), ({"prompt": "x", "top_k": "5"}, "top_k"),
])
def test_bad_requests_get_400_naming_the_field_and_the_server_keeps_serving(server, doc, words):
    url, *_ = server
    code, body = _post(url, doc)
    assert code == 400 and words in body["error"]
    code, body = _post(url, {"prompt": "def f5(x):", "max_new_tokens": 2})
    assert code == 200 and isinstance(body["completion"], str)
