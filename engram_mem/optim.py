"""Sparse row-wise optimizers, applied where the rows live.

One implementation serves both places a table can live: a shard applies pushed gradients to its
host-DRAM rows, and the model's in-process table applies the same update to its own rows (on any
device). So an in-process run and a run against the memory cluster follow the same arithmetic.

Each optimizer is a pure function of (weight rows, per-row state, gradient, lr). Only the rows
that received a gradient change, including their state ("lazy" Adam: each row counts its own
steps for bias correction, as in torch.optim.SparseAdam).

    opt = make_optimizer({"name": "adam", "betas": (0.9, 0.999)})
    state = opt.init_state(n_rows, dim, device)           # dict of tensors, empty for SGD
    opt.apply(weight, state, idx, grad, lr)               # idx unique int64 [n], grad fp32 [n, D]
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from engram_mem.errors import InvalidArgument, NonFiniteUpdate
from engram_mem.validate import all_finite

CHUNK_ELEMS = 1 << 18  # values per block of rows in a CPU update (1 MiB of fp32 per temporary)
# A gradient value above this is refused: its square (Adam's and Adagrad's second moment) would come
# near fp32's range, and a row whose second moment overflows never moves again.
MAX_GRAD_ABS = 1e15
MAX_LR = 1e3       # a push's lr above this is refused: no table is trained with it, and it overflows rows


@dataclass(frozen=True)
class OptimizerSpec:
    name: str = "sgd"                 # sgd | adagrad | adam
    lr: float = 1e-2                  # used when a push carries no lr of its own
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0         # decoupled (AdamW-style); the paper uses 0 for tables
    initial_accumulator: float = 0.0  # adagrad only

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise InvalidArgument(f"optimizer name {self.name!r} is not one of {sorted(OPTIMIZERS)}")
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise InvalidArgument(f"optimizer lr must be finite and >= 0, got {self.lr}")
        b1, b2 = self.betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise InvalidArgument(f"optimizer betas must be in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise InvalidArgument(f"optimizer eps must be > 0, got {self.eps}")
        object.__setattr__(self, "betas", (float(b1), float(b2)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "OptimizerSpec":
        d = dict(d or {})
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


class RowOptimizer:
    """Base: SGD. Subclasses add per-row state.

    Every update is written as single-operation kernels (mul, add, div, sqrt), each rounded once,
    and Adam's bias corrections are computed exactly per distinct step count. So a row's new value
    depends only on its own old value, state and gradient, never on where it sits in memory or how
    many rows share the call: a shard holding a slice of a table computes bit for bit what an
    in-process table computes (fused multiply-add and vectorized pow would differ in the last bit
    between SIMD lanes and scalar tails, and the difference grows over training).
    """

    state_names: tuple[str, ...] = ()

    def __init__(self, spec: OptimizerSpec):
        self.spec = spec

    def state_bytes_per_row(self, dim: int) -> int:
        return sum(t.element_size() * t[0].numel() for t in self.init_state(1, dim).values())

    def init_state(self, n_rows: int, dim: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return {}

    @torch.no_grad()
    def apply(self, weight: torch.Tensor, state: dict[str, torch.Tensor], idx: torch.Tensor,
              grad: torch.Tensor, lr: float) -> None:
        """weight [R, D] (any float dtype); idx unique int64 [n]; grad float32 [n, D].

        All or nothing: every block's new rows and state are computed first and checked finite in
        the weight's dtype (an fp16 row overflows at 65504), then written; a push that would make
        any value non-finite raises NonFiniteUpdate and changes nothing.

        On CPU the rows go through in blocks of about CHUNK_ELEMS values, so each kernel's
        temporaries stay in cache (2-5x faster on large pushes than whole-batch temporaries).
        Every value is computed independently of the others, so the blocking changes no bit."""
        rows = idx.numel() if weight.is_cuda else max(1, CHUNK_ELEMS // max(1, grad.shape[1]))
        staged = [self._compute(weight, state, idx[a:a + rows], grad[a:a + rows], lr)
                  for a in range(0, idx.numel(), rows)]
        for blk, w, st in staged:
            floats = [w, *(v for v in st.values() if v.is_floating_point())]
            if all(all_finite(v) for v in floats):
                continue
            bad = torch.zeros(blk.numel(), dtype=torch.bool, device=blk.device)
            for v in floats:  # which row: only on the way to refusing the push
                bad |= ~torch.isfinite(v.reshape(v.shape[0], -1)).all(dim=1)
            row = int(blk[int(torch.nonzero(bad)[0, 0])])
            raise NonFiniteUpdate(f"the update of row {row} (local index) would make it or its optimizer "
                                  f"state non-finite in {weight.dtype} (lr {lr}); nothing from this push "
                                  f"was applied")
        for blk, w, st in staged:
            for k, v in st.items():
                state[k].index_copy_(0, blk, v)
            weight.index_copy_(0, blk, w)

    def _compute(self, weight, state, idx, grad, lr):
        """(idx, new rows in the weight's dtype, {state name: new state rows}) for one block."""
        w = self._decayed(weight.index_select(0, idx).float(), lr)
        return idx, w.sub_(grad * lr).to(weight.dtype), {}

    def _decayed(self, w: torch.Tensor, lr: float) -> torch.Tensor:
        if self.spec.weight_decay:
            w.mul_(1.0 - lr * self.spec.weight_decay)
        return w


class RowAdagrad(RowOptimizer):
    state_names = ("sum",)

    def init_state(self, n_rows, dim, device="cpu"):
        return {"sum": torch.full((n_rows, dim), self.spec.initial_accumulator, dtype=torch.float32, device=device)}

    def _compute(self, weight, state, idx, grad, lr):
        s = state["sum"].index_select(0, idx).add_(grad * grad)
        new = {"sum": s}
        w = self._decayed(weight.index_select(0, idx).float(), lr)
        return idx, w.sub_(grad * lr / s.sqrt().add_(self.spec.eps)).to(weight.dtype), new


class RowAdam(RowOptimizer):
    state_names = ("exp_avg", "exp_avg_sq", "step")
    _bc: torch.Tensor | None = None  # bias corrections by step count (see _bias_corrections)

    def init_state(self, n_rows, dim, device="cpu"):
        return {
            "exp_avg": torch.zeros(n_rows, dim, dtype=torch.float32, device=device),
            "exp_avg_sq": torch.zeros(n_rows, dim, dtype=torch.float32, device=device),
            "step": torch.zeros(n_rows, dtype=torch.int32, device=device),
        }

    def _bias_corrections(self, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 - b1^k, 1 - b2^k) as [n, 1] float32 for each row's step count k.

        Each value is computed once, in Python floats (exact per k, unlike a vectorized pow), into
        a table indexed by k that grows as the step counts do."""
        table = self._bc
        hi = int(step.max()) if step.numel() else 0
        if table is None or hi >= table.shape[0] or table.device != step.device:
            n = max(hi + 1, 2 * (table.shape[0] if table is not None else 512))
            b1, b2 = self.spec.betas
            table = torch.tensor([[1 - b1 ** k, 1 - b2 ** k] for k in range(n)], dtype=torch.float32,
                                 device=step.device)
            self._bc = table
        bc = table.index_select(0, step.long())                          # [n, 2]
        return bc[:, :1], bc[:, 1:]

    def _compute(self, weight, state, idx, grad, lr):
        b1, b2 = self.spec.betas
        step = state["step"].index_select(0, idx).add_(1)              # [n] per-row step count
        m = state["exp_avg"].index_select(0, idx).mul_(b1).add_(grad * (1 - b1))
        v = state["exp_avg_sq"].index_select(0, idx).mul_(b2).add_(grad * grad * (1 - b2))
        new = {"step": step, "exp_avg": m, "exp_avg_sq": v}          # m and v are read below, never changed
        bc1, bc2 = self._bias_corrections(step)                        # [n, 1] each
        denom = v.div(bc2).sqrt_().add_(self.spec.eps)
        w = self._decayed(weight.index_select(0, idx).float(), lr)
        return idx, w.sub_(m.div(bc1).div_(denom).mul_(lr)).to(weight.dtype), new


OPTIMIZERS = {"sgd": RowOptimizer, "adagrad": RowAdagrad, "adam": RowAdam}


def make_optimizer(spec: OptimizerSpec | dict | None) -> RowOptimizer:
    if not isinstance(spec, OptimizerSpec):
        spec = OptimizerSpec.from_dict(spec)
    return OPTIMIZERS[spec.name](spec)
