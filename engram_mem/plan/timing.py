"""time_calls: the median (or best) wall and CPU time of a call over a few batches, after warm-up."""

from __future__ import annotations

import time

import numpy as np


def time_calls(fn, batches, warmup: int = 2, best: bool = False, before=None) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds) per call; best=True: the fastest call.
    before(b), if given, runs untimed before every call (a cold start)."""
    for b in batches[:warmup]:
        if before:
            before(b)
        fn(b)
    wall, cpu = [], []
    for b in batches[warmup:]:
        if before:
            before(b)
        c0, t0 = time.process_time(), time.perf_counter()
        fn(b)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if best:
        return float(np.min(wall)), float(np.min(cpu))
    return float(np.median(wall)), float(np.median(cpu))
