"""The OpenAI-compatible HTTP API (FastAPI + pydantic) over an Engine; served by uvicorn or Ray Serve.

    app = make_app(engine, model_name="engram")       # then uvicorn.run(app) — see serve.py
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="engram", prompt="def main(", max_tokens=32, temperature=0)
    client.chat.completions.create(model="engram", messages=[{"role": "user", "content": "hi"}], stream=True)

POST /v1/completions       prompt (a string, a list of them, token ids or lists of them), max_tokens, temperature, top_p, top_k,
                           stop, seed, n, stream (server-sent events), stream_options.include_usage,
                           and vLLM's ignore_eos (fixed-length outputs, for load tests)
POST /v1/chat/completions  the same with messages, put through CHAT_TEMPLATE
GET  /v1/models, GET /health, GET /stats (the engine's counters and the memory-cluster rows' stats)

Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a request that
does not validate (unknown fields too) or whose prompt exceeds the context
(code context_length_exceeded), 404 for an unknown model or path, 405 for a wrong method, 500 when
generation fails. A failure ends only its own request. Features our models do not have (logprobs,
echo, penalties, logit_bias, best_of, suffix, tools) are refused with a 400 naming the field rather
than silently ignored. A streamed request whose client goes away is cancelled at the next token.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from engram_model.engine import Engine, PromptTooLong, SamplingParams

# Our models are small and trained on code; a plain-text transcript is template enough.
CHAT_TEMPLATE = {"system": "System: {}\n\n", "user": "User: {}\n\n", "assistant": "Assistant: {}\n\n"}
CHAT_PROMPT_END = "Assistant:"
CHAT_STOP = "\n\nUser:"            # the model starting the user's next turn ends its own
MAX_N = 16


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ---- request bodies ---------------------------------------------------------------------------
class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)              # -1 or None: no top-k (vLLM's convention)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False                           # vLLM's extension: fixed-length outputs for load tests

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v):
        if v == 0:
            raise ValueError("top_k must be >= 1, or -1 for none")
        return None if v == -1 else v

    def unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported by this server; leave it at 0", param=name)

    def sampling(self, default_max: int, extra_stop: list[str] = (), choice: int = 0) -> SamplingParams:
        seed = None if self.seed is None else self.seed + choice     # n choices: different draws
        return SamplingParams(max_tokens=self.max_tokens or default_max, temperature=self.temperature,
                              top_p=self.top_p if self.top_p < 1 else None, top_k=self.top_k,
                              stop=list(self.stop or []) + list(extra_stop), seed=seed,
                              stop_at_eos=not self.ignore_eos)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]     # text, texts, token ids, lists of token ids
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None

    def unsupported(self) -> None:
        super().unsupported()
        for name, ok in (("echo", not self.echo), ("logprobs", self.logprobs is None),
                         ("best_of", self.best_of in (None, self.n)), ("suffix", self.suffix is None),
                         ("logit_bias", not self.logit_bias)):
            if not ok:
                raise APIError(400, f"{name} is not supported by this server; leave it out", param=name)
        if isinstance(self.prompt, list) and not self.prompt:
            raise APIError(400, "prompt is an empty list; give a string or a list of strings", param="prompt")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise APIError(400, "only text content parts are supported", param="messages")
            parts.append(p["text"])
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    tools: list | None = None

    def unsupported(self) -> None:
        super().unsupported()
        for name, ok in (("logprobs", not self.logprobs), ("tools", not self.tools)):
            if not ok:
                raise APIError(400, f"{name} is not supported by this server; leave it out", param=name)

    def prompt(self) -> str:
        out = []
        for m in self.messages:
            role = "system" if m.role == "developer" else m.role
            out.append(CHAT_TEMPLATE[role].format(m.text()))
        return "".join(out) + CHAT_PROMPT_END


# ---- running requests on the engine ---------------------------------------------------------
class Run:
    """Several sequences of one request on the engine, their events merged into one async stream."""

    def __init__(self, engine: Engine, jobs: list[tuple[str, SamplingParams]], param: str):
        self.engine = engine
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.seqs = []
        try:
            for i, (prompt, params) in enumerate(jobs):
                sink = (lambda d, f, i=i: loop.call_soon_threadsafe(self.queue.put_nowait, (i, d, f)))
                self.seqs.append(engine.submit(prompt, params, sink))
        except PromptTooLong as e:
            self.cancel()
            raise APIError(400, str(e), param=param, code="context_length_exceeded") from None
        except ValueError as e:
            self.cancel()
            raise APIError(400, str(e), param=param) from None

    async def events(self):
        """(choice index, text delta, finish reason or None) until every choice has finished."""
        left = len(self.seqs)
        try:
            while left:
                i, delta, finish = await self.queue.get()
                if finish is not None:
                    left -= 1
                    if finish.startswith("error:"):
                        raise APIError(500, f"generation failed: {finish[6:]}", type_="server_error")
                yield i, delta, finish
        finally:
            self.cancel()

    def cancel(self) -> None:
        for s in self.seqs:
            if not s.done:
                self.engine.cancel(s)

    def usage(self, n: int) -> dict:
        """Token counts; the n choices of a prompt count its tokens once, as OpenAI does."""
        p = sum(len(s.prompt_ids) - 1 for s in self.seqs[::n])
        c = sum(len(s.out_ids) for s in self.seqs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _collect(run, n: int) -> tuple[list[str], list]:
    """The whole text and finish reason of each of a non-streamed request's n choices."""
    texts, finishes = [""] * n, [None] * n
    async for i, delta, finish in run.events():
        texts[i] += delta
        finishes[i] = finish or finishes[i]
    return texts, finishes


