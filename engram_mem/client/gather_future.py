"""Futures a gather returns: rows on their way, reshaped (and converted) when they are asked for."""

from __future__ import annotations

import concurrent.futures

from engram_mem.table import TableSpec


class Reshaped:
    """A future whose result is reshaped (gather returns [N, dim]; the caller wants ids.shape + (dim,))."""

    def __init__(self, inner: concurrent.futures.Future, shape: tuple):
        self.inner, self.shape = inner, shape

    def done(self) -> bool:
        return self.inner.done()

    def result(self, timeout: float | None = None):
        return self.inner.result(timeout).reshape(self.shape)


class GatherFuture:
    """Rows on their way. `result()` returns them in the ids' order and shape."""

    def __init__(self, inner: concurrent.futures.Future, dtype: str, as_torch: bool = False, device=None,
                 spec: TableSpec | None = None):
        self._inner, self._dtype, self._as_torch, self._device = inner, dtype, as_torch, device
        self._spec = spec  # fp8 tables: torch results are dequantized on the device

    def done(self) -> bool:
        return self._inner.done()

    def result(self, timeout: float | None = None):
        out = self._inner.result(timeout)
        if not (self._as_torch or self._device is not None):
            return out
        from engram_mem.table import as_torch

        if self._spec is not None and self._spec.dtype == "fp8_e4m3":
            from engram_mem.quant import dequantize

            return dequantize(out, self._spec.dim, self._spec.block, self._device)
        t = as_torch(out, self._dtype)
        if self._device is not None and str(self._device) != "cpu":
            t = t.pin_memory().to(self._device, non_blocking=True)
        return t
