"""Engine: continuous batching for generation; requests join and leave the decode batch at token boundaries.

    engine = Engine(model, tok, EngineConfig(max_batch=16))           # starts its scheduler thread
    seq = engine.submit("def main(", SamplingParams(max_tokens=32), on_event=print)
    texts = engine.generate(["class A:", "import os"], SamplingParams(max_tokens=16))   # blocking helper
    engine.close()

One thread owns the model. Each loop turn is one token boundary:
  1. admit: waiting requests (up to max_batch running) are prefilled together, left-padded, in
     chunks of prefill_chunk positions, one chunk per turn, so that a long prompt does not stall
     the running sequences' next token for its whole prefill (prefetch_ahead: the next chunk's
     Engram rows are fetched while this one computes, EngramModel.prefetch); after the last chunk their first
     token is sampled (time to first token) and those not already done are merged into the
     running batch's cache (batch_cache.merge_caches);
  2. decode: one forward of every running sequence's last token, one new token each;
  3. leave: finished (EOS, a stop string, max_tokens, context full) or cancelled sequences are
     dropped from the cache, so the batch shrinks at once instead of padding out to the longest.
policy="static" is the baseline it replaces: a new batch is admitted only when the running one has
drained entirely (request-level batching). bench/bench_serving.py measures both.

Every request samples with its own torch.Generator (seeded by `seed`, else random), so a seeded
request draws the same tokens whichever batch it lands in; greedy requests get the tokens they
would get alone (the logits are equal up to float summation order; tests/unit/model/test_engine.py). Events go to on_event(delta, finish_reason),
called on the engine thread: text deltas as they become final (text that may still turn out to be
the start of a stop string, or a partial UTF-8 character, is held back), then one call with the
finish reason ("stop" or "length"), or ("", "error:<message>") when the model failed. A model
failure fails the running requests only; the engine keeps serving.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from engram_model.batch_cache import merge_caches
from engram_model.generate import sample_next


class PromptTooLong(ValueError):
    """The prompt does not fit the model's context (maps to OpenAI's context_length_exceeded)."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stop_at_eos: bool = True

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")


@dataclass
class EngineConfig:
    max_batch: int = 16            # running sequences at most
    policy: str = "continuous"     # or "static": admit only into an empty batch (the baseline)
    prefill_chunk: int = 64        # prompt positions prefilled per turn (between two decode steps)
    prefetch_ahead: bool = True    # fetch the next chunk's Engram rows while this chunk and the decode step run

    def __post_init__(self):
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
        if self.policy not in ("continuous", "static"):
            raise ValueError(f"policy must be 'continuous' or 'static', got {self.policy!r}")


Sink = Callable[[str, str | None], None]     # (text delta, finish reason or None)


@dataclass(eq=False)
class Sequence:
    id: int
    prompt_ids: list[int]           # EOS + prompt tokens
    params: SamplingParams
    budget: int                     # tokens it may get: max_tokens, fewer when the context fills first
    on_event: Sink
    generator: torch.Generator | None
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0                # characters of text sent
    finish_reason: str | None = None
    cancelled: bool = False
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class _Prefill:
    seqs: list[Sequence]
    prompt: torch.Tensor            # int64 [b, T0], left-padded
    n_pad: torch.Tensor             # int64 [b]
    cache: object                   # model.Cache, cache.pos = positions prefilled so far


