"""Training and inference workers attached to a memory cluster on a real local Ray cluster.

The model code is the same in every run; only its RowSource differs (LocalRows in-process,
ClusterRows against the cluster).
"""

import dataclasses

import numpy as np
import pytest
import torch

import engram_mem
from engram_model.cluster_rows import ClusterRows
from engram_model.config import load_config
from engram_model.data import Corpus
from engram_model.generate import generate
from engram_model.model import EngramModel
from engram_model.rows import LocalRows, table_specs
from engram_model.tokenizer import CompressedTokenizer
from engram_model.train import train

QUIET = dict(progress=False, log=lambda *a: None)


def _text(seed, n=500):
    rng = np.random.default_rng(seed)
    names = ["alpha", "beta", "Gamma", "delta", "Epsilon", "zeta"]
    out = []
    for _ in range(n):
        a, b = rng.choice(names, 2)
        k = int(rng.integers(0, 20))
        out.append(rng.choice([f"def {a}_{k}(self, {b}):\n    return self.{b} + {k}\n",
                               f"    {a} = {b}.get('{a}', {k})\n"]))
    return "".join(out)


@pytest.fixture(scope="module")
def setup(ray_local):
    tok = CompressedTokenizer.train([_text(0)], vocab_size=300)
    ids = []
    for seed in range(3):
        ids += tok.encode(_text(seed)) + [tok.eos_id]
    corpus = Corpus.from_tokens(np.array(ids), val_fraction=0.15)
    with engram_mem.connect(shards=2, name="workers") as mem:
        yield mem, tok, corpus


def _tiny(**kw):
    m, t = load_config("tiny")
    return m, dataclasses.replace(t, eval_every=0, **kw)


def _fresh_tables(mem, cfg):
    for spec in table_specs(cfg).values():
        if spec.name in mem.tables():
            mem.drop_table(spec.name)


def test_training_in_the_cluster_follows_the_in_process_loss_curve(setup):
    mem, tok, corpus = setup
    m, t = _tiny(steps=200)
    cfg = m.for_tokenizer(tok)
    local = train(m, t, tokenizer=tok, corpus=corpus, **QUIET)
    _fresh_tables(mem, cfg)
    rows = ClusterRows(mem, table_specs(cfg))
    try:
        remote = train(m, t, tokenizer=tok, corpus=corpus, rows=rows, **QUIET)
        rows.flush()
    finally:
        rows.close()
    a, b = np.array(local.history["loss"]), np.array(remote.history["loss"])
    assert a.shape == b.shape == (200,)
    assert np.max(np.abs(a - b)) < 1e-3, np.max(np.abs(a - b))
    assert b[-10:].mean() < b[:10].mean() - 1.0
    # The tables themselves ended equal: the cluster applied exactly the in-process updates.
    for layer, w in local.rows.weights.items():
        name = table_specs(cfg)[layer].name
        got = mem.gather(name, np.arange(w.shape[0]))
        assert np.allclose(got, w.numpy(), atol=1e-4)


def test_training_through_the_nodes_agent_equals_the_in_process_read_path_bit_for_bit(setup):
    """ClusterRows reads and pushes through the node's fetch agent by default; agent=False keeps
    the read path in the model's process; prefetch_ahead=False fetches each micro-batch within its
    own forward. Same losses and same tables, to the bit; ahead, every forward (2 micro-batches a
    step) finds its rows on their way, and no row is fetched twice."""
    mem, tok, corpus = setup
    m, t = _tiny(steps=30, grad_accum=2)
    cfg = m.for_tokenizer(tok)
    specs = table_specs(cfg)
    out = {}
    for agent, ahead in ((False, True), (True, True), (True, False)):
        _fresh_tables(mem, cfg)
        rows = ClusterRows(mem, specs, cache_bytes=1 << 20, agent=agent)
        try:
            hist = train(m, t, tokenizer=tok, corpus=corpus, rows=rows, prefetch_ahead=ahead, **QUIET).history
            rows.flush()
            stats = rows.stats()
        finally:
            rows.close()
        tables = {s.name: mem.gather(s.name, np.arange(s.rows)) for s in specs.values()}
        out[agent, ahead] = (hist["loss"], tables, stats)
    ref = out[False, True]
    for key in ((True, True), (True, False)):
        assert out[key][0] == ref[0], key
        for name, w in ref[1].items():
            assert np.array_equal(out[key][1][name], w), (key, name)
    assert out[True, True][2]["agent_pushes"] > 0 and out[True, True][2]["agent_fetches"] > 0
    forwards = 30 * 2 * len(specs)   # training forwards' fetches (the final evaluation's come on top)
    for key, (_, _, stats) in out.items():
        assert stats["row_fetches"] == ref[2]["row_fetches"] >= forwards, key
        assert stats["prefetched_ahead"] == (forwards if key[1] else 0), key


