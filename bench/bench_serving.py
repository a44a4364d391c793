"""Serving under load: Poisson arrivals at several rates against engram-serve's Ray Serve replicas.

    .venv/bin/python bench/bench_serving.py [--rates 1 2 4 8 16] [--requests 32] [--max-tokens 48]
                                            [--table-gb 0.25] [--setups 1:continuous 2:continuous 1:static]

A two-node local Ray cluster (bench/model_setup.py): the memory cluster's shards on node b
(127.0.0.3), the replicas on node a (127.0.0.2), so every row a replica's hot-row cache misses
travels over gRPC and is counted at the shards. The model is engram_model/configs/serving.json (random
weights: the speed of a forward does not depend on them) with tables scaled by --table-gb.

For each setup (replicas : engine policy) the app is deployed afresh, warmed up, then for each rate
a small async client (aiohttp) sends --requests streamed completions whose arrival times are a
Poisson process (exponential gaps, fixed seed) with prompts of real stdlib text of 32-160 tokens
and --max-tokens output tokens each (ignore_eos, so every request decodes the same length). From
the server-sent events it measures, per setup and rate:
  - throughput: output tokens / (last response end - first request start);
  - TTFT: time to the first text chunk, p50 and p99;
  - ITL: gaps between successive text chunks (one token each, except that text which may be a
    partial UTF-8 character is held back), p50 and p99;
  - memory-cluster traffic: rows gathered and bytes sent by the shards (Stats RPC) during the run,
    per second and per output token.
"continuous" is the engine's continuous batching; "static" admits a new batch only when the running
one has drained (request-level batching), the baseline it replaces. Prints a table, appends
bench/results/serving.jsonl, draws bench/results/serving.png. Note the load average: the machine's
cores are shared with the replicas, the shards and the load generator itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, append_jsonl, markdown_table, print_table  # noqa: E402
from model_setup import memory_on, model_config, start_two_nodes, text_windows  # noqa: E402


async def one_request(session, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": "engram", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    chunks, tokens = [], 0
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
        async for line in r.content:
            if not line.startswith(b"data: "):
                continue
            payload = line[6:].strip()
            if payload == b"[DONE]":
                break
            doc = json.loads(payload)
            if "error" in doc:
                raise RuntimeError(doc["error"]["message"])
            if doc.get("choices") and doc["choices"][0]["text"]:
                chunks.append(time.perf_counter())
            if doc.get("usage"):
                tokens = doc["usage"]["completion_tokens"]
    return {"start": t0, "end": time.perf_counter(), "ttft": chunks[0] - t0 if chunks else float("nan"),
            "itl": list(np.diff(chunks)), "tokens": tokens}


async def poisson_load(url: str, prompts: list[str], rate: float, max_tokens: int, seed: int) -> list[dict]:
    import aiohttp

    gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(prompts))
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks, t = [], time.perf_counter()
        for prompt, gap in zip(prompts, gaps):
            t += gap
            await asyncio.sleep(max(0.0, t - time.perf_counter()))
            tasks.append(asyncio.create_task(one_request(session, url, prompt, max_tokens)))
        return await asyncio.gather(*tasks)


def shard_traffic(mem) -> dict:
    rows = sent = 0
    for s in mem.stats():
        rows += int(s.get("rows_gathered", 0))
        sent += int(s.get("bytes_sent", 0))
    return {"rows": rows, "bytes": sent}


def summarize(results: list[dict], before: dict, after: dict) -> dict:
    duration = max(r["end"] for r in results) - min(r["start"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    ttft = np.array([r["ttft"] for r in results])
    itl = np.array([x for r in results for x in r["itl"]]) if any(r["itl"] for r in results) else np.array([np.nan])
    rows, nbytes = after["rows"] - before["rows"], after["bytes"] - before["bytes"]
    return {"requests": len(results), "seconds": round(duration, 2), "tok_s": tokens / duration,
            "req_s": len(results) / duration,
            "ttft_p50_ms": 1e3 * float(np.percentile(ttft, 50)), "ttft_p99_ms": 1e3 * float(np.percentile(ttft, 99)),
            "itl_p50_ms": 1e3 * float(np.percentile(itl, 50)), "itl_p99_ms": 1e3 * float(np.percentile(itl, 99)),
            "mem_rows_s": rows / duration, "mem_MB_s": nbytes / duration / 1e6,
            "mem_rows_per_token": rows / max(tokens, 1)}


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    for k, setup in enumerate(dict.fromkeys(r["setup"] for r in rows)):
        rs, c = [r for r in rows if r["setup"] == setup], f"C{k}"      # one colour per setup
        x = [r["rate"] for r in rs]
        axes[0].plot(x, [r["tok_s"] for r in rs], marker="o", color=c, label=setup)
        axes[1].plot(x, [r["ttft_p50_ms"] for r in rs], marker="o", color=c, label=f"{setup} p50")
        axes[1].plot(x, [r["ttft_p99_ms"] for r in rs], marker="x", color=c, linestyle="--", label=f"{setup} p99")
        axes[2].plot(x, [r["itl_p50_ms"] for r in rs], marker="o", color=c, label=f"{setup} p50")
        axes[2].plot(x, [r["itl_p99_ms"] for r in rs], marker="x", color=c, linestyle="--", label=f"{setup} p99")
        axes[3].plot(x, [r["mem_MB_s"] for r in rs], marker="o", color=c, label=setup)
    for ax, yl in zip(axes, ["output tokens/s", "time to first token (ms)", "inter-token latency (ms)",
                             "memory-cluster MB/s (shards' gathers)"]):
        ax.set_xlabel("offered load (requests/s, Poisson)")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0, 16.0])
    p.add_argument("--requests", type=int, default=32, help="requests per rate")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--table-gb", type=float, default=0.25)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--prefill-chunk", type=int, default=64)
    p.add_argument("--cache-mb", type=int, default=16, help="hot-row cache per table and replica")
    p.add_argument("--setups", nargs="+", default=["1:continuous", "2:continuous", "1:static"],
                   help="REPLICAS:POLICY pairs")
    args = p.parse_args(argv)

    import torch
    from ray import serve

    from engram_model.checkpoint import save_checkpoint
    from engram_model.cluster_rows import ClusterRows
    from engram_model.deployment import ServeSpec, deploy
    from engram_model.model import EngramModel
    from engram_model.rows import table_specs

    load0 = os.getloadavg()[0]
    ray, cluster = start_two_nodes(cpus=4)
    mem = memory_on("b", "bench-serving", shards=2)
    try:
        cfg, _, tok = model_config("serving", args.table_gb)
        torch.manual_seed(0)
        model = EngramModel(cfg, compress_lookup=tok.lookup)
        ckpt = save_checkpoint(os.path.join(tempfile.mkdtemp(prefix="bench-serving-"), "ckpt"), model, tokenizer=tok)
        ClusterRows(mem, table_specs(cfg), train=False, node_local=False).close()      # creates the tables
        rng = np.random.default_rng(0)
        lengths = [int(x) for x in rng.integers(32, 161, args.requests * len(args.rates) + 4)]
        prompts = [tok.decode(w) for w in text_windows(tok, lengths, seed=5)]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        rows = []
        for setup in args.setups:
            n, policy = setup.split(":")
            spec = ServeSpec(checkpoint=str(ckpt), memory_address=ray.get_runtime_context().gcs_address,
                             memory_name="bench-serving", replicas=int(n), policy=policy, max_batch=args.max_batch,
                             prefill_chunk=args.prefill_chunk,
                             cache_mb=args.cache_mb, num_cpus=1, replica_resources={"node_a": 1}, port=port,
                             app_name="engram")
            t0 = time.time()
            url = deploy(spec)
            print(f"[{setup}] deployed in {time.time() - t0:.0f}s", flush=True)
            asyncio.run(poisson_load(url, prompts[-4:], 8.0, 8, seed=1))                 # warm-up
            for i, rate in enumerate(args.rates):
                batch = prompts[i * args.requests:(i + 1) * args.requests]
                before = shard_traffic(mem)
                results = asyncio.run(poisson_load(url, batch, rate, args.max_tokens, seed=10 + i))
                row = {"setup": f"{n} replica{'s' if int(n) > 1 else ''}, {policy}", "replicas": int(n),
                       "policy": policy, "rate": rate, **summarize(results, before, shard_traffic(mem))}
                rows.append(row)
                print(f"[{setup}] rate {rate}: {row['tok_s']:.1f} tok/s, TTFT p50 {row['ttft_p50_ms']:.0f} ms, "
                      f"ITL p50 {row['itl_p50_ms']:.0f} ms", flush=True)
            serve.delete(spec.app_name)
        load1 = os.getloadavg()[0]
        cols = ["setup", "rate", "tok_s", "req_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
                "mem_MB_s", "mem_rows_per_token"]
        title = (f"engram-serve under Poisson load: serving config, {args.table_gb} GB tables on node b, "
                 f"{args.requests} requests x {args.max_tokens} tokens per rate; load avg {load0:.1f} -> {load1:.1f}")
        print_table(rows, cols, title)
        print(markdown_table(rows, cols))
        append_jsonl("serving", {"args": vars(args), "load_avg": [load0, load1], "rows": rows})
        plot(rows, os.path.join(RESULTS, "serving.png"), title)
        print(f"wrote {os.path.join(RESULTS, 'serving.jsonl')} and serving.png")
    finally:
        serve.shutdown()
        mem.close()
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