def _sse(doc) -> str:
    return f"data: {json.dumps(doc)}\n\n"


async def _guarded(chunks):
    """SSE chunks; a failure after the 200 went out becomes an error event, then the stream ends."""
    try:
        async for c in chunks:
            yield c
    except APIError as e:
        yield _sse(error_body(e.message, e.type, e.param, e.code))


def make_app(engine: Engine, model_name: str = "engram", default_max_tokens: int = 16,
             fingerprint: str = "engram-local") -> FastAPI:
    """The API over one engine; responses carry `fingerprint` (which replica answered) as system_fingerprint."""
    app = FastAPI(title="engram-serve", description="OpenAI-compatible API for an Engram-MoE model")
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = "; ".join(f"{'.'.join(str(x) for x in er.get('loc', ()) if x != 'body') or 'body'}: {er.get('msg')}"
                        for er in errs[:5])
        if not param:   # the body itself: not JSON, or sent without Content-Type: application/json
            msg += " (the body must be a JSON object, sent with Content-Type: application/json)"
        return JSONResponse(error_body(f"invalid request: {msg}", "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        msg = (f"no route {request.method} {request.url.path}; see /v1/completions, /v1/chat/completions, /v1/models"
               if e.status_code in (404, 405) else str(e.detail))
        return JSONResponse(error_body(msg, "invalid_request_error", code=str(e.status_code)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception):
        return JSONResponse(error_body(f"{type(e).__name__}: {e}", "server_error"), status_code=500)

    def check_model(req: _Sampling) -> None:
        if req.model != model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        req.unsupported()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/stats")
    async def stats():
        return {**engine.summary(), "replica": fingerprint}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "engram"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        check_model(req)
        p = req.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else p
        jobs = [(p, req.sampling(default_max_tokens, choice=j)) for p in prompts for j in range(req.n)]
        run = Run(engine, jobs, "prompt")
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                "system_fingerprint": fingerprint}
        if req.stream:
            async def stream():
                async for i, delta, finish in run.events():
                    if delta or finish:
                        yield _sse({**base, "choices": [{"index": i, "text": delta, "logprobs": None,
                                                         "finish_reason": finish}]})
                if (req.stream_options or {}).get("include_usage"):
                    yield _sse({**base, "choices": [], "usage": run.usage(req.n)})
                yield "data: [DONE]\n\n"
            return StreamingResponse(_guarded(stream()), media_type="text/event-stream")
        texts, finishes = await _collect(run, len(jobs))
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                   for i, (t, f) in enumerate(zip(texts, finishes))]
        return {**base, "choices": choices, "usage": run.usage(req.n)}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest):
        check_model(req)
        if req.max_completion_tokens is not None:
            req.max_tokens = req.max_completion_tokens
        prompt = req.prompt()
        jobs = [(prompt, req.sampling(default_max_tokens, [CHAT_STOP], choice=j)) for j in range(req.n)]
        run = Run(engine, jobs, "messages")
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
                "system_fingerprint": fingerprint}
        if req.stream:
            chunk = {**base, "object": "chat.completion.chunk"}

            async def stream():
                for j in range(req.n):
                    yield _sse({**chunk, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""},
                                                      "logprobs": None, "finish_reason": None}]})
                async for i, delta, finish in run.events():
                    if delta:
                        yield _sse({**chunk, "choices": [{"index": i, "delta": {"content": delta},
                                                          "logprobs": None, "finish_reason": None}]})
                    if finish:
                        yield _sse({**chunk, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                                          "finish_reason": finish}]})
                if (req.stream_options or {}).get("include_usage"):
                    yield _sse({**chunk, "choices": [], "usage": run.usage(req.n)})
                yield "data: [DONE]\n\n"
            return StreamingResponse(_guarded(stream()), media_type="text/event-stream")
        texts, finishes = await _collect(run, len(jobs))
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                    "finish_reason": f} for i, (t, f) in enumerate(zip(texts, finishes))]
        return {**base, "choices": choices, "usage": run.usage(req.n)}

    return app