class _KillsTheAgent(ClusterRows):
    """kill -9 of the node's fetch agent at the k-th get(): with this forward's fetches (and the
    last step's pushes) in flight."""

    def __init__(self, *a, kill_at: int, **kw):
        super().__init__(*a, **kw)
        self.kill_at, self.gets, self.killed = kill_at, 0, []

    def get(self, layer, row_ids):
        self.gets += 1
        if self.gets == self.kill_at:
            import os
            import signal

            import ray

            pid = ray.get(self.fetcher.handle.pid.remote(), timeout=60)
            os.kill(pid, signal.SIGKILL)
            self.killed.append(pid)
        return super().get(layer, row_ids)


def test_kill9_of_the_agent_mid_training_changes_nothing_of_the_run(setup):
    """Pushes in flight when the agent dies are re-sent with their keys to the restarted agent:
    applied once, so the run is the run without the kill, bit for bit, with no failed step."""
    mem, tok, corpus = setup
    m, t = _tiny(steps=24)
    cfg = m.for_tokenizer(tok)
    out = {}
    for kill in (False, True):
        _fresh_tables(mem, cfg)
        rows = (_KillsTheAgent(mem, table_specs(cfg), kill_at=2 * 10 + 1) if kill
                else ClusterRows(mem, table_specs(cfg), agent=False))
        try:
            hist = train(m, t, tokenizer=tok, corpus=corpus, rows=rows, **QUIET).history
            rows.flush()
        finally:
            rows.close()
        out[kill] = (hist["loss"], {s.name: mem.gather(s.name, np.arange(s.rows)) for s in table_specs(cfg).values()})
    assert rows.killed and rows.fetcher.stats["reconnects"] >= 1
    assert out[True][0] == out[False][0]
    for name, w in out[False][1].items():
        assert np.array_equal(out[True][1][name], w), name


def test_kill9_of_the_agent_mid_decode_changes_no_token(setup):
    mem, tok, corpus = setup
    m, t = _tiny(steps=10)
    trained = train(m, t, tokenizer=tok, corpus=corpus, **QUIET)
    cfg = trained.model_cfg
    _fresh_tables(mem, cfg)
    writer = ClusterRows(mem, table_specs(cfg), train=False)
    writer.load_state_dict({k: v for k, v in trained.rows.state_dict().items() if k.endswith(".weight")})
    writer.close()
    reader = _KillsTheAgent(mem, table_specs(cfg), train=False, cache_bytes=256 << 10, create=False, kill_at=25)
    try:
        remote = EngramModel(cfg, rows=reader, compress_lookup=tok.lookup)
        remote.load_state_dict(trained.model.state_dict())
        remote.eval(), trained.model.eval()
        prompts = ["def beta_1(self, zeta):", "    delta = Gamma.get("]
        want = generate(trained.model, tok, prompts, max_new_tokens=24, temperature=0.0, seed=3)
        got = generate(remote, tok, prompts, max_new_tokens=24, temperature=0.0, seed=3)
    finally:
        reader.close()
    assert reader.killed and reader.fetcher.stats["reconnects"] >= 1 and reader.gets > 25
    assert got == want


