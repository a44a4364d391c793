"""The workload: batch shapes, workers, and the n-gram id distribution (Zipf or a recorded trace).

    from engram_mem.plan.workload import Zipf, TraceDistribution, Workload
    z = Zipf(rows=384_000_000, s=1.0)
    z.hit_rate(cache_rows=16_384, policy="lfu")     # share of lookups a static top-16k cache serves
    z.rows_for_hit_rate(0.5, policy="lru")          # rows an LRU cache needs for a 50% hit rate
    z.distinct(draws=24 * 8)                        # expected distinct rows among 192 lookups
    TraceDistribution.load("runs/ids.npz", layer=1)  # the same from ids engram-train recorded

Zipf over a table of N rows: row of rank i is read with probability p_i = i^-s / H(N, s). Sums
over 10^8-10^9 ranks run on ~4,000 log-spaced rank bins (exact for the first 1,024 ranks, then
each bin's mass from the Hurwitz-zeta-style integral of i^-s; within a bin every rank has its
midpoint probability): relative error well under 1% (a unit test checks against exact sums).

Cache hit rates: "lfu" is a cache that holds the C most frequent rows (the ideal static cache;
TinyLFU admission, which the worker's RowCache uses, approaches it); "lru" uses Che's
approximation (characteristic time T with sum_i 1 - exp(-p_i T) = C; hit = sum_i p_i (1 - exp(-p_i T))),
which tests check against an exact LRU simulation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from engram_mem.plan.tiers import PlanInputError

_EXACT = 1024


class _Bins:
    """A rank-frequency distribution as (probability per rank, ranks per bin), most frequent first."""

    def __init__(self, p: np.ndarray, n: np.ndarray):
        self.p, self.n = p.astype(np.float64), n.astype(np.float64)     # [bins], [bins]
        self.cum_rows = np.cumsum(self.n)

    @property
    def rows(self) -> float:
        return float(self.cum_rows[-1])

    def head_mass(self, c: float) -> float:
        """Probability mass of the c most frequent rows."""
        c = min(max(c, 0.0), self.rows)
        take = np.clip(c - (self.cum_rows - self.n), 0, self.n)
        return float(np.sum(take * self.p))

    def hit_rate(self, cache_rows: float, policy: str = "lfu") -> float:
        if cache_rows <= 0:
            return 0.0
        if cache_rows >= self.rows:
            return 1.0
        if policy == "lfu":
            return self.head_mass(cache_rows)
        if policy != "lru":
            raise PlanInputError(f"cache policy must be 'lfu' or 'lru', got {policy!r}")
        t = self._che_time(cache_rows)
        return float(np.sum(self.n * self.p * -np.expm1(-self.p * t)))

    def _occupancy(self, t: float) -> float:
        return float(np.sum(self.n * -np.expm1(-self.p * t)))

    def _che_time(self, cache_rows: float) -> float:
        """Che's characteristic time T of an LRU cache of cache_rows rows: occupancy(T) == cache_rows."""
        lo, hi = 0.0, 1.0
        while self._occupancy(hi) < cache_rows:
            hi *= 2
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if self._occupancy(mid) < cache_rows else (lo, mid)
        return 0.5 * (lo + hi)

    def _seen(self, draws: float) -> np.ndarray:
        """Expected distinct rows per bin among `draws` independent lookups."""
        return self.n * -np.expm1(draws * np.log1p(-np.minimum(self.p, 1 - 1e-16)))

    def rows_for_hit_rate(self, target: float, policy: str = "lfu") -> float:
        if not 0 <= target < 1:
            raise PlanInputError(f"target hit rate must be in [0, 1), got {target}")
        lo, hi = 0.0, self.rows
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if self.hit_rate(mid, policy) < target else (lo, mid)
            if hi - lo < 1:
                break
        return float(np.ceil(hi))

    def distinct(self, draws: float) -> float:
        """Expected distinct rows among `draws` independent lookups."""
        return float(self._seen(draws).sum())

    def distinct_missing(self, draws: float, cache_rows: float, policy: str = "lfu") -> float:
        """Expected distinct rows among `draws` lookups that a cache of `cache_rows` rows does not hold."""
        seen = self._seen(draws)
        if cache_rows <= 0:
            return float(seen.sum())
        if cache_rows >= self.rows:
            return 0.0
        if policy == "lru":   # Che: row i is cached with probability 1 - exp(-p_i T)
            return float(np.sum(seen * np.exp(-self.p * self._che_time(cache_rows))))
        cached = np.clip(cache_rows - (self.cum_rows - self.n), 0, self.n)                # top rows held
        return float(np.sum(seen * (1 - cached / self.n)))

    def top_probs(self, k: int) -> np.ndarray:
        """Probabilities of the k most frequent rows, one per row."""
        out, left = [], k
        for p, n in zip(self.p, self.n):
            m = int(min(n, left))
            out.append(np.full(m, p))
            left -= m
            if left <= 0:
                break
        return np.concatenate(out) if out else np.zeros(0)