class Engine:
    def __init__(self, model, tokenizer, config: EngineConfig | None = None):
        self.model, self.tok = model.eval(), tokenizer
        self.cfg = config or EngineConfig()
        self.device = next(model.parameters()).device
        self.waiting: queue.Queue[Sequence | None] = queue.Queue()
        self.running: list[Sequence] = []
        self.cache = None
        self.prefilling: _Prefill | None = None      # joining requests, part-way through their prompts
        self._ids = itertools.count()
        self.stats = {"requests": 0, "finished": 0, "errors": 0, "prefills": 0, "decode_steps": 0,
                      "decode_rows": 0, "new_tokens": 0, "busy_s": 0.0}
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="engram-engine", daemon=True)
        self._thread.start()

    # ---- API -----------------------------------------------------------------------------
    def submit(self, prompt: str | list[int], params: SamplingParams, on_event: Sink) -> Sequence:
        """Queue one request; raises PromptTooLong / ValueError at once for requests it cannot serve."""
        if self._closed:
            raise RuntimeError("the engine is closed")
        ids = [self.tok.eos_id] + (self.tok.encode(prompt) if isinstance(prompt, str) else list(prompt))
        bad = [t for t in ids if not 0 <= t < self.model.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {self.model.cfg.vocab_size}), got {bad[0]}")
        limit = self.model.cfg.max_seq_len
        if len(ids) > limit:
            raise PromptTooLong(f"the prompt is {len(ids) - 1} tokens (+1 for the start token); this model's "
                                f"context is {limit} tokens")
        gen = None
        if params.temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed) if params.seed is not None else gen.seed()
        budget = min(params.max_tokens, limit - len(ids) + 1)      # the last token drawn is never fed back
        seq = Sequence(next(self._ids), ids, params, budget, on_event, gen)
        self.stats["requests"] += 1
        self.waiting.put(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Drop a request (e.g. its client went away); it leaves at the next token boundary."""
        seq.cancelled = True

    def generate(self, prompts: list[str], params: SamplingParams, timeout: float = 600.0) -> list[str]:
        """Blocking: completions of all prompts, submitted at once (they batch continuously)."""
        done = [threading.Event() for _ in prompts]
        out = [""] * len(prompts)
        errors = []

        def sink(i):
            def on_event(delta, finish):
                out[i] += delta
                if finish is not None:
                    if finish.startswith("error:"):
                        errors.append(finish)
                    done[i].set()
            return on_event

        for i, p in enumerate(prompts):
            self.submit(p, params, sink(i))
        for e in done:
            if not e.wait(timeout):
                raise TimeoutError(f"generation did not finish in {timeout}s")
        if errors:
            raise RuntimeError(errors[0])
        return out

    def summary(self) -> dict:
        s = dict(self.stats)
        s["running"], s["waiting"] = len(self.running), self.waiting.qsize()
        s["mean_batch"] = s["decode_rows"] / s["decode_steps"] if s["decode_steps"] else 0.0
        s["tokens_per_s"] = s["new_tokens"] / s["busy_s"] if s["busy_s"] else 0.0
        rows = getattr(self.model, "rows", None)
        if rows is not None and hasattr(rows, "stats"):
            s["rows"] = rows.stats()
        return s

    def close(self) -> None:
        self._closed = True
        self.waiting.put(None)
        self._thread.join(timeout=60)

    # ---- the loop ------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            new = self._admit() if self.prefilling is None else []
            if new is None:
                return
            t0 = time.perf_counter()
            try:
                with torch.inference_mode():
                    if new:
                        self.prefilling = self._start_prefill(new)
                    if self.prefilling is not None:
                        self._prefill_chunk()
                    if self.running:
                        self._decode()
            except Exception as e:  # noqa: BLE001 - fail the requests in flight, keep serving
                joining = self.prefilling.seqs if self.prefilling is not None else []
                self.prefilling = None
                self._fail(self.running + [s for s in joining if not s.done], e)
            self.stats["busy_s"] += time.perf_counter() - t0

    def _admit(self) -> list[Sequence] | None:
        """Waiting requests to prefill now (blocks while there is nothing to do); None: shut down."""
        if self.cfg.policy == "static" and self.running:
            return []
        room = self.cfg.max_batch - len(self.running)
        new = []
        while len(new) < room:
            try:
                seq = self.waiting.get(block=not self.running and not new)
            except queue.Empty:
                break
            if seq is None:
                return None
            if seq.cancelled:
                self._finish(seq, "cancelled", notify=False)
                continue
            new.append(seq)
        return new

    def _start_prefill(self, seqs: list[Sequence]) -> "_Prefill":
        T0 = max(len(s.prompt_ids) for s in seqs)
        prompt = torch.full((len(seqs), T0), self.tok.pad_id, dtype=torch.int64)              # [b, T0]
        for row, s in enumerate(seqs):
            prompt[row, T0 - len(s.prompt_ids):] = torch.tensor(s.prompt_ids)
        n_pad = torch.tensor([T0 - len(s.prompt_ids) for s in seqs], dtype=torch.int64)       # [b]
        cache = self.model.new_cache(len(seqs), max_len=T0)
        self.stats["prefills"] += 1
        return _Prefill(seqs, prompt.to(self.device), n_pad.to(self.device), cache)

    def _prefill_chunk(self) -> None:
        """The next chunk of the joining requests' prompts; after the last, they join the batch."""
        pf = self.prefilling
        T0, start = pf.prompt.shape[1], pf.cache.pos
        end = min(T0, start + self.cfg.prefill_chunk)
        if self.cfg.prefetch_ahead:  # a remote RowSource's fetches: this chunk's first, then the next's
            if start == 0:
                self.model.prefetch(pf.prompt[:, :end], n_pad=pf.n_pad)
            if end < T0:
                self.model.prefetch(pf.prompt[:, end:min(T0, end + self.cfg.prefill_chunk)], n_pad=pf.n_pad,
                                    before=pf.prompt[:, :end])
        logits, _ = self.model(pf.prompt[:, start:end], cache=pf.cache,
                               n_pad=pf.n_pad if start == 0 else None)                       # [b, chunk, V]
        if end < T0:
            return
        self.prefilling = None
        seqs, cache = pf.seqs, pf.cache
        self._sample(seqs, logits[:, -1])
        keep_new = [i for i, s in enumerate(seqs) if not s.done]
        keep_old = [i for i, s in enumerate(self.running) if not s.done]
        self._reform([(self.cache, keep_old), (cache, keep_new)],
                     [self.running[i] for i in keep_old] + [seqs[i] for i in keep_new])

    def _decode(self) -> None:
        last = torch.tensor([s.out_ids[-1] for s in self.running], dtype=torch.int64, device=self.device)
        logits, _ = self.model(last[:, None], cache=self.cache)                               # [B, 1, V]
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(self.running)
        self._sample(self.running, logits[:, -1])
        keep = [i for i, s in enumerate(self.running) if not s.done]
        if len(keep) < len(self.running):
            self._reform([(self.cache, keep)], [self.running[i] for i in keep])

    def _reform(self, parts, running: list[Sequence]) -> None:
        """The running batch becomes `running`, whose rows are the `parts` rows in this order."""
        self.running = running
        if not running:
            self.cache = None
            return
        extra = max(s.budget - len(s.out_ids) for s in running)    # decode forwards still to come
        self.cache = merge_caches(self.model, [(c, rows) for c, rows in parts if c is not None], extra)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """logits [B, V], row b for seqs[b]: draw, append and emit one token per sequence."""
        greedy = [b for b, s in enumerate(seqs) if s.generator is None]
        nxt = [0] * len(seqs)
        if greedy:
            picks = logits[greedy].float().argmax(-1).tolist()
            for b, t in zip(greedy, picks):
                nxt[b] = t
        for b, s in enumerate(seqs):
            if s.generator is not None:
                p = s.params
                nxt[b] = int(sample_next(logits[b:b + 1], p.temperature, p.top_k, p.top_p, s.generator)[0])
        now = time.perf_counter()
        for s, t in zip(seqs, nxt):
            if s.t_first is None:
                s.t_first = now
            self.stats["new_tokens"] += 1
            self._append(s, t)

    def _append(self, s: Sequence, token: int) -> None:
        if s.cancelled:
            self._finish(s, "cancelled", notify=False)
            return
        if s.params.stop_at_eos and token == self.tok.eos_id:
            self._finish(s, "stop")
            return
        s.out_ids.append(token)
        s.text = self.tok.decode(s.out_ids)
        finish = None
        cut = min((i for i in (s.text.find(x) for x in s.params.stop) if i >= 0), default=-1)
        if cut >= 0:
            s.text, finish = s.text[:cut], "stop"
        elif len(s.out_ids) >= s.budget:
            finish = "length"
        if finish is not None:
            self._finish(s, finish)
            return
        # Hold back what may still become a stop string, and a partial UTF-8 character.
        end = len(s.text) - max((len(x) - 1 for x in s.params.stop), default=0)
        while end > s.emitted and s.text[end - 1] == "\ufffd":
            end -= 1
        if end > s.emitted:
            delta, s.emitted = s.text[s.emitted:end], end
            s.on_event(delta, None)

    def _finish(self, s: Sequence, reason: str, notify: bool = True) -> None:
        s.finish_reason = reason
        self.stats["finished"] += 1
        if notify:
            delta, s.emitted = s.text[s.emitted:], len(s.text)
            s.on_event(delta, reason)

    def _fail(self, seqs: list[Sequence], e: Exception) -> None:
        self.stats["errors"] += len(seqs)
        for s in seqs:
            if not s.done:
                s.finish_reason = "error"
                s.on_event("", f"error:{type(e).__name__}: {e}")
        self.running, self.cache = [], None