def test_the_cache_never_serves_a_row_older_than_the_workers_last_push(setup):
    mem, tok, corpus = setup
    m, t = _tiny(steps=40)
    cfg = m.for_tokenizer(tok)
    local = train(m, t, tokenizer=tok, corpus=corpus, **QUIET)
    _fresh_tables(mem, cfg)

    class Checked(ClusterRows):
        """After every step, what the cached path serves must equal what the shards hold."""
        checked = 0

        def step(self, lr, step):
            super().step(lr, step)
            for layer, spec in self.specs.items():
                ids = np.random.default_rng(step).integers(0, spec.rows, 64)
                ids = np.concatenate([ids, list(self.fetcher.caches[spec.name].keys[:64])])
                uniq, served, inv = self.fetcher.fetch(spec.name, ids)
                truth = self.client.gather(spec.name, uniq)
                assert np.array_equal(served, truth), f"stale rows served at step {step}"
                self.checked += 1

    # node_local=False: rows come over gRPC, with the cache in front (it fronts remote shards only)
    rows = Checked(mem, table_specs(cfg), cache_bytes=1 << 20, node_local=False, agent=False)  # its own cache, to look into
    try:
        remote = train(m, t, tokenizer=tok, corpus=corpus, rows=rows, **QUIET)
        stats = rows.stats()
    finally:
        rows.close()
    assert rows.checked == 2 * 40 and stats["cache_hits"] > 0
    assert np.max(np.abs(np.array(local.history["loss"]) - np.array(remote.history["loss"]))) < 1e-3


def test_a_fetch_overtaken_by_a_push_does_not_cache_its_older_rows(setup):
    """A fetch reads rows, a push to them lands, then the fetch completes: what it read predates
    the push, so it must not enter the cache (a later fetch would be served the old rows)."""
    from engram_mem.worker.fetcher import RowFetcher

    mem = setup[0]
    mem.create_table("overtaken", 5000, 8, seed=3, optimizer="sgd", exist_ok=True)
    fetcher = RowFetcher(mem, cache_bytes={"overtaken": 1 << 20}, node_local=False)
    try:
        ids = np.arange(0, 5000, 7)
        for _ in range(3):  # make the ids frequent enough to be admitted
            fetcher.fetch("overtaken", ids)
        fetcher.caches["overtaken"].clear()
        part = fetcher._begin("overtaken", ids)                         # the fetch starts ...
        old = mem.gather_distinct_async("overtaken", part.uniq[part.remote_pos]).result()
        fetcher.push_async("overtaken", ids, np.ones((ids.size, 8), np.float32), lr=0.5).result()
        fetcher._finish(part, old)                                      # ... and ends after the push
        assert len(fetcher.caches["overtaken"]) == 0
        uniq, served, _ = fetcher.fetch("overtaken", ids)
        assert np.array_equal(served, mem.gather("overtaken", uniq))
        assert np.allclose(served, old - 0.5)
    finally:
        fetcher.close()


@pytest.mark.parametrize("mode", ["at the start", "one layer ahead", "at get"])
def test_prefetch_on_and_off_serve_the_same_rows_from_this_nodes_memory(setup, mode):
    """Every fetch starting at prefetch() (stagger_ids=0), a small later layer's starting once the
    layer before it has its rows (the default), or each at get() (prefetch=False): all serve the
    rows the shards hold, from this node's shared memory; the cache (for remote rows) stays idle."""
    mem, tok, _ = setup
    m, _ = _tiny()
    cfg = m.for_tokenizer(tok)
    specs = table_specs(cfg)
    assert len(specs) >= 2
    rows = ClusterRows(mem, specs, train=False, prefetch=mode != "at get", cache_bytes=1 << 20,
                       **({"stagger_ids": 0} if mode == "at the start" else {}))
    try:
        ids = {layer: torch.randint(0, spec.rows, (2, 5, 3)) for layer, spec in specs.items()}
        for layer in specs:
            rows.prefetch(layer, ids[layer])
        layers = sorted(specs)
        in_flight = {"at the start": layers, "one layer ahead": layers[:1], "at get": []}[mode]
        assert sorted(rows._inflight) == in_flight
        for i, (layer, spec) in enumerate(sorted(specs.items())):
            got = rows.get(layer, ids[layer])
            want = torch.from_numpy(mem.gather(spec.name, ids[layer].numpy()))
            assert got.shape == (2, 5, 3, spec.dim) and torch.equal(got, want)
            if mode == "one layer ahead":  # the next layer's fetch went out with this one's rows
                assert sorted(rows._inflight) == layers[i + 1:i + 2]
        stats = rows.stats()
        assert stats["node_local_rows"] > 0 and stats.get("cache_lookups", 0) == 0 and stats.get("remote_rows", 0) == 0
        assert stats["row_fetches"] == len(specs)
        for call in (rows.prefetch, rows.get):
            with pytest.raises(ValueError, match="no Engram table for layer 7"):
                call(7, ids[cfg.engram.layer_ids[0]])
        # A later layer asked for first goes out then; a big prefetch goes out at once.
        big = {layer: torch.randint(0, spec.rows, (2, 1000, 3)) for layer, spec in specs.items()}
        for layer in specs:
            rows.prefetch(layer, ids[layer])
        last = layers[-1]
        assert torch.equal(rows.get(last, ids[last]), torch.from_numpy(mem.gather(specs[last].name, ids[last].numpy())))
        for layer in layers[:-1]:
            rows.get(layer, ids[layer])
        for layer in specs:
            rows.prefetch(layer, big[layer])
        assert sorted(rows._inflight) == ([] if mode == "at get" else layers)
        for layer in layers:
            rows.get(layer, big[layer])
    finally:
        rows.close()


