"""engram-serve on Ray Serve: two replicas on the local Ray cluster serve one model from one memory cluster.

Each replica attaches to the memory cluster as a read-only inference worker; the openai client's
requests are spread over both (system_fingerprint names the replica), and every answer equals
greedy decoding in this process with the same tables held locally.

    pytest tests/integration/test_serve_replicas.py -q
"""

import concurrent.futures
import json
import socket
import time
import urllib.request

import openai
import pytest
import torch

import engram_mem
from engram_model.checkpoint import save_checkpoint
from engram_model.cluster_rows import ClusterRows
from engram_model.config import load_config
from engram_model.generate import generate
from engram_model.model import EngramModel
from engram_model.rows import LocalRows, table_specs
from engram_model.tokenizer import CompressedTokenizer


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory):
    from ray import serve

    from engram_model.deployment import ServeSpec, deploy

    text = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(300))
    tok = CompressedTokenizer.train([text], vocab_size=300)
    m, _ = load_config("tiny")
    cfg = m.for_tokenizer(tok)
    torch.manual_seed(0)
    rows = LocalRows(table_specs(cfg), optimizer=None)
    model = EngramModel(cfg, rows=rows, compress_lookup=tok.lookup).eval()
    with torch.no_grad():   # make the Engram branch and its rows matter (a fresh model's branch is silent)
        for block in model.blocks:
            if block.engram is not None:
                for p in block.engram.parameters():
                    p.add_(0.2 * torch.randn_like(p))
        for w in rows.weights.values():
            w.add_(torch.randn_like(w))
    ckpt = save_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt", model, rows, tokenizer=tok)
    mem = engram_mem.connect(shards=2, name="serve-test")
    try:
        writer = ClusterRows(mem, table_specs(cfg), train=False, node_local=False)
        writer.load_state_dict(rows.state_dict())
        writer.close()
        gcs = ray_local.get_runtime_context().gcs_address
        for attempt in range(3):
            # A free port found here can be taken by another process (a shard, a Ray worker) before
            # Serve's proxy binds it; then the proxy fails to bind: try another port.
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            spec = ServeSpec(checkpoint=str(ckpt), memory_address=gcs, memory_name="serve-test", model_name="tiny",
                             replicas=2, num_cpus=0.5, max_batch=4, port=port, cache_mb=1)
            try:
                url = deploy(spec)
                break
            except Exception as e:  # noqa: BLE001 - Ray raises RayTaskError(RuntimeError) for this
                if "Failed to bind" not in str(e) or attempt == 2:
                    raise
                serve.shutdown()
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        yield client, model, tok, mem, url
    finally:
        serve.shutdown()
        mem.close()


# Ray Serve's own config models use pydantic features pydantic deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")


PROMPTS = ["def f1(x):", "x", "def f22(x):\n    return x *", " + 1\n", "def f3", "return x * 9 + 2\n"]


def test_two_replicas_serve_from_one_memory_cluster(served):
    client, model, tok, mem, url = served
    want = generate(model, tok, PROMPTS, max_new_tokens=8)

    def one(i):
        p = PROMPTS[i % len(PROMPTS)]
        r = client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0)
        return i, r.choices[0].text, r.system_fingerprint

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(one, range(24)))
    assert [text for _, text, _ in replies] == [want[i % len(PROMPTS)] for i in range(24)]
    assert len({fp for _, _, fp in replies}) == 2, "requests should be spread over both replicas"
    # streaming through Serve's proxy
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want[0]
    # each replica read its rows from the memory cluster, as a read-only inference worker
    # Serve's proxy routes to the replica its cached queue lengths say is idler; that cache can keep one
    # replica looking busy for up to 10 s after the burst above, so ask for a while, not a fixed count.
    seen = {}
    deadline = time.monotonic() + 90
    while len(seen) < 2 and time.monotonic() < deadline:
        with urllib.request.urlopen(url + "/stats", timeout=60) as r:      # answered by either replica
            doc = json.loads(r.read())
        seen[doc["replica"]] = doc
        time.sleep(0.25)
    assert set(seen) == {fp for _, _, fp in replies}
    for doc in seen.values():
        assert doc["rows"]["row_fetches"] > 0 and doc["finished"] >= 1
    stats = mem.stats()
    assert len(stats) == 2 and all("error" not in s for s in stats)
