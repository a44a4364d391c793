"""engram-serve: an OpenAI-compatible server for a trained model, one process or Ray Serve replicas.

    engram-serve --checkpoint runs/small/ckpt                                  # in-process tables, uvicorn
    engram-serve --checkpoint runs/demo/ckpt --memory local                     # rows from `engram-mem up`
    engram-serve --checkpoint runs/demo/ckpt --memory local --replicas 2        # Ray Serve, 2 replicas
    engram-serve --checkpoint runs/demo/ckpt --memory embedded --autoscale 1:3  # starts Ray + memory here
    engram-serve --checkpoint runs/small/ckpt --memory embedded --import-tables --replicas 2

    curl -s 127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "engram", "prompt": "def main(", "max_tokens": 32, "temperature": 0}'
    python -c 'import openai; c = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-"); \\
               print(c.completions.create(model="engram", prompt="import os", max_tokens=16).choices[0].text)'

The API is openai_api.py; the continuous-batching engine behind it is engine.py. Without
--replicas/--autoscale one process serves (uvicorn). With them the model is a Ray Serve deployment
(deployment.py) in the Ray cluster of the memory cluster: each replica attaches to it as a
read-only inference worker. --memory embedded starts a local Ray cluster and a memory cluster in
this process (or attaches to `engram-mem up`'s), imports the checkpoint's tables when the cluster
lacks them, and shuts all of it down on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from pathlib import Path


def _parse_autoscale(value: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in value.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--autoscale takes MIN:MAX, e.g. 1:4; got {value!r}") from None
    return lo, hi


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engram-serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory written by engram-train (…/ckpt)")
    p.add_argument("--memory", default=None, metavar="RAY_ADDRESS",
                   help="Engram rows from the memory cluster at this Ray address; 'local': the `engram-mem up` "
                        "one; 'embedded': start one in this process (or use `engram-mem up`'s)")
    p.add_argument("--memory-name", default="engram-mem")
    p.add_argument("--shards", type=int, default=2, help="with --memory embedded: shards of a cluster started here")
    p.add_argument("--import-tables", action="store_true", help="write the checkpoint's tables into the cluster first")
    p.add_argument("--cache-mb", type=int, default=64, help="hot-row cache per table and replica (with --memory)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default="engram", help="the model id clients pass (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=16, help="running sequences per engine (replica)")
    p.add_argument("--policy", choices=["continuous", "static"], default="continuous",
                   help="static: admit a new batch only when the running one has finished (the baseline)")
    p.add_argument("--prefill-chunk", type=int, default=64,
                   help="prompt positions prefilled between two decode steps of the running requests")
    p.add_argument("--default-max-tokens", type=int, default=16, help="max_tokens when a request gives none")
    p.add_argument("--device", default="cpu")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--replicas", type=int, default=None, help="Ray Serve deployment with N replicas")
    g.add_argument("--autoscale", type=_parse_autoscale, default=None, metavar="MIN:MAX",
                   help="Ray Serve deployment autoscaling between MIN and MAX replicas")
    p.add_argument("--replica-cpus", type=float, default=1.0)
    p.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs per replica (places replicas on GPU nodes)")
    p.add_argument("--replica-resources", type=json.loads, default={}, metavar="JSON",
                   help='custom Ray resources per replica, e.g. \'{"inference_node": 1}\'')
    return p


def _memory_client(args):
    """(client, Ray address) of the memory cluster --memory names; the client owns what it started."""
    import engram_mem

    if args.memory == "embedded":
        mem = engram_mem.connect(None, shards=args.shards, name=args.memory_name)
    else:
        from engram_model.train_cli import _resolve_memory

        mem = engram_mem.connect(_resolve_memory(args.memory, args.memory_name), name=args.memory_name)
    import ray

    return mem, ray.get_runtime_context().gcs_address


def _ensure_tables(args, mem) -> None:
    """Import the checkpoint's tables when asked, or when an embedded cluster does not have them yet."""
    from engram_model.cluster_rows import ClusterRows
    from engram_model.config import ModelConfig
    from engram_model.rows import table_specs

    cfg = ModelConfig.from_dict(json.loads((Path(args.checkpoint) / "config.json").read_text())["model"])
    specs = table_specs(cfg)
    have = mem.tables()
    missing = [s.name for s in specs.values() if s.name not in have]
    if not specs or not (args.import_tables or (missing and args.memory == "embedded")):
        if missing:
            raise SystemExit(f"engram-serve: the memory cluster lacks tables {missing}; pass --import-tables to "
                             f"write the checkpoint's own tables into it")
        return
    tables = Path(args.checkpoint) / "tables.safetensors"
    if not tables.exists():
        raise SystemExit(f"engram-serve: {args.checkpoint} has no tables.safetensors to import; its tables live in "
                         f"the memory cluster it was trained with")
    from safetensors.torch import load_file

    writer = ClusterRows(mem, specs, train=False, node_local=False)
    writer.load_state_dict(load_file(str(tables)))
    writer.close()


def _wait_for_signal() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    mem = address = None
    if args.memory:
        mem, address = _memory_client(args)
        _ensure_tables(args, mem)
    if args.replicas is None and args.autoscale is None:
        return _serve_in_process(args, mem)
    if mem is None:
        raise SystemExit("engram-serve: --replicas/--autoscale need a Ray cluster: pass --memory (RAY_ADDRESS, "
                         "'local' or 'embedded')")
    from ray import serve

    from engram_model.deployment import ServeSpec, deploy

    spec = ServeSpec(checkpoint=str(Path(args.checkpoint).resolve()), memory_address=address,
                     memory_name=args.memory_name, model_name=args.model_name, replicas=args.replicas or 1,
                     autoscale=args.autoscale, max_batch=args.max_batch, policy=args.policy, cache_mb=args.cache_mb,
                     prefill_chunk=args.prefill_chunk,
                     device=args.device, num_cpus=args.replica_cpus, num_gpus=args.replica_gpus,
                     replica_resources=args.replica_resources, host=args.host, port=args.port,
                     default_max_tokens=args.default_max_tokens)
    try:
        url = deploy(spec)
        scale = f"autoscaling {args.autoscale[0]}-{args.autoscale[1]}" if args.autoscale else f"{args.replicas}"
        print(f"engram-serve: {url}/v1 ({scale} Ray Serve replicas, rows from the memory cluster at {address})",
              flush=True)
        _wait_for_signal()
    finally:
        serve.shutdown()
        mem.close()
    return 0


def _serve_in_process(args, mem) -> int:
    import uvicorn

    from engram_model.engine import Engine, EngineConfig
    from engram_model.openai_api import make_app

    if mem is not None:
        from engram_model.cluster_rows import load_for_inference

        model, tok = load_for_inference(args.checkpoint, mem, device=args.device, cache_bytes=args.cache_mb << 20)
    else:
        from engram_model.checkpoint import load_model

        model, tok = load_model(args.checkpoint, device=args.device)
    engine = Engine(model, tok, EngineConfig(max_batch=args.max_batch, policy=args.policy,
                                                  prefill_chunk=args.prefill_chunk))
    app = make_app(engine, args.model_name, args.default_max_tokens)
    print(f"engram-serve: http://{args.host}:{args.port}/v1 (rows from "
          f"{'the memory cluster' if mem is not None else 'in-process tables'})", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()
        if model.rows is not None:
            model.rows.close()
        if mem is not None:
            mem.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
