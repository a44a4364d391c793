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
from dataclasses import asdict, dataclass, field

import torch

from engram_mem.errors import InvalidArgument


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
        """weight [R, D] (any float dtype); idx unique int64 [n]; grad float32 [n, D]."""
        w = self._decayed(weight[idx].float(), lr)
        weight[idx] = w.sub_(grad * lr).to(weight.dtype)

    def _decayed(self, w: torch.Tensor, lr: float) -> torch.Tensor:
        if self.spec.weight_decay:
            w.mul_(1.0 - lr * self.spec.weight_decay)
        return w


class RowAdagrad(RowOptimizer):
    state_names = ("sum",)

    def init_state(self, n_rows, dim, device="cpu"):
        return {"sum": torch.full((n_rows, dim), self.spec.initial_accumulator, dtype=torch.float32, device=device)}

    @torch.no_grad()
    def apply(self, weight, state, idx, grad, lr):
        s = state["sum"][idx].add_(grad * grad)
        state["sum"][idx] = s
        w = self._decayed(weight[idx].float(), lr)
        weight[idx] = w.sub_(grad * lr / s.sqrt().add_(self.spec.eps)).to(weight.dtype)


def _per_step(step: torch.Tensor, fn) -> torch.Tensor:
    """fn(k) for each row's step count k, computed once per distinct k in Python floats: [n, 1]."""
    ks, inv = torch.unique(step, return_inverse=True)
    vals = torch.tensor([fn(int(k)) for k in ks.tolist()], dtype=torch.float32, device=step.device)
    return vals[inv].unsqueeze(1)


class RowAdam(RowOptimizer):
    state_names = ("exp_avg", "exp_avg_sq", "step")

    def init_state(self, n_rows, dim, device="cpu"):
        return {
            "exp_avg": torch.zeros(n_rows, dim, dtype=torch.float32, device=device),
            "exp_avg_sq": torch.zeros(n_rows, dim, dtype=torch.float32, device=device),
            "step": torch.zeros(n_rows, dtype=torch.int32, device=device),
        }

    @torch.no_grad()
    def apply(self, weight, state, idx, grad, lr):
        b1, b2 = self.spec.betas
        step = state["step"][idx] + 1                                  # [n] per-row step count
        state["step"][idx] = step
        m = state["exp_avg"][idx].mul_(b1).add_(grad * (1 - b1))
        v = state["exp_avg_sq"][idx].mul_(b2).add_(grad * grad * (1 - b2))
        state["exp_avg"][idx] = m
        state["exp_avg_sq"][idx] = v
        bc1 = _per_step(step, lambda k: 1 - b1 ** k)                   # [n, 1]
        bc2 = _per_step(step, lambda k: 1 - b2 ** k)
        denom = (v / bc2).sqrt_().add_(self.spec.eps)
        w = self._decayed(weight[idx].float(), lr)
        weight[idx] = w.sub_(m / bc1 / denom * lr).to(weight.dtype)


OPTIMIZERS = {"sgd": RowOptimizer, "adagrad": RowAdagrad, "adam": RowAdam}


def make_optimizer(spec: OptimizerSpec | dict | None) -> RowOptimizer:
    if not isinstance(spec, OptimizerSpec):
        spec = OptimizerSpec.from_dict(spec)
    return OPTIMIZERS[spec.name](spec)
