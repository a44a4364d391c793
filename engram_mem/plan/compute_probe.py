"""Compute probe: this machine's model forwards fitted to a Device (FLOP/s and a fixed cost per block).

The serving model (engram_model/configs/serving.json) at prefill and decode shapes, and the
`small` model's training step, timed with torch here; `calibrate` (calibrate.py) saves them
with the measured tiers.
"""

from __future__ import annotations

import json

import numpy as np

from engram_mem.plan.presets import Device
from engram_mem.plan.timing import time_calls


def _flops(cfg: dict, tokens: int, attended: float) -> tuple[float, float]:
    """(per-block FLOPs, head FLOPs) of a forward, as the planner counts them."""
    from engram_mem.plan.presets import shape_from_config

    s = shape_from_config(cfg)
    return 2 * s.active_params_per_block * tokens + 4 * s.hidden * tokens * attended, 2 * s.hidden * s.vocab * tokens


def measure_compute(reps: int) -> tuple[list[Device], dict]:
    import torch

    from engram_model.config import ModelConfig
    from engram_model.model import EngramModel

    def model_of(path):
        with open(path) as f:
            m = json.load(f)["model"]
        cfg = ModelConfig.from_dict({**m, "engram": None})
        torch.manual_seed(0)
        return m, EngramModel(cfg, rows=None).eval(), cfg

    from engram_model.config import CONFIG_DIR

    serving, model, cfg = model_of(CONFIG_DIR / "serving.json")
    L = cfg.n_layers
    devices, raw = [], {}
    default_threads = torch.get_num_threads()
    for name, threads in (("here-cpu", 1),):
        torch.set_num_threads(threads)
        pts = []
        with torch.inference_mode():
            for B, T in ((1, 128), (1, 512), (1, 1024)):
                x = torch.randint(0, cfg.vocab_size, (B, T))
                wall, _ = time_calls(lambda _: model(x), list(range(reps + 2)), warmup=2, best=True)
                pts.append((_flops(serving, B * T, T / 2), wall, f"prefill {B}x{T}"))
            for B, ctx in ((8, 160), (32, 160)):
                cache = model.new_cache(B, max_len=ctx + reps + 8)
                model(torch.randint(0, cfg.vocab_size, (B, ctx)), cache=cache)
                x = torch.randint(0, cfg.vocab_size, (B, 1))
                wall, _ = time_calls(lambda _: model(x, cache=cache), list(range(reps + 2)), warmup=2, best=True)
                pts.append((_flops(serving, B, ctx), wall, f"decode {B}x1"))
        devices.append(_fit_device(name, pts, L, f"measured here: serving-model forwards, fp32, {threads} torch thread(s)"))
        raw[name] = [{"shape": p[2], "block_flops": p[0][0], "head_flops": p[0][1], "wall_s": p[1]} for p in pts]
    torch.set_num_threads(1)
    small, smodel, scfg = model_of(CONFIG_DIR / "small.json")
    smodel.train()
    pts = []
    for B, T in ((4, 128), (16, 128)):
        x = torch.randint(0, scfg.vocab_size, (B, T))

        def step(_):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits, aux = smodel(x)
                loss = logits.float().logsumexp(-1).mean() + aux
            loss.backward()
            smodel.zero_grad(set_to_none=True)
        wall, _ = time_calls(step, list(range(reps + 2)), warmup=2, best=True)
        bf, hf = _flops(small, B * T, T / 2)
        pts.append(((bf, hf), wall / 3, f"train {B}x{T} (fwd+bwd / 3)"))
    torch.set_num_threads(default_threads)
    devices.append(_fit_device("here-cpu-train", pts, scfg.n_layers,
                               "measured here: small-model bf16 training steps (fwd+bwd)/3, 1 torch thread"))
    raw["here-cpu-train"] = [{"shape": p[2], "block_flops": p[0][0], "head_flops": p[0][1], "wall_s": p[1]} for p in pts]
    return devices, raw


def _fit_device(name: str, pts, layers: int, source: str) -> Device:
    # wall = layers * c0 + (layers * block_flops + head_flops) / F  -> least squares in (c0, 1/F), both >= 0
    a = np.array([[layers, layers * p[0][0] + p[0][1]] for p in pts], float)
    y = np.array([p[1] for p in pts], float)
    sol, *_ = np.linalg.lstsq(a / y[:, None], np.ones_like(y), rcond=None)   # relative error
    c0, inv_f = float(sol[0]), float(sol[1])
    if c0 < 0 or inv_f <= 0:   # no fixed cost then: FLOP/s alone, through the origin (relative error)
        c0 = 0.0
        x = a[:, 1] / y
        inv_f = float(np.sum(x) / np.sum(x * x))
    for p in pts:
        pred = layers * c0 + (layers * p[0][0] + p[0][1]) * inv_f
        print(f"  {name:<15} {p[2]:<28} measured {p[1] * 1e3:8.2f} ms, fit {pred * 1e3:8.2f} ms", flush=True)
    return Device(name=name, peak_flops=1 / inv_f, mfu=1.0, mem_gbps=10.0, block_fixed_s=c0, measured=True, source=source)
