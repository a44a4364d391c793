"""Real Engram tables in a real local cluster: FP8 rows with block scales imported from a checkpoint
directory in DeepSeek-V4.1-Flash's published layout (no mapping), served through every tier,
exported back to a directory that imports again; imports that check first, resume after kill -9,
record the table's layout and identity, refuse another source unless replacing; verify finding a
changed row; a disk-backed shard under a memory budget smaller than its table."""

import json
import os
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import engram_mem
from engram_mem.security import authorized_stub
from engram_mem.errors import InvalidArgument, ReadOnlyTable
from engram_mem.tools.exporter import export_tables
from engram_mem.worker.fetcher import RowFetcher
from engram_mem.tools.importer import digest_rows, import_tables, table_digest
from engram_mem.tools.status import render
from engram_mem.tools.verify import verify_tables
from engram_mem.pb.v1 import memory_pb2 as pb
from engram_mem.quant import dequantize_reference, quantize
from engram_mem.storage.disk import resident_bytes
from engram_model.hashing import bucket_primes
from engram_mem.tools.synthetic import write_demo, write_v41
from engram_mem.table import TableSpec
from engram_mem.wire import ids_bytes

ROWS = 20_000
NAME = "tables-io"


@pytest.fixture(scope="module")
def mem(ray_local):
    with engram_mem.connect(shards=2, name=NAME) as client:
        yield client


def _source(d):
    """{layer: (values uint8 [R, 256], scale bytes uint8 [R, 8])} of a V4.1-layout directory."""
    weight_map = json.loads(open(os.path.join(d, "model.safetensors.index.json")).read())["weight_map"]
    src = {}
    for layer in json.loads(open(os.path.join(d, "config.json")).read())["engram_layer_ids"]:
        got = []
        for part in ("weight", "scale"):
            name = f"layers.{layer}.engram.embed.{part}"
            with safe_open(os.path.join(d, weight_map[name]), "pt") as f:
                got.append(f.get_tensor(name).view(torch.uint8).numpy())
        src[layer] = tuple(got)
    return src


def _drop(mem, *names):
    for name in names or ("engram.l1", "engram.l14"):
        if name in mem.tables():
            mem.drop_table(name)


@pytest.fixture(scope="module")
def v41(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("v41"))
    paths = write_v41(d, ROWS, extra_rows=3)
    return d, paths, _source(d)


def _tensors(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_fp8_table_imported_from_safetensors_serves_its_dequantized_rows_through_every_tier(mem, v41, tmp_path):
    d, paths, src = v41
    n = sum(v.shape[0] for v, _ in src.values())
    r = import_tables(mem, None, [d], sha256=os.path.join(d, "SHA256SUMS"), journal=str(tmp_path / "j"),
                      progress=False)
    assert r["rows"] == n and r["skipped_rows"] == 0 and r["bytes"] == n * 264
    spec = mem.tables()["engram.l1"]
    assert (spec.dtype, spec.block, spec.row_bytes) == ("fp8_e4m3", 32, 264)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, min(v.shape[0] for v, _ in src.values()), 6000)
    for layer, (v, s) in src.items():
        name = f"engram.l{layer}"
        want_raw = np.concatenate([v, s], axis=1)[ids]                     # [n, 264]: values then scales
        want = torch.from_numpy(dequantize_reference(v, s, 32)[ids])       # [n, 256] float32
        # gRPC: the wire carries 264-byte rows; the worker dequantizes them on its device.
        assert np.array_equal(mem.gather(name, ids), want_raw)
        assert torch.equal(mem.gather(name, ids, as_torch=True), want)
        # Same-node tier (shared memory, read in place).
        f = RowFetcher(mem, node_local=True)
        try:
            uniq, rows, inv = f.fetch(name, ids)
            assert np.array_equal(rows[inv], want_raw)
            assert f.summary()["node_local_rows"] == uniq.size
        finally:
            f.close()
        # Hot-row cache in front of gRPC: a second fetch is served from the cache.
        f = RowFetcher(mem, node_local=False, cache_bytes={name: 8 << 20})
        try:
            for _ in range(3):
                uniq, rows, inv = f.fetch(name, ids)
                assert np.array_equal(rows[inv], want_raw)
            assert f.summary()["cache_hits"] > 0
        finally:
            f.close()


