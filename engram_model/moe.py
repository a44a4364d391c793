"""Mixture-of-experts feed-forward: a shared expert plus top-k routed SwiGLU experts.

    moe = MoE(cfg)
    y, aux = moe(x)              # x [B, T, D] -> y [B, T, D], aux: scalar balance loss (0 when off)
    y, aux = moe(x, mask=real)   # real bool [B, T]: padding tokens are routed but not counted in load / aux
    moe.update_bias()            # after each optimizer step: auxiliary-loss-free balancing

Legend: N = B*T tokens, E routed experts, k activated experts per token, D model dim.
Routing (DeepSeek-V3): scores = sigmoid or softmax of the router logits; a per-expert bias, not
trained by gradients, is added to the scores only to *select* the top k; the mixing weights come
from the unbiased scores (renormalized over the k for sigmoid) times route_scale. After every
step the bias of each overloaded expert goes down by bias_update_speed and of each underloaded
expert up. An optional Switch-style aux loss, coef * E * sum_i f_i * P_i, can be added too.

`_experts_reference` is the readable path (bincount, then per expert gather its tokens, run it,
scatter-add back, as in DeepSeek-V3's inference code). `_experts`, used by forward, computes the
same sum with one sort, one gather and one scatter; it is the one method a grouped-GEMM kernel
would override. A unit test holds the two equal.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from engram_model.config import ModelConfig


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.topk, self.score_func, self.route_scale = cfg.n_activated_experts, cfg.score_func, cfg.route_scale
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        nn.init.normal_(self.weight, std=cfg.init_std)
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts))   # selection only; no gradient

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> weights [N, k], indices [N, k], scores [N, E] (float32)."""
        logits = F.linear(x.float(), self.weight.float())                          # [N, E]
        scores = logits.softmax(-1) if self.score_func == "softmax" else logits.sigmoid()
        indices = (scores + self.bias).topk(self.topk, dim=-1).indices              # [N, k]
        weights = scores.gather(1, indices)                                         # [N, k]
        if self.score_func == "sigmoid":
            weights = weights / weights.sum(-1, keepdim=True)
        return weights * self.route_scale, indices, scores


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.topk = cfg.n_routed_experts, cfg.n_activated_experts
        self.aux_loss_coef, self.bias_update_speed = cfg.aux_loss_coef, cfg.bias_update_speed
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList([MLP(cfg.dim, cfg.moe_inter_dim) for _ in range(cfg.n_routed_experts)])
        self.shared = MLP(cfg.dim, cfg.shared_inter_dim) if cfg.shared_inter_dim else None
        # Tokens routed to each expert since the last bias update (training only).
        self.register_buffer("load", torch.zeros(cfg.n_routed_experts), persistent=False)

    def _experts_reference(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Reference path. x [N, D], weights/indices [N, k] -> sum_k weight * expert(x) [N, D]."""
        y = torch.zeros_like(x)
        counts = torch.bincount(indices.flatten(), minlength=self.n_experts).tolist()
        for i, expert in enumerate(self.experts):
            if counts[i] == 0:
                continue
            tok, slot = torch.where(indices == i)             # a token picks an expert at most once
            y.index_add_(0, tok, (expert(x[tok]) * weights[tok, slot, None].to(x.dtype)).to(y.dtype))
        return y

    def _experts(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Fast path, same sum: sort the N*k assignments by expert, one gather, one scatter-add.

        The reference gathers and scatters once per expert, and autograd then zero-fills an [N, D]
        gradient per expert; here that happens once per layer.
        """
        flat = indices.flatten()                                                    # [N*k]
        order = flat.argsort(stable=True)
        tok = order // self.topk                                                    # token of each sorted assignment
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        xs = x[tok].split(counts)                                                   # per expert [n_i, D]
        out = torch.cat([self.experts[i](xi) for i, xi in enumerate(xs) if counts[i]])   # [N*k, D]
        out = out * weights.flatten()[order, None].to(out.dtype)
        return torch.zeros_like(x).index_add_(0, tok, out.to(x.dtype))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D]; mask bool [B, T], False at padding tokens (None: all real) -> y [B, T, D], aux []."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                                # [N, D]
        weights, indices, scores = self.gate(x)
        y = self._experts(x, weights, indices)
        if self.shared is not None:
            y = y + self.shared(x)
        aux = x.new_zeros((), dtype=torch.float32)
        if self.training and torch.is_grad_enabled():
            if mask is not None:         # routing is per token, so pads only need leaving out of the statistics
                keep = mask.reshape(-1)
                indices, scores = indices[keep], scores[keep]                       # [N_real, k], [N_real, E]
            counts = torch.bincount(indices.flatten(), minlength=self.n_experts).float()   # [E]
            self.load += counts
            if self.aux_loss_coef > 0:
                f = counts / indices.numel()                                        # share of assignments
                p = (scores / scores.sum(-1, keepdim=True)).mean(0)                 # mean routing prob
                aux = self.aux_loss_coef * self.n_experts * (f * p).sum()
        return y.view(shape), aux

    @torch.no_grad()
    def update_bias(self) -> None:
        """Nudge the selection bias toward equal load, then reset the load counters."""
        if self.bias_update_speed > 0 and self.load.sum() > 0:
            self.gate.bias += self.bias_update_speed * torch.sign(self.load.mean() - self.load)
        self.load.zero_()
