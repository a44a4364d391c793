"""engram-serve: answer generation requests over HTTP, batching prompts that arrive together.

    engram-serve --checkpoint runs/demo/ckpt --memory 127.0.0.2:6379      # Engram rows from the cluster
    engram-serve --checkpoint runs/small/ckpt                              # in-process tables
    curl -s localhost:8000/generate -d '{"prompt": "def main(", "max_new_tokens": 32}'

POST /generate  {"prompt": str, "max_new_tokens": 64, "temperature": 0.0, "top_k": null, "top_p": null,
                 "seed": null}  ->  {"completion": str, "batch_size": int, "seconds": float}
GET  /health    {"status": "ok"}
GET  /stats     requests, batches, mean batch size, tokens/s, and where the Engram rows came from

Requests that arrive within --batch-window-ms of each other (up to --max-batch) are decoded
together when they share sampling settings: generate() left-pads prompts of different lengths into
one batch, and each completion equals what the prompt would get alone (greedy). Bad requests get HTTP 400 with a message naming the field; the server keeps serving.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import queue
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from engram_model.generate import generate


@dataclass
class Request:
    prompt: str
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future, repr=False)

    @classmethod
    def parse(cls, body: bytes, max_new_tokens_limit: int) -> "Request":
        try:
            d = json.loads(body or b"{}")
        except json.JSONDecodeError as e:
            raise ValueError(f"body is not JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError("body must be a JSON object")
        unknown = set(d) - {"prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed"}
        if unknown:
            raise ValueError(f"unknown field(s): {', '.join(sorted(unknown))}")
        if not isinstance(d.get("prompt"), str) or not d["prompt"]:
            raise ValueError("field 'prompt' must be a non-empty string")
        r = cls(prompt=d["prompt"], max_new_tokens=min(64, max_new_tokens_limit))
        for name, typ in (("max_new_tokens", int), ("temperature", (int, float)), ("top_k", int),
                          ("top_p", (int, float)), ("seed", int)):
            if d.get(name) is not None:
                if not isinstance(d[name], typ) or isinstance(d[name], bool):
                    raise ValueError(f"field {name!r} has the wrong type: {d[name]!r}")
                setattr(r, name, d[name])
        if not 1 <= r.max_new_tokens <= max_new_tokens_limit:
            raise ValueError(f"field 'max_new_tokens' is {r.max_new_tokens}; must be in [1, {max_new_tokens_limit}]")
        if r.temperature < 0:
            raise ValueError(f"field 'temperature' is {r.temperature}; must be >= 0")
        if r.top_k is not None and r.top_k < 1:
            raise ValueError(f"field 'top_k' is {r.top_k}; must be >= 1")
        if r.top_p is not None and not 0 < r.top_p <= 1:
            raise ValueError(f"field 'top_p' is {r.top_p}; must be in (0, 1]")
        return r

    def settings(self) -> tuple:
        return (self.max_new_tokens, float(self.temperature), self.top_k, self.top_p, self.seed)


class Batcher:
    """One thread runs the model; requests queue up and leave in batches."""

    def __init__(self, model, tokenizer, max_batch: int = 8, window_ms: float = 10.0):
        self.model, self.tok = model, tokenizer
        self.max_batch, self.window = max_batch, window_ms / 1000
        self.queue: queue.Queue[Request | None] = queue.Queue()
        self.stats = {"requests": 0, "batches": 0, "new_tokens": 0, "busy_s": 0.0, "errors": 0}
        self._thread = threading.Thread(target=self._run, name="engram-serve-batcher", daemon=True)
        self._thread.start()

    def submit(self, r: Request) -> concurrent.futures.Future:
        self.queue.put(r)
        return r.future

    def _run(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.window
            while len(batch) < self.max_batch:
                try:
                    r = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if r is None:
                    self.queue.put(None)
                    break
                batch.append(r)
            groups: dict[tuple, list[Request]] = {}
            for r in batch:
                groups.setdefault(r.settings(), []).append(r)
            for (n, temp, top_k, top_p, seed), reqs in groups.items():
                t0 = time.perf_counter()
                try:
                    texts = generate(self.model, self.tok, [r.prompt for r in reqs], max_new_tokens=n,
                                     temperature=temp, top_k=top_k, top_p=top_p, seed=seed)
                except Exception as e:  # noqa: BLE001 - fail these requests, keep serving
                    self.stats["errors"] += len(reqs)
                    for r in reqs:
                        r.future.set_exception(e)
                    continue
                dt = time.perf_counter() - t0
                self.stats["batches"] += 1
                self.stats["requests"] += len(reqs)
                self.stats["busy_s"] += dt
                self.stats["new_tokens"] += sum(len(self.tok.encode(t)) for t in texts)
                for r, text in zip(reqs, texts):
                    r.future.set_result({"completion": text, "batch_size": len(reqs), "seconds": dt})

    def summary(self) -> dict:
        s = dict(self.stats)
        s["mean_batch"] = s["requests"] / s["batches"] if s["batches"] else 0.0
        s["tokens_per_s"] = s["new_tokens"] / s["busy_s"] if s["busy_s"] else 0.0
        rows = getattr(self.model, "rows", None)
        if rows is not None and hasattr(rows, "stats"):
            s["rows"] = rows.stats()
        return s

    def close(self) -> None:
        self.queue.put(None)
        self._thread.join(timeout=30)


def make_http_server(batcher: Batcher, host: str = "127.0.0.1", port: int = 8000,
                     max_new_tokens_limit: int = 512, timeout_s: float = 300.0) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, code: int, doc: dict) -> None:
            body = json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802 - http.server's naming
            if self.path == "/health":
                self._reply(200, {"status": "ok"})
            elif self.path == "/stats":
                self._reply(200, batcher.summary())
            else:
                self._reply(404, {"error": f"no such path {self.path!r}; try POST /generate, GET /health, GET /stats"})

        def do_POST(self):  # noqa: N802
            if self.path != "/generate":
                self._reply(404, {"error": f"no such path {self.path!r}; POST /generate"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > 1 << 20:
                self._reply(413, {"error": f"body is {length} bytes; the limit is 1 MiB"})
                return
            try:
                req = Request.parse(self.rfile.read(length), max_new_tokens_limit)
            except ValueError as e:
                self._reply(400, {"error": str(e)})
                return
            try:
                self._reply(200, batcher.submit(req).result(timeout_s))
            except ValueError as e:  # e.g. a prompt longer than the model's context
                self._reply(400, {"error": str(e)})
            except Exception as e:  # noqa: BLE001
                self._reply(500, {"error": f"{type(e).__name__}: {e}"})

        def log_message(self, fmt, *args):  # quiet by default
            pass

    return ThreadingHTTPServer((host, port), Handler)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="engram-serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--memory", help="Ray address of the memory cluster holding the Engram tables")
    p.add_argument("--memory-name", default="engram-mem")
    p.add_argument("--import-tables", action="store_true", help="write the checkpoint's tables into the cluster first")
    p.add_argument("--cache-mb", type=int, default=64, help="hot-row cache per table (with --memory)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--batch-window-ms", type=float, default=10.0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    mem = None
    if args.memory:
        import engram_mem
        from engram_model.cluster_rows import load_for_inference

        mem = engram_mem.connect(args.memory, name=args.memory_name,
                                 read_only=not args.import_tables)  # inference only reads rows
        model, tok = load_for_inference(args.checkpoint, mem, device=args.device, cache_bytes=args.cache_mb << 20,
                                        import_tables=args.import_tables)
    else:
        from engram_model.checkpoint import load_model

        model, tok = load_model(args.checkpoint, device=args.device)
    batcher = Batcher(model, tok, max_batch=args.max_batch, window_ms=args.batch_window_ms)
    server = make_http_server(batcher, args.host, args.port)
    print(f"engram-serve: http://{args.host}:{server.server_address[1]}/generate "
          f"(rows from {'the memory cluster at ' + args.memory if args.memory else 'in-process tables'})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        batcher.close()
        if mem is not None:
            mem.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