@dataclass(frozen=True)
class Zipf:
    rows: int
    s: float = 1.0
    bins: int = 4000

    def __post_init__(self):
        if self.rows < 1 or not 0 <= self.s <= 4:
            raise PlanInputError(f"Zipf needs rows >= 1 and 0 <= s <= 4, got rows={self.rows}, s={self.s}")

    @property
    def _b(self) -> _Bins:
        b = self.__dict__.get("_cache")
        if b is None:
            b = _zipf_bins(self.rows, self.s, self.bins)
            object.__setattr__(self, "_cache", b)
        return b

    def hit_rate(self, cache_rows: float, policy: str = "lfu") -> float:
        return self._b.hit_rate(cache_rows, policy)

    def rows_for_hit_rate(self, target: float, policy: str = "lfu") -> float:
        return self._b.rows_for_hit_rate(target, policy)

    def distinct(self, draws: float) -> float:
        return self._b.distinct(draws)

    def distinct_missing(self, draws: float, cache_rows: float, policy: str = "lfu") -> float:
        return self._b.distinct_missing(draws, cache_rows, policy)

    def top_probs(self, k: int) -> np.ndarray:
        return self._b.top_probs(k)

    def describe(self) -> str:
        return f"Zipf s={self.s} over {self.rows:,} rows (per hash head)"


def _zipf_bins(n: int, s: float, bins: int) -> _Bins:
    exact = np.arange(1, min(n, _EXACT) + 1, dtype=np.float64)
    w = [exact ** -s]
    cnt = [np.ones_like(exact)]
    if n > _EXACT:
        edges = np.unique(np.round(np.geomspace(_EXACT + 1, n + 1, bins)).astype(np.int64))
        lo, hi = edges[:-1].astype(np.float64), edges[1:].astype(np.float64)   # ranks [lo, hi)
        # Mass of ranks lo..hi-1 ~ integral of x^-s over [lo - 1/2, hi - 1/2]: exact to O(1/lo^2).
        a, b = lo - 0.5, hi - 0.5
        mass = np.log(b / a) if s == 1 else (b ** (1 - s) - a ** (1 - s)) / (1 - s)
        w.append(mass / (hi - lo))
        cnt.append(hi - lo)
    p, c = np.concatenate(w), np.concatenate(cnt)
    p /= np.sum(p * c)
    return _Bins(p, c)


@dataclass
class TraceDistribution:
    """The empirical distribution of row ids recorded from a real run (engram_model.trace).

    Rows within one forward are not independent draws: text repeats its own n-grams, so a batch
    holds fewer distinct rows than independent draws from the run-wide frequencies would give.
    From the recorded forwards (ids and distinct ids per call) it fits Heaps' law,
    distinct = a * lookups^b, and uses it for batches within 4x of the recorded sizes (b = 1 with
    one size recorded); the frequencies alone otherwise."""
    counts: np.ndarray                  # lookups per distinct id, most frequent first
    lookups_per_call: float             # mean ids per forward (all positions, duplicates included)
    distinct_per_call: float            # mean distinct ids per forward
    table_rows: int
    name: str = "trace"
    call_lookups: np.ndarray | None = None    # per recorded forward: ids
    call_distinct: np.ndarray | None = None   # per recorded forward: distinct ids

    def __post_init__(self):
        c = np.sort(np.asarray(self.counts, dtype=np.float64))[::-1]
        if c.size == 0 or c.sum() <= 0:
            raise PlanInputError(f"trace {self.name!r} holds no ids")
        self.counts = c
        self._bins = _Bins(c / c.sum(), np.ones_like(c))
        self.heaps = None
        if self.call_lookups is not None and len(self.call_lookups):
            n = np.asarray(self.call_lookups, float)
            d = np.asarray(self.call_distinct, float)
            ok = (n > 0) & (d > 0)
            n, d = n[ok], d[ok]
            if n.size and np.ptp(np.log(n)) > 0.3:
                b, log_a = np.polyfit(np.log(n), np.log(d), 1)
            else:
                b, log_a = 1.0, float(np.log(np.mean(d / n))) if n.size else 0.0
            self.heaps = (float(np.exp(log_a)), float(b), float(n.min()), float(n.max()))

    @classmethod
    def load(cls, path: str, layer: int | None = None) -> TraceDistribution:
        from engram_model.trace import load_trace  # numpy only; no torch needed to read a trace

        tr = load_trace(path)
        # One table's distribution (the planner applies it to each Engram layer); the first by default.
        layers = [layer if layer is not None else min(tr.layers)] if tr.layers else []
        for l in layers:
            if l not in tr.layers:
                raise PlanInputError(f"trace {path!r} has no layer {l}; layers: {sorted(tr.layers)}")
        ids = np.concatenate([tr.ids(l) + (10**12 * i) for i, l in enumerate(layers)])
        _, counts = np.unique(ids, return_counts=True)
        calls = sum(tr.calls(l) for l in layers)
        distinct = sum(tr.distinct_per_call(l) * tr.calls(l) for l in layers)
        # Per-call sizes of one layer (every layer sees the same batches): the planner asks per layer.
        l0 = layers[0]
        return cls(counts=counts, lookups_per_call=ids.size / max(calls, 1), distinct_per_call=distinct / max(calls, 1),
                   table_rows=int(sum(tr.table_rows.get(l, 0) for l in layers)), name=path,
                   call_lookups=tr.call_sizes(l0), call_distinct=tr._data[f"l{l0}.distinct"])

    def hit_rate(self, cache_rows: float, policy: str = "lfu") -> float:
        return self._bins.hit_rate(cache_rows, policy)

    def rows_for_hit_rate(self, target: float, policy: str = "lfu") -> float:
        return self._bins.rows_for_hit_rate(target, policy)

    def _heaps(self, draws: float) -> float | None:
        if self.heaps is None:
            return None
        a, b, lo, hi = self.heaps
        if not lo / 4 <= draws <= hi * 4:
            return None
        return min(a * draws ** b, draws)

    def distinct(self, draws: float) -> float:
        iid = self._bins.distinct(draws)
        h = self._heaps(draws)
        return iid if h is None else min(h, iid)

    def distinct_missing(self, draws: float, cache_rows: float, policy: str = "lfu") -> float:
        iid = self._bins.distinct(draws)
        miss = self._bins.distinct_missing(draws, cache_rows, policy)
        return miss * (self.distinct(draws) / iid if iid > 0 else 1.0)

    def top_probs(self, k: int) -> np.ndarray:
        return self._bins.top_probs(k)

    def fit_zipf(self) -> float:
        """Least-squares Zipf exponent of the rank-frequency curve (ranks 1..min(n, 10^5), log-log)."""
        c = self.counts[: min(self.counts.size, 100_000)]
        r = np.arange(1, c.size + 1)
        if c.size < 3:
            return 0.0
        return float(-np.polyfit(np.log(r), np.log(c), 1)[0])

    def describe(self) -> str:
        h = f", Heaps fit distinct = {self.heaps[0]:.2f} n^{self.heaps[1]:.2f}" if self.heaps else ""
        return (f"trace {self.name}: {self.counts.size:,} distinct ids, {int(self.counts.sum()):,} lookups, "
                f"Zipf fit s={self.fit_zipf():.2f}{h}")