def test_quantized_tables_take_writes_but_refuse_pushes(mem, ray_local):
    ray = ray_local
    mem.create_table_spec(TableSpec("fp8.rw", 1000, 64, dtype="fp8_e4m3", block=32))
    x = np.random.default_rng(1).standard_normal((10, 64)).astype(np.float32) * 5
    ids = np.arange(100, 110)
    mem.write("fp8.rw", ids, x)                       # float32 rows are quantized by the client
    got = mem.gather("fp8.rw", ids, as_torch=True)
    q = quantize(x, 32)
    assert torch.equal(got, torch.from_numpy(dequantize_reference(q[:, :64], q[:, 64:], 32)))
    assert np.abs(got.numpy() - x).max() <= np.abs(x).max() / 8  # E4M3: 3 mantissa bits
    with pytest.raises(ReadOnlyTable, match="not push"):
        mem.push("fp8.rw", ids, np.zeros((10, 64), np.float32))
    # The shard refuses too, whoever sends the push, and keeps serving.
    view = mem.refresh()
    credential = ray.get(mem.controller.client_security.remote())["credential"]
    with grpc.insecure_channel(view.address(int(view.table("fp8.rw").placement[0]))) as ch:
        stub = authorized_stub(ch, credential)
        with pytest.raises(grpc.RpcError) as e:
            stub.Push(pb.PushRequest(table="fp8.rw", ids=ids_bytes(np.array([0])), grads=bytes(256),
                                     dtype="float32"))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "Push" in e.value.details()
    assert mem.gather("fp8.rw", ids).shape == (10, 66)
    mem.drop_table("fp8.rw")


def test_import_checks_everything_before_writing(mem, v41, tmp_path):
    d, paths, src = v41
    v, s = src[1]
    bad = tmp_path / "bad"
    bad.mkdir()
    mapping = {"format": "engram-mem/mapping/1", "tables": [
        {"table": "chk.a", "dtype": "fp8_e4m3", "block": 32, "values": "a.v", "scales": "a.s"},
        {"table": "chk.b", "dtype": "fp8_e4m3", "block": 32, "values": "b.v", "scales": "b.s"}]}
    (tmp_path / "m.json").write_text(json.dumps(mapping))
    good_a = {"a.v": torch.from_numpy(v[:100]).view(torch.float8_e4m3fn), "a.s": torch.from_numpy(s[:100])}
    cases = {
        "wrong scales shape": {"b.v": good_a["a.v"], "b.s": torch.from_numpy(s[:99])},
        "wrong values dtype": {"b.v": torch.zeros(100, 256), "b.s": good_a["a.s"]},
        "missing tensor": {"b.v": good_a["a.v"]},
    }
    for what, b in cases.items():
        for f in bad.glob("*"):
            f.unlink()
        save_file(good_a, str(bad / "a.safetensors"))
        save_file(b, str(bad / "b.safetensors"))
        with pytest.raises(InvalidArgument):
            import_tables(mem, str(tmp_path / "m.json"), [str(bad)], journal=str(tmp_path / "j"), progress=False)
        # chk.a was fine, but nothing was created or written: the check comes first.
        assert "chk.a" not in mem.tables() and "chk.b" not in mem.tables(), what
    # A file that does not match its sha256 stops the import before anything is written.
    save_file({"b.v": good_a["a.v"], "b.s": good_a["a.s"]}, str(bad / "b.safetensors"))
    (bad / "SUMS").write_text(f"{'0' * 64}  a.safetensors\n{'0' * 64}  b.safetensors\n")
    with pytest.raises(InvalidArgument, match="sha256"):
        import_tables(mem, str(tmp_path / "m.json"), [str(bad)], sha256=str(bad / "SUMS"), progress=False,
                      journal=str(tmp_path / "j"))
    assert "chk.a" not in mem.tables()
    # A table that exists with another shape is refused, not overwritten.
    mem.create_table("chk.a", rows=5, dim=8)
    with pytest.raises(InvalidArgument, match="exists"):
        import_tables(mem, str(tmp_path / "m.json"), [str(bad)], progress=False, journal=str(tmp_path / "j"))
    mem.drop_table("chk.a")