def _randomized(model):
    with torch.no_grad():   # Engram starts silent: make its rows matter to the logits
        for block in model.blocks:
            if block.engram is not None:
                for p in block.engram.parameters():
                    p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("agent", [True, False])
def test_rows_fetched_a_batch_ahead_are_the_rows_the_forward_reads(setup, agent):
    """model.prefetch(next batch) while the current one runs: each forward finds its fetches in
    flight (no fetch twice), the logits equal those of fetching within the forward, and the
    engine's chunked prefill (the next chunk fetched ahead) gives the same tokens as without."""
    from engram_model.engine import Engine, EngineConfig, SamplingParams

    mem, tok, _ = setup
    m, _ = _tiny()
    cfg = m.for_tokenizer(tok)
    specs = table_specs(cfg)
    torch.manual_seed(0)
    model = _randomized(EngramModel(cfg, compress_lookup=tok.lookup).eval())
    texts = ["def alpha_3(self, beta):\n    return", "    zeta = delta.get(", "def Gamma_7(self, Epsilon):"]
    batches = [torch.tensor([tok.encode(t)[:12]] * 2) for t in texts]
    out = {}
    for ahead in (False, True):
        rows = ClusterRows(mem, specs, train=False, agent=agent)
        model.rows = rows
        try:
            with torch.inference_mode():
                if ahead:
                    model.prefetch(batches[0])
                logits = []
                for i, x in enumerate(batches):
                    if ahead and i + 1 < len(batches):
                        model.prefetch(batches[i + 1])
                    logits.append(model(x)[0])
            out[ahead] = (logits, rows.stats())
        finally:
            rows.close()
    for a, b in zip(out[True][0], out[False][0]):
        assert torch.equal(a, b)
    assert out[True][1]["prefetched_ahead"] == len(batches) * len(specs)
    assert out[True][1]["row_fetches"] == out[False][1]["row_fetches"] == len(batches) * len(specs)
    assert out[False][1]["prefetched_ahead"] == 0

    prompts = ["def beta_1(self, zeta):\n    return self.zeta + 1\n", "    delta = Gamma.get("]
    tokens = {}
    for ahead in (False, True):
        rows = ClusterRows(mem, specs, train=False, agent=agent)
        model.rows = rows
        engine = Engine(model, tok, EngineConfig(max_batch=4, prefill_chunk=3, prefetch_ahead=ahead))
        try:
            tokens[ahead] = engine.generate(prompts, SamplingParams(max_tokens=8))
            tokens[ahead, "stats"] = rows.stats()
        finally:
            engine.close()
            rows.close()
    assert tokens[True] == tokens[False]
    assert tokens[True, "stats"]["prefetched_ahead"] > 0 and tokens[False, "stats"]["prefetched_ahead"] == 0
    assert tokens[True, "stats"]["row_fetches"] == tokens[False, "stats"]["row_fetches"]