MODES = ("prefill", "decode", "train")


@dataclass(frozen=True)
class Workload:
    """What the workers run. A batch is `batch` sequences of `seq_len` new tokens over `context` tokens
    (prefill: context = seq_len; decode: seq_len = 1; train: forward + backward + a table push)."""
    mode: str = "prefill"
    batch: int = 8
    seq_len: int = 512
    context: int = 0                    # 0: seq_len (prefill/train); decode: the KV length
    workers: int = 8
    tokens_per_s: float = 0.0           # per worker; 0 = what the compute allows
    zipf_s: float = 1.0
    trace: str | None = None
    prefill_fraction: float = 1.0       # share of tokens in prefill for a "mix" plan (decode the rest)
    cache_rows: int = 0                 # per worker hot-row cache, rows per table
    target_hit_rate: float = 0.5
    cache_policy: str = "lfu"
    replicas: int = 1
    prefetch: bool = True
    ahead: int = 0                      # prefill: a batch's fetches go out this many batches before its forward

    def __post_init__(self):
        if self.mode not in MODES:
            raise PlanInputError(f"workload.mode must be one of {MODES}, got {self.mode!r}")
        if int(self.ahead) < 0:
            raise PlanInputError(f"workload.ahead counts batches fetched ahead and must be >= 0, got {self.ahead}")
        if self.ahead and self.mode != "prefill":
            raise PlanInputError(f"workload.ahead applies to prefill only: a {self.mode} step's ids are known only after "
                                 "the step before it" + (" (its token)" if self.mode == "decode" else
                                                         " has pushed (rows read before a push may miss it)"))
        for f in ("batch", "seq_len", "workers", "replicas"):
            if int(getattr(self, f)) < 1:
                raise PlanInputError(f"workload.{f} must be >= 1, got {getattr(self, f)}")
        if self.tokens_per_s < 0 or self.cache_rows < 0 or self.context < 0:
            raise PlanInputError("workload.tokens_per_s, cache_rows and context must be >= 0")
        if not 0 <= self.prefill_fraction <= 1 or not 0 <= self.target_hit_rate < 1:
            raise PlanInputError("workload.prefill_fraction must be in [0, 1] and target_hit_rate in [0, 1)")

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def ctx(self) -> int:
        return self.context or self.seq_len

    def replace(self, **kw) -> Workload:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_dict(cls, d: dict) -> Workload:
        known = {f.name for f in dataclasses.fields(cls)}
        if set(d) - known:
            raise PlanInputError(f"workload: unknown fields {sorted(set(d) - known)}; known: {sorted(known)}")
        return cls(**d)

    def distribution(self, table_rows: int, layer: int | None = None):
        if self.trace:
            return TraceDistribution.load(self.trace, layer)
        return Zipf(rows=table_rows, s=self.zipf_s)
