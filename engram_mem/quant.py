"""The FP8 row codec: E4M3 values with ue8m0 (power-of-two) block scales, as DeepSeek-V4.1-Flash
stores its Engram tables.

A stored row of an "fp8_e4m3" table is `dim + dim // block` bytes:

    [ v_0 ... v_{dim-1} | s_0 ... s_{dim/block - 1} ]     v: float8_e4m3fn bit patterns
                                                           s: ue8m0 exponent bytes, scale = 2**(s - 127)
    value_i = float(v_i) * 2**(s_{i // block} - 127)

(V4.1-Flash: dim 256, block 32 -> 256 + 8 = 264 bytes a row.) Shards, the wire and the worker's
cache move these bytes untouched; only the worker turns them into numbers, on its own device:

    rows = quantize(x_f32, block=32)                 # [n, dim] float32 -> [n, dim + dim/32] uint8
    x = dequantize(rows, dim=256, block=32, device="cuda")   # -> float32 [n, 256] on the device

Dequantization is exact (an E4M3 value times a power of two is a float32 unless it underflows),
so a gather of an imported table equals the source's dequantized values bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

E4M3_MAX = 448.0
_SCALE_BIAS = 127


def quantize(x: np.ndarray | torch.Tensor, block: int) -> np.ndarray:
    """float rows [n, dim] -> stored fp8 rows [n, dim + dim // block] uint8 (scale: the smallest
    power of two that brings each block's largest magnitude within E4M3's range)."""
    t = torch.as_tensor(x, dtype=torch.float32).cpu()
    n, dim = t.shape
    if dim % block:
        raise ValueError(f"quantize: dim {dim} is not a multiple of block {block}")
    blocks = t.reshape(n, dim // block, block)                               # [n, nb, block]
    amax = blocks.abs().amax(-1, keepdim=True)                               # [n, nb, 1]
    exp = torch.ceil(torch.log2(amax / E4M3_MAX)).clamp(-_SCALE_BIAS, 127)   # amax 0 -> -inf -> -127
    exp = torch.where(amax > 0, exp, torch.full_like(exp, -_SCALE_BIAS))
    values = (blocks * torch.exp2(-exp)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    out = torch.empty(n, dim + dim // block, dtype=torch.uint8)
    out[:, :dim] = values.reshape(n, dim).view(torch.uint8)
    out[:, dim:] = (exp.reshape(n, dim // block) + _SCALE_BIAS).to(torch.uint8)
    return out.numpy()


def dequantize(rows: np.ndarray | torch.Tensor, dim: int, block: int, device=None) -> torch.Tensor:
    """Stored fp8 rows [..., dim + dim // block] uint8 -> float32 [..., dim], computed on `device`
    (the bytes move there first: 264 bytes a row, not 1,024): with torch's float8_e4m3fn and
    float8_e8m0fnu on an accelerator, with 256-entry lookup tables on the CPU (same bits)."""
    if device is None or torch.device(device).type == "cpu":
        return _dequantize_cpu(np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows), dim, block)
    t = torch.as_tensor(rows).to(device, non_blocking=True)
    lead = t.shape[:-1]
    assert t.shape[-1] == dim + dim // block, f"fp8 rows have {t.shape[-1]} bytes; dim {dim}, block {block} needs {dim + dim // block}"
    values = t[..., :dim].contiguous().view(torch.float8_e4m3fn).float()    # [..., dim]
    scales = t[..., dim:].contiguous().view(torch.float8_e8m0fnu).float()   # [..., nb] = 2**(s - 127)
    out = values.reshape(*lead, dim // block, block) * scales.unsqueeze(-1)
    return out.reshape(*lead, dim)


# The CPU path: 256-entry tables of every E4M3 and ue8m0 value (numpy's uint8 fancy indexing measured
# ~2.7x faster here than torch's float8 -> float32 conversion); the result is bit-identical.
_E4M3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
_E8M0 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e8m0fnu).float().numpy()


def _dequantize_cpu(rows: np.ndarray, dim: int, block: int) -> torch.Tensor:
    assert rows.shape[-1] == dim + dim // block, f"fp8 rows have {rows.shape[-1]} bytes; dim {dim}, block {block} needs {dim + dim // block}"
    lead = rows.shape[:-1]
    flat = rows.reshape(-1, rows.shape[-1])
    values = _E4M3[flat[:, :dim]]                                            # float32 [n, dim]
    with np.errstate(over="ignore", invalid="ignore"):  # as in float arithmetic: huge scales give inf, NaN stays NaN
        values.reshape(-1, dim // block, block)[...] *= _E8M0[flat[:, dim:]][:, :, None]
    return torch.from_numpy(values.reshape(*lead, dim))


def dequantize_reference(values: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    """An independent numpy reference: values [n, dim] E4M3 bit patterns (uint8), scales [n, dim/block]
    ue8m0 bytes -> float32 [n, dim]. Used by tests to check the torch path."""
    v = torch.from_numpy(np.ascontiguousarray(values)).view(torch.float8_e4m3fn).double().numpy()
    s = np.ldexp(1.0, scales.astype(np.int64) - _SCALE_BIAS)                # float64, exact
    return (v * np.repeat(s, block, axis=1)).astype(np.float32)


