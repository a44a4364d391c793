"""The Engram module: retrieved n-gram rows in, context-gated memory out (added to the residual).

    engram = Engram(dim=256, cfg=EngramConfig(...))
    out, conv_state = engram(hidden, memory)        # hidden [B, T, D] or [B, T, G, D]; memory [B, T, K, d]
    out, conv_state = engram(hidden, memory, mask=real)   # left-padded batch: real bool [B, T]
    h = h + out                                     # at an Engram layer, before attention

Legend: B batch, T time, G hyper-connection branches (hc_mult), D model dim, K = orders * heads
rows per token, d per-head row width (head_dim), C = G * D conv channels.

    e     = concat of the K rows                                [B, T, K*d]
    k_g   = RMSNorm(key_proj_g(e)),  q_g = RMSNorm(hidden_g)    per branch g
    gate  = sigmoid(signed_sqrt(<k_g, q_g> / sqrt(D)))          [B, T, G, 1]   memory that contradicts
    v     = gate * value_proj(e)                                [B, T, G, D]   the context is suppressed
    out   = v + ShortConv(v)     ShortConv = RMSNorm -> depthwise causal Conv1d(kernel 4, dilation
                                 max_ngram_size) -> SiLU

The module sees only the rows it is handed (the model gets them from a RowSource); it never knows
where the tables live. For decoding, ShortConv carries the last (kernel-1)*dilation normalized
inputs as a state, so feeding tokens one at a time gives the same output as the full sequence.
In a left-padded batch the conv inputs at padding positions are zeroed (mask): a row's first real
token then sees zeros behind it, exactly the zero state of a sequence that starts there.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from engram_model.config import EngramConfig


class ShortConv(nn.Module):
    def __init__(self, dim: int, kernel_size: int = 4, dilation: int = 1, hc_mult: int = 1, eps: float = 1e-5):
        super().__init__()
        self.hc_mult, self.dilation, self.kernel_size = hc_mult, dilation, kernel_size
        channels = dim * hc_mult
        self.norms = nn.ModuleList([nn.RMSNorm(dim, eps=eps) for _ in range(hc_mult)])
        # Depthwise: one kernel per channel. No padding here: forward prepends the causal context.
        self.conv = nn.Conv1d(channels, channels, kernel_size, dilation=dilation, groups=channels, bias=False)

    @property
    def context(self) -> int:
        """How many past positions an output depends on."""
        return (self.kernel_size - 1) * self.dilation

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, G, D]; state [B, context, C] (None: zeros, i.e. the sequence starts here);
        mask bool [B, T], False at padding positions, whose inputs the conv then sees as zeros."""
        B, T, G, D = x.shape
        assert G == self.hc_mult, f"x has {G} branches, ShortConv was built for {self.hc_mult}"
        xn = torch.cat([self.norms[g](x[:, :, g]) for g in range(G)], dim=-1)            # [B, T, C]
        if mask is not None:
            xn = xn.masked_fill(~mask[..., None], 0.0)
        if state is None:
            state = xn.new_zeros(B, self.context, G * D)
        full = torch.cat([state.to(xn.dtype), xn], dim=1)                                 # [B, ctx+T, C]
        y = F.conv1d(full.transpose(1, 2), self.conv.weight, dilation=self.dilation, groups=G * D)  # [B, C, T]
        y = F.silu(y).transpose(1, 2).reshape(B, T, G, D)
        return y, full[:, full.shape[1] - self.context:]


class Engram(nn.Module):
    def __init__(self, dim: int, cfg: EngramConfig, norm_eps: float = 1e-5):
        super().__init__()
        self.dim, self.hc_mult = dim, cfg.hc_mult
        self.n_rows, self.head_dim = cfg.heads_per_layer, cfg.head_dim
        self.value_proj = nn.Linear(cfg.memory_dim, dim)
        self.key_projs = nn.ModuleList([nn.Linear(cfg.memory_dim, dim) for _ in range(cfg.hc_mult)])
        self.key_norms = nn.ModuleList([nn.RMSNorm(dim, eps=norm_eps) for _ in range(cfg.hc_mult)])
        self.query_norms = nn.ModuleList([nn.RMSNorm(dim, eps=norm_eps) for _ in range(cfg.hc_mult)])
        # V4.1's variant has no ShortConv: the gated value is the output.
        self.short_conv = ShortConv(dim, cfg.kernel_size, dilation=cfg.max_ngram_size, hc_mult=cfg.hc_mult,
                                    eps=norm_eps) if cfg.short_conv else None

    def init_weights(self, std: float) -> None:
        """Key projections like any projection; the value projection and the conv kernel start at zero.

        The branch then adds exactly nothing at step 0 and the memory fades in as it learns. With
        PyTorch's default init, RMSNorm -> conv -> SiLU alone writes a vector of norm ~sqrt(D)/2 per
        token into a residual stream whose embeddings have norm ~0.02 sqrt(D): random n-gram codes
        drown token identity, and on the stdlib the model trained markedly slower than without
        Engram. Gradients still flow: value_proj's own gradient is nonzero from the first step.
        """
        for proj in self.key_projs:
            nn.init.normal_(proj.weight, std=std)
            nn.init.zeros_(proj.bias)
        nn.init.zeros_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        if self.short_conv is not None:
            nn.init.zeros_(self.short_conv.conv.weight)

    def gates(self, hidden: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, G, D], e [B, T, K*d] -> gate in (0, 1), [B, T, G, 1]."""
        out = []
        for g in range(self.hc_mult):
            key = self.key_norms[g](self.key_projs[g](e).float())                           # [B, T, D]
            query = self.query_norms[g](hidden[:, :, g].float())                            # [B, T, D]
            s = (key * query).sum(-1) / math.sqrt(self.dim)                                 # [B, T]
            # Signed square root tames the dot product's tails before the sigmoid.
            s = s.abs().clamp_min(1e-6).sqrt() * s.sign()
            out.append(torch.sigmoid(s).unsqueeze(-1))
        return torch.stack(out, dim=2)

    def forward(self, hidden: torch.Tensor, memory: torch.Tensor, conv_state: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, T, D] or [B, T, G, D]; memory [B, T, K, d] -> (out like hidden, new conv state).

        mask bool [B, T]: False at left-padding positions, kept out of the ShortConv (None: all real).
        """
        flat = hidden.ndim == 3
        # One residual stream and hc_mult G > 1 (a backbone without hyper-connections): every branch
        # sees the same hidden state, gates it with its own key projection, and the G outputs are averaged.
        h = hidden.unsqueeze(2).expand(-1, -1, self.hc_mult, -1) if flat else hidden       # [B, T, G, D]
        assert h.shape[2] == self.hc_mult, f"hidden has {h.shape[2]} branches, Engram expects {self.hc_mult}"
        assert memory.shape[-2:] == (self.n_rows, self.head_dim), \
            f"memory rows {tuple(memory.shape[-2:])} != (K={self.n_rows}, d={self.head_dim})"
        e = memory.flatten(-2).to(self.value_proj.weight.dtype)                             # [B, T, K*d]
        value = self.gates(h, e) * self.value_proj(e).unsqueeze(2)                          # [B, T, G, D]
        if self.short_conv is None:
            out, state = value, None
        else:
            conv, state = self.short_conv(value, conv_state, mask)
            out = value + conv
        if flat:
            out = out.squeeze(2) if self.hc_mult == 1 else out.mean(2)
        return out, state