def test_a_training_step_drops_the_rows_fetched_ahead_of_its_push(setup):
    """Rows fetched for a later batch before this step's push may predate it: step() drops them,
    and the next read serves the rows the shards hold after the push (staleness 0)."""
    mem, tok, _ = setup
    m, _ = _tiny()
    cfg = m.for_tokenizer(tok)
    _fresh_tables(mem, cfg)
    specs = table_specs(cfg)
    layer, spec = next(iter(specs.items()))
    rows = ClusterRows(mem, {layer: spec})
    try:
        ids = torch.randint(0, spec.rows, (2, 6, 3))
        nxt = ids[:, :4].clone()    # the next batch: rows this step updates
        rows.prefetch_ahead(layer, nxt)
        before = rows._inflight[layer][0][1].result()[1].copy()   # fetched, before the push
        got = rows.get(layer, ids)
        assert len(rows._inflight[layer]) == 1   # the next batch's fetch waits in flight
        got.sum().backward()
        rows.step(lr=0.1, step=1)
        assert not rows._inflight   # the ahead fetch is gone
        after = rows.get(layer, nxt)   # read at get, after the push
        rows.flush()
        truth = torch.from_numpy(mem.gather(spec.name, nxt.numpy()))
        assert torch.equal(after, truth) and not np.array_equal(before, mem.gather(spec.name, np.unique(nxt.numpy())))
        ids = nxt
        # ahead=0 keeps one fetch a layer: a second of other ids drops the first
        rows.ahead = 0
        rows.prefetch_ahead(layer, ids)
        rows.prefetch_ahead(layer, ids + 1)
        assert len(rows._inflight[layer]) == 1
        assert torch.equal(rows.get(layer, ids), truth)   # not in flight any more: read at get
    finally:
        rows.close()
    with pytest.raises(ValueError, match="ahead"):
        ClusterRows(mem, specs, ahead=-1, create=False)


def test_inference_with_remote_rows_equals_local_rows_exactly(setup):
    mem, tok, corpus = setup
    m, t = _tiny(steps=20)
    trained = train(m, t, tokenizer=tok, corpus=corpus, **QUIET)
    cfg = trained.model_cfg
    _fresh_tables(mem, cfg)
    # Import the trained tables into the cluster (Write), then serve them read-only with a cache.
    writer = ClusterRows(mem, table_specs(cfg), train=False)
    writer.load_state_dict({k: v for k, v in trained.rows.state_dict().items() if k.endswith(".weight")})
    reader = ClusterRows(mem, table_specs(cfg), train=False, cache_bytes=256 << 10, node_local=False)
    remote_model = EngramModel(cfg, rows=reader, compress_lookup=tok.lookup)
    remote_model.load_state_dict(trained.model.state_dict())
    local_model = trained.model
    local_model.eval(), remote_model.eval()
    x = torch.tensor([tok.encode("def alpha_3(self, beta):\n    return")[:20]] * 2)
    with torch.no_grad():
        assert torch.equal(local_model(x)[0], remote_model(x)[0])
    prompts = ["def beta_1(self, zeta):", "    delta = Gamma.get("]
    for temperature in (0.0, 0.8):
        want = generate(local_model, tok, prompts, max_new_tokens=24, temperature=temperature, seed=3)
        got = generate(remote_model, tok, prompts, max_new_tokens=24, temperature=temperature, seed=3)
        assert got == want
    assert reader.stats()["cache_hits"] > 0 and reader.stats()["row_fetches"] > 0
    writer.close(), reader.close()


def test_resume_restores_dense_model_and_cluster_tables_to_the_same_step(setup, tmp_path):
    mem, tok, corpus = setup
    m, t = _tiny(steps=8, checkpoint_every=3)
    cfg = m.for_tokenizer(tok)

    def run(**kw):
        rows = ClusterRows(mem, table_specs(cfg))
        try:
            return train(m, t, tokenizer=tok, corpus=corpus, rows=rows, **QUIET, **kw).history
        finally:
            rows.close()

    _fresh_tables(mem, cfg)
    straight = run(out_dir=tmp_path / "a")
    _fresh_tables(mem, cfg)
    run(out_dir=tmp_path / "b", stop_at=3)      # checkpoint at step 3 (dense + the tables' cut)
    run(out_dir=tmp_path / "junk", stop_at=2)   # more pushes land in the tables after the checkpoint
    resumed = run(out_dir=tmp_path / "b", resume=tmp_path / "b" / "ckpt")
    assert resumed["step"] == list(range(1, 9))
    assert resumed["loss"] == straight["loss"]  # bit for bit: tables came back to step 3 too
