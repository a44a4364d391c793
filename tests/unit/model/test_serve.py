"""engram-serve's OpenAI API over real HTTP on loopback (uvicorn), driven by the official `openai` client:
completions and chat, streamed and not, n, stop, seed; concurrent requests batch continuously and
each gets the tokens it gets alone; bad requests get OpenAI-shaped errors and the server keeps serving.

    pytest tests/unit/model/test_serve.py -q
"""

import concurrent.futures
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch
import uvicorn

from engram_model.config import load_config
from engram_model.engine import Engine, EngineConfig
from engram_model.generate import generate_tokens
from engram_model.model import EngramModel
from engram_model.openai_api import CHAT_PROMPT_END, make_app
from engram_model.rows import LocalRows, table_specs
from engram_model.tokenizer import CompressedTokenizer


# Ray Serve's own config models use pydantic features pydantic deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    text = "".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(200))
    tok = CompressedTokenizer.train([text], vocab_size=300)
    m, _ = load_config("tiny")
    cfg = m.for_tokenizer(tok)
    torch.manual_seed(0)
    model = EngramModel(cfg, rows=LocalRows(table_specs(cfg), optimizer=None), compress_lookup=tok.lookup).eval()
    engine = Engine(model, tok, EngineConfig(max_batch=8))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(make_app(engine, "tiny"), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.started, "uvicorn did not start"
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    yield url, client, model, tok, engine
    srv.should_exit = True
    thread.join(timeout=30)
    engine.close()


def alone(model, tok, prompt: str, n: int) -> str:
    ids = [tok.eos_id] + tok.encode(prompt)
    out = generate_tokens(model, torch.tensor([ids]), n, eos_id=tok.eos_id)[0].tolist()
    return tok.decode(out[:out.index(tok.eos_id)] if tok.eos_id in out else out)


def test_completions_and_streaming_with_the_openai_client(server):
    url, client, model, tok, _ = server
    r = client.completions.create(model="tiny", prompt="def f1(x):", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.model == "tiny" and len(r.choices) == 1
    assert r.choices[0].text == alone(model, tok, "def f1(x):", 8)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(tok.encode("def f1(x):")) and r.usage.completion_tokens >= 1
    # a list of prompts with n=2: choices prompt-major, greedy choices equal
    r = client.completions.create(model="tiny", prompt=["def f1(x):", "x"], max_tokens=6, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [alone(model, tok, p, 6) for p in ("def f1(x):", "def f1(x):", "x", "x")]
    # token ids as the prompt (as load generators send them)
    ids = tok.encode("def f1(x):")
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == alone(model, tok, "def f1(x):", 8)
    with pytest.raises(openai.BadRequestError, match="token ids"):
        client.completions.create(model="tiny", prompt=[10**6], max_tokens=2)
    # streaming: the chunks add up to the same text, the last carries the finish reason
    chunks = list(client.completions.create(model="tiny", prompt="def f1(x):", max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == alone(model, tok, "def f1(x):", 8)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert len([c for c in chunks if c.choices]) >= 2 and chunks[-1].usage.completion_tokens >= 1
    # seeded sampling is reproducible; stop strings cut the text
    a = client.completions.create(model="tiny", prompt="def", max_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    b = client.completions.create(model="tiny", prompt="def", max_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    assert a.choices[0].text == b.choices[0].text
    full = alone(model, tok, "def f1(x):", 12)
    if len(full) > 4:
        stop = full[3:5]
        r = client.completions.create(model="tiny", prompt="def f1(x):", max_tokens=12, temperature=0, stop=[stop])
        assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with urllib.request.urlopen(url + "/health", timeout=10) as resp:
        assert json.loads(resp.read()) == {"status": "ok"}


def test_chat_completions(server):
    _, client, model, tok, _ = server
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def f2(x):"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0)
    prompt = f"System: be brief\n\nUser: def f2(x):\n\n{CHAT_PROMPT_END}"
    want = alone(model, tok, prompt, 6).split("\n\nUser:")[0]
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_concurrent_streams_batch_and_match_decoding_alone(server):
    _, client, model, tok, engine = server
    prompts = ["def f1(x):", "x", "def f22(x):\n    return", " + 1\n", "def f3", "return x + 9\n" * 2]
    before = engine.summary()

    def one(p):
        s = client.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in s)

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(one, prompts))
    assert got == [alone(model, tok, p, 10) for p in prompts]
    after = engine.summary()
    rows = after["decode_rows"] - before["decode_rows"]
    steps = after["decode_steps"] - before["decode_steps"]
    assert steps and rows / steps > 1                      # requests shared decode steps


def _raw(url, path, body=None, method="POST"):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    url, client, model, tok, _ = server
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=0)
    assert e.value.status_code == 400 and "max_tokens" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="def f(x): return x\n" * 200)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", logprobs=2)
    assert e.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[])
    for path, body, method, code in [("/v1/completions", b"{not json", "POST", 400),
                                     ("/v1/completions", {"model": "tiny"}, "POST", 400),          # no prompt
                                     ("/v1/completions", {"model": "tiny", "prompt": "x", "bogus": 1}, "POST", 400),
                                     ("/v1/completions", {"model": "tiny", "prompt": 5}, "POST", 400),
                                     ("/v1/nothing", {}, "POST", 404), ("/v1/completions", None, "GET", 405)]:
        status, doc = _raw(url, path, body, method)
        assert status == code, (path, body, doc)
        assert set(doc) == {"error"} and {"message", "type", "param", "code"} <= set(doc["error"]), doc
        assert doc["error"]["message"]
    r = client.completions.create(model="tiny", prompt="def f1(x):", max_tokens=4, temperature=0)
    assert r.choices[0].text == alone(model, tok, "def f1(x):", 4)


def test_command_line_and_deployment_spec():
    from engram_model.deployment import ServeSpec
    from engram_model.serve import build_parser

    args = build_parser().parse_args(["--checkpoint", "c", "--autoscale", "1:3", "--replica-resources", '{"gpu_node": 1}'])
    assert args.autoscale == (1, 3) and args.replicas is None and args.replica_resources == {"gpu_node": 1}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--checkpoint", "c", "--autoscale", "3"])
    with pytest.raises(SystemExit):    # one or the other
        build_parser().parse_args(["--checkpoint", "c", "--autoscale", "1:2", "--replicas", "2"])
    with pytest.raises(ValueError, match="autoscale"):
        ServeSpec(checkpoint="c", autoscale=(3, 1))
    with pytest.raises(ValueError, match="replicas"):
        ServeSpec(checkpoint="c", replicas=0)
