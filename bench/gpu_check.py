"""Every CUDA path once, for correctness, then the benchmarks with the tables on another local node.

    bench/gpu_check.sh            # the same; exits non-zero on any mismatch

On a machine with a CUDA GPU: rows gathered with `device="cuda"` (pinned host memory, a
non-blocking copy; fp8 dequantized on the device) and through ClusterRows on the GPU must
equal the CPU path's bit for bit, for fp32, bf16 and fp8_e4m3 tables, over the framed-TCP data
plane and over gRPC, from a shard on another local Ray node (127.0.0.3). Then the prefill,
decode and training benchmarks run once, short, with the tables on that node. One table of
results is printed. Without CUDA the CPU half runs (every check on device="cpu", which must
equal the numpy path) and the GPU rows say "no CUDA device".

Bounded: the checks take well under a minute; the benchmarks are run with small arguments so
the whole script finishes within 8 minutes on one GPU (--skip-bench leaves them out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import RESULTS, print_table  # noqa: E402
from model_setup import start_two_nodes  # noqa: E402


def check_rows(results: list, devices: list[str]) -> None:
    import torch

    import engram_mem
    from engram_mem.quant import dequantize
    from engram_mem.table import TableSpec, as_torch
    from engram_model.cluster_rows import ClusterRows

    rng = np.random.default_rng(0)
    specs = {"f32": TableSpec("f32", 50_000, 64, seed=1), "bf16": TableSpec("bf16", 50_000, 64, dtype="bfloat16", seed=2),
             "fp8": TableSpec("fp8", 50_000, 256, dtype="fp8_e4m3", seed=3)}
    ids = rng.integers(0, 50_000, (4, 1000))
    with engram_mem.connect(shards=2, name="gpu-check", shard_resources={"node_b": 1}) as tcp:
        for s in specs.values():
            tcp.create_table_spec(s)
        # fp8 rows: quantized here from known values (the write path quantizes float32 on the client)
        tcp.write("fp8", np.arange(50_000), rng.standard_normal((50_000, 256)).astype(np.float32))
        grpc_ = engram_mem.connect(name="gpu-check", data_plane="grpc")
        try:
            for name, spec in specs.items():
                raw = tcp.gather(name, ids)  # numpy, the reference
                ref = dequantize(raw.reshape(-1, raw.shape[-1]), spec.dim, spec.block).reshape(*ids.shape, spec.dim) \
                    if spec.dtype == "fp8_e4m3" else as_torch(raw, spec.dtype)
                for plane, mem in (("tcp", tcp), ("grpc", grpc_)):
                    same_raw = np.array_equal(mem.gather(name, ids), raw)
                    for dev in devices:
                        t0 = time.perf_counter()
                        got = mem.gather(name, ids, device=dev)
                        if dev == "cuda":
                            torch.cuda.synchronize()
                        ok = same_raw and torch.equal(got.cpu(), ref)
                        results.append({"check": f"gather {spec.dtype} -> {dev}", "transport": plane,
                                        "result": "ok" if ok else "MISMATCH", "ms": (time.perf_counter() - t0) * 1e3})
            # ClusterRows (the model's row source): rows on the device equal the CPU source's
            for dev in devices:
                for plane, mem in (("tcp", tcp), ("grpc", grpc_)):
                    cpu_rows = ClusterRows(mem, {1: specs["bf16"], 3: specs["fp8"]}, train=False, create=False)
                    dev_rows = ClusterRows(mem, {1: specs["bf16"], 3: specs["fp8"]}, device=dev, train=False,
                                           create=False)
                    try:
                        t = torch.from_numpy(ids)
                        ok = True
                        for layer in (1, 3):
                            dev_rows.prefetch(layer, t)
                            a = dev_rows.get(layer, t)
                            b = cpu_rows.get(layer, t)
                            ok = ok and a.device.type == dev and torch.equal(a.cpu(), b)
                        results.append({"check": f"ClusterRows bf16+fp8 -> {dev}", "transport": plane,
                                        "result": "ok" if ok else "MISMATCH", "ms": None})
                    finally:
                        cpu_rows.close()
                        dev_rows.close()
        finally:
            grpc_.close()


def run_bench(results: list, name: str, argv: list[str], record: str, pick) -> None:
    t0 = time.time()
    p = subprocess.run([sys.executable, os.path.join(HERE, name), *argv], capture_output=True, text=True)
    if p.returncode != 0:
        results.append({"check": name, "transport": "", "result": f"FAILED rc={p.returncode}: "
                        f"{(p.stderr or p.stdout).strip().splitlines()[-1:]}", "ms": None})
        return
    with open(os.path.join(RESULTS, f"{record}.jsonl")) as f:
        last = json.loads(f.read().strip().splitlines()[-1])
    for row in pick(last):
        results.append({**row, "result": row.get("result", "ran"), "ms": None})
    results.append({"check": f"{name} ({time.time() - t0:.0f} s)", "transport": "", "result": "ran", "ms": None})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--skip-bench", action="store_true")
    args = p.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    devices = ["cpu"] + (["cuda"] if cuda else [])
    results: list[dict] = []
    ray, cluster = start_two_nodes(object_store_bytes=1 << 30)
    try:
        check_rows(results, devices)
    finally:
        ray.shutdown()
        cluster.shutdown()
    if not cuda:
        results.append({"check": "CUDA paths (pinned ring, non_blocking copy, fp8 on device)", "transport": "",
                        "result": "no CUDA device here: CPU half only", "ms": None})
    if not args.skip_bench:
        run_bench(results, "bench_prefill.py", ["--seqs", "6", "--repeats", "1", "--table-gb", "0.5"], "prefill",
                  lambda r: [{"check": f"prefill: {x.get('name', x.get('source'))}", "transport": "",
                              "result": f"{x.get('tokens_per_s', '')} tok/s"} for x in r.get("results", [])])
        run_bench(results, "bench_decode.py", ["--steps", "48", "--rounds", "1", "--table-gb", "0.5"], "decode",
                  lambda r: [{"check": f"decode: {x.get('name', x.get('source'))}", "transport": "",
                              "result": f"{x.get('tokens_per_s', '')} tok/s"} for x in r.get("results", [])])
        run_bench(results, "bench_train_step.py", ["--steps", "12", "--warmup", "2", "--repeats", "1"], "train_step",
                  lambda r: [{"check": f"train: {x['name']}", "transport": "",
                              "result": f"{x['median_step_ms']} ms/step"} for x in r.get("results", [])])
    print_table(results, ["check", "transport", "result", "ms"], title=f"\ngpu_check (CUDA: {cuda})")
    bad = [r for r in results if r["result"] == "MISMATCH" or str(r["result"]).startswith("FAILED")]
    print(f"\n{len(bad)} mismatch(es) or failure(s)" if bad else "\nall checks passed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