def test_an_import_killed_with_sigkill_continues_where_it_stopped(mem, ray_local, tmp_path):
    d = str(tmp_path / "src")
    write_v41(d, ROWS, seed=7)
    src = _source(d)
    _drop(mem)
    journal = str(tmp_path / "journal.jsonl")
    address = ray_local.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "engram_mem.tools.cli", "--name", NAME, "import", "--address", address,
           d, "--journal", journal, "--batch-mb", "1", "--quiet"]
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    # Throttled so that it is surely still running when it is killed.
    proc = subprocess.Popen(cmd + ["--max-gbps", "0.002"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and (not os.path.exists(journal) or len(open(journal).readlines()) < 3):
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done_before = sum(len(json.loads(x).get("slots", [])) for x in open(journal).readlines())
    assert done_before > 0
    out = subprocess.run(cmd + ["--json"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["skipped_rows"] > 0 and r["rows"] + r["skipped_rows"] == sum(v.shape[0] for v, _ in src.values())
    mem.refresh()
    for layer, (v, s) in src.items():
        assert np.array_equal(mem.gather(f"engram.l{layer}", np.arange(v.shape[0])), np.concatenate([v, s], axis=1))
    # The digests of the batches before the kill came back from the journal: the identity is whole.
    assert all(r["digests"][f"engram.l{layer}"] for layer in src)
    assert verify_tables(mem, sample=0)["engram.l1"]["bad_slots"] == []


def test_export_round_trips_every_tensor_byte_for_byte(mem, v41, tmp_path):
    d, paths, _ = v41
    _drop(mem)
    first = import_tables(mem, None, [d], journal=str(tmp_path / "j1"), progress=False)
    out = str(tmp_path / "out")
    export_tables(mem, None, out, progress=False)            # a directory: shards, index and config.json
    got = _tensors(os.path.join(out, "model.safetensors"))
    want = {k: t for p in paths for k, t in _tensors(p).items()}
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), k
    assert sorted(json.loads(open(os.path.join(out, "model.safetensors.index.json")).read())["weight_map"]) == sorted(want)
    # The exported directory loads where the original did: no mapping, and it is the same table
    # (same tensors, same digests), so importing it again is not refused.
    again = import_tables(mem, None, [out], journal=str(tmp_path / "j1b"), progress=False)
    assert again["digests"] == first["digests"] and all(again["digests"].values())
    # With --like the original's config.json and spelling are kept.
    export_tables(mem, None, str(tmp_path / "like"), like=[d], progress=False)
    assert open(os.path.join(d, "config.json")).read() == open(str(tmp_path / "like" / "config.json")).read()
    assert sorted(_tensors(str(tmp_path / "like" / "model.safetensors"))) == sorted(want)
    # A single file without an index, named by a mapping, as before.
    export_tables(mem, "v41-flash", str(tmp_path / "one.safetensors"), progress=False)
    assert sorted(_tensors(str(tmp_path / "one.safetensors"))) == sorted(want)
    # The DeepSeek demo layout (float32 multi-head embedding), with the optimizer state alongside.
    _drop(mem)
    demo = write_demo(str(tmp_path / "demo"), 3000)
    import_tables(mem, "deepseek-engram-demo", [str(tmp_path / "demo")], journal=str(tmp_path / "j2"), progress=False)
    src = _tensors(demo[0])
    w = src["layers.1.engram.multi_head_embedding.embedding.weight"]
    assert np.array_equal(mem.gather("engram.l1", np.arange(3000)), w.numpy())
    mem.set_optimizer("engram.l1", "adam")
    mem.push("engram.l1", np.array([5, 7]), np.ones((2, 32), np.float32), lr=0.1)
    out2 = str(tmp_path / "demo-out.safetensors")
    export_tables(mem, "deepseek-engram-demo", out2, optimizer_state=True, progress=False)
    back = _tensors(out2)
    assert torch.equal(back["layers.15.engram.multi_head_embedding.embedding.weight"],
                       src["layers.15.engram.multi_head_embedding.embedding.weight"])
    moved = back["layers.1.engram.multi_head_embedding.embedding.weight"]
    assert torch.equal(moved[:5], w[:5]) and not torch.equal(moved[5], w[5])
    state = [k for k in back if k.startswith("layers.1.") and k != "layers.1.engram.multi_head_embedding.embedding.weight"]
    assert sorted(k.rsplit(".", 1)[1] for k in state) == ["exp_avg", "exp_avg_sq", "step"]
    assert all(back[k].shape[0] == w.shape[0] for k in state)
    assert all(float(back[k][5].abs().sum()) > 0 for k in state) and all(float(back[k][4].abs().sum()) == 0 for k in state)
    for layer in (1, 15):
        mem.drop_table(f"engram.l{layer}")


def test_a_disk_backed_shard_serves_correct_rows_within_a_memory_budget_smaller_than_its_table(ray_local, tmp_path):
    budget = 2 << 20
    with engram_mem.connect(shards=1, name="disk-io", storage=f"disk:{tmp_path}", memory_budget=budget) as dm:
        spec = TableSpec("big", 64_000, 256, dtype="fp8_e4m3", block=32)   # 16.9 MB of rows
        dm.create_table_spec(spec)
        x = np.random.default_rng(3).standard_normal((spec.rows, 256)).astype(np.float32)
        q = quantize(x, 32)
        for a in range(0, spec.rows, 16_000):
            dm.write("big", np.arange(a, a + 16_000), q[a:a + 16_000])
        files = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".rows")]
        assert len(files) == 1 and not files[0].startswith("/dev/shm")
        assert os.path.getsize(files[0]) >= spec.nbytes > 4 * budget
        rng = np.random.default_rng(4)
        zipf = (rng.zipf(1.2, 200_000) - 1) % spec.rows
        for i in range(20):
            ids = zipf[i * 2000:(i + 1) * 2000]
            assert np.array_equal(dm.gather("big", ids), q[ids])            # gRPC
        # Resident pages of the file stay within the budget plus one request's pages.
        assert resident_bytes(files[0]) <= budget + 2000 * 4096, (resident_bytes(files[0]), budget)
        f = RowFetcher(dm, node_local=True)                                   # same-node tier reads the file
        try:
            uniq, rows, inv = f.fetch("big", zipf[:5000])
            assert np.array_equal(rows[inv], q[zipf[:5000]])
            assert f.summary()["node_local_rows"] == uniq.size
        finally:
            f.close()


def test_v41_shaped_model_generates_the_same_tokens_from_the_cluster_as_in_process(mem, ray_local, tmp_path):
    from engram_model.checkpoint import load_model
    from engram_model.cluster_rows import load_for_inference
    from engram_model.generate import generate
    from engram_model.v41 import build

    ckpt = build(tmp_path / "v41")
    prompts = ["def __init__(self", "class Counter(dict):", "return"]
    model, tok = load_model(ckpt)
    assert model.cfg.engram.hc_mult == 4 and not model.cfg.engram.short_conv
    assert model.rows.specs[14].row_bytes == 264
    local = generate(model, tok, prompts, max_new_tokens=24, stop_at_eos=False)
    # The tables matter: zeroed rows give other logits.
    x = torch.tensor([tok.encode(prompts[0])])
    with torch.no_grad():
        logits, _ = model(x)
        saved = {k: w.clone() for k, w in model.rows.weights.items()}
        for w in model.rows.weights.values():
            w.zero_()
        zeroed, _ = model(x)
        for k, w in model.rows.weights.items():
            w.copy_(saved[k])
    assert not torch.allclose(logits, zeroed)

    _drop(mem)
    import_tables(mem, None, [str(ckpt)], journal=str(tmp_path / "j"), progress=False)   # the published layout
    remote_model, tok2 = load_for_inference(str(ckpt), mem)
    try:
        remote = generate(remote_model, tok2, prompts, max_new_tokens=24, stop_at_eos=False)
    finally:
        remote_model.rows.close()
    assert remote == local and all(len(t) > 0 for t in local)
    # The same through `engram-generate --memory`, as a user runs it.
    address = ray_local.get_runtime_context().gcs_address
    out = subprocess.run([sys.executable, "-m", "engram_model.generate", "--checkpoint", str(ckpt), "--memory", address,
                          "--memory-name", NAME, "--prompt", prompts[1], "--max-new-tokens", "24"],
                         env=dict(os.environ, PYTHONPATH=os.getcwd()), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    want = generate(model, tok, [prompts[1]], max_new_tokens=24, seed=0)[0]
    assert f"{prompts[1]}{want}" in out.stdout


def test_a_checkpoint_directory_import_records_layout_and_identity_and_refuses_another_source(mem, ray_local,
                                                                                              v41, tmp_path):
    d, paths, src = v41
    _drop(mem)
    r = import_tables(mem, None, [d], sha256=os.path.join(d, "SHA256SUMS"), journal=str(tmp_path / "j1"),
                      progress=False)
    cfg = json.loads(open(os.path.join(d, "config.json")).read())
    primes = bucket_primes([cfg["engram_vocab_size"]] * 2, 3, cfg["engram_n_heads"], cfg["engram_layer_ids"])
    desc = mem.describe()["tables"]
    for layer, (v, s) in src.items():
        name = f"engram.l{layer}"
        meta = desc[name]["meta"]
        sizes = [p for order in primes[layer] for p in order]
        assert meta["layout"]["bucket_sizes"] == sizes and meta["layout"]["rows_past_buckets"] == 3
        assert meta["layout"]["bucket_offsets"] == [sum(sizes[:j]) for j in range(len(sizes))]
        assert [(t["name"], t["dtype"], t["shape"]) for t in meta["identity"]["tensors"]] == [
            (f"layers.{layer}.engram.embed.weight", "F8_E4M3", [v.shape[0], 256]),
            (f"layers.{layer}.engram.embed.scale", "F8_E8M0", [v.shape[0], 8])]
        assert sorted(meta["identity"]["sha256"]) == sorted({os.path.basename(t["file"])
                                                             for t in meta["identity"]["tensors"]})
        assert "_digests" not in meta                       # per-slot digests stay out of describe()
        # The recorded digest is the source's own rows, digested here slot by slot.
        spec = mem.tables()[name]
        rows = np.concatenate([v, s], axis=1)
        want = table_digest(spec, {k: digest_rows(rows[slice(*spec.slot_range(k))]) for k in range(spec.n_slots)})
        assert meta["identity"]["digest"] == want == r["digests"][name]
    text = render(mem.describe(), [])                       # what `engram-mem status` prints for the tables
    assert f"bucket sizes   {' '.join(map(str, [p for o in primes[14] for p in o]))}" in text
    assert "imported from layers.1.engram.embed.weight F8_E4M3" in text

    # The same tensors again: accepted (same digests). Other rows under the same names and shapes:
    # refused before anything changes, unless replacing.
    other = str(tmp_path / "other")
    write_v41(other, ROWS, extra_rows=3, seed=99)
    assert import_tables(mem, None, [d], journal=str(tmp_path / "j2"), progress=False)["digests"] == r["digests"]
    with pytest.raises(InvalidArgument, match="differ from the rows this table was imported with.*--replace"):
        import_tables(mem, None, [other], journal=str(tmp_path / "j3"), progress=False)
    v, s = src[1]
    assert np.array_equal(mem.gather("engram.l1", np.arange(v.shape[0])), np.concatenate([v, s], axis=1))
    kept = mem.describe()["tables"]["engram.l1"]["meta"]["identity"]
    assert kept["digest"] == r["digests"]["engram.l1"] and kept["tensors"][0]["file"].startswith(d)
    # Other tensors (another row count): refused at the check, naming what differs.
    third = str(tmp_path / "third")
    write_v41(third, ROWS, extra_rows=10, seed=5)
    with pytest.raises(InvalidArgument, match="exists as rows=.*--replace"):
        import_tables(mem, None, [third], journal=str(tmp_path / "j4"), progress=False)
    r2 = import_tables(mem, None, [other], journal=str(tmp_path / "j5"), progress=False, replace=True)
    v2, s2 = _source(other)[1]
    assert np.array_equal(mem.gather("engram.l1", np.arange(v2.shape[0])), np.concatenate([v2, s2], axis=1))
    assert r2["digests"]["engram.l1"] != r["digests"]["engram.l1"]

    # verify: everything matches; then one byte of one row changes in the cluster, and verify names it.
    assert all(t["bad_slots"] == [] and t["slots_checked"] == t["slots"] for t in verify_tables(mem).values())
    row = 1234
    changed = np.concatenate([v2, s2], axis=1)[row:row + 1].copy()
    changed[0, 17] ^= 0x01
    mem.write("engram.l1", np.array([row]), changed)
    address = ray_local.get_runtime_context().gcs_address
    out = subprocess.run([sys.executable, "-m", "engram_mem.tools.cli", "--name", NAME, "verify", "--address", address,
                          "--full", "--json"], env=dict(os.environ, PYTHONPATH=os.getcwd()), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    spec = mem.tables()["engram.l1"]
    assert got["engram.l1"]["bad_slots"] == [int(spec.slot_of(np.array([row]))[0])]
    assert (got["engram.l1"]["first_bad"]["row"], got["engram.l1"]["first_bad"]["byte"]) == (row, 17)
    assert got["engram.l14"]["bad_slots"] == []
    # Sampling is by slot: a sample holding every slot finds the row too.
    assert verify_tables(mem, ["engram.l1"], sample=spec.n_slots)["engram.l1"]["first_bad"]["row"] == row
    _drop(mem)
