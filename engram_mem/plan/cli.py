"""`engram-mem plan`: size a pooled-memory cluster for Engram tables and predict the prefetch penalty.

    engram-mem plan --model v4.1-flash --mode decode --batch 64 --context 4096 --workers 64 --tier rdma-400g
    engram-mem plan --model engram-100b-host --tier host-dram-pcie5 --json
    engram-mem plan --input deploy/plan.example.yaml            # model / workload / hardware in one file
    engram-mem plan --all-presets                               # one plan per model preset, each tier
    engram-mem plan --trace runs/ids.npz ...                    # id distribution from a recorded run
    engram-mem plan --calibrate --out bench/results/tiers-here.json   # measure this machine's tiers
    engram-mem plan --calibrate --disk-dir /nvme/tmp ...              # ... and the disk under /nvme/tmp
    engram-mem plan --tiers-file bench/results/tiers-here.json --tier here-grpc --device here-cpu ...

Flags override the file; the file overrides the presets. Prints a table (or --json).
"""

from __future__ import annotations

import argparse
import json
import sys

from engram_mem.plan.planner import Hardware, plan
from engram_mem.plan.presets import MODEL_PRESETS, Device, ModelShape, resolve_device, resolve_model, shape_from_config
from engram_mem.plan.report import format_plan
from engram_mem.plan.tiers import (DATA_PLANE_TIER, TIER_PRESETS, PlanInputError, Tier, driven_by, load_tiers,
                                   resolve_tier)
from engram_mem.plan.workload import Workload

_WL_FLAGS = {"mode": "mode", "batch": "batch", "seq_len": "seq_len", "context": "context", "workers": "workers",
             "tokens_per_s": "tokens_per_s", "zipf": "zipf_s", "trace": "trace", "cache_rows": "cache_rows",
             "target_hit_rate": "target_hit_rate", "cache_policy": "cache_policy", "replicas": "replicas", "ahead": "ahead"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="plan a memory cluster for Engram tables; predict the prefetch penalty",
                              description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--input", help="JSON or YAML: {model: preset name or fields, workload: {...}, hardware: {...}}")
    p.add_argument("--model", help=f"model preset: {', '.join(MODEL_PRESETS)}")
    p.add_argument("--config", help="an engram_model config JSON (this repo's models) instead of a preset")
    p.add_argument("--mode", choices=["prefill", "decode", "train"])
    p.add_argument("--batch", type=int, help="sequences per batch")
    p.add_argument("--seq-len", type=int, help="new tokens per sequence per forward (decode: 1)")
    p.add_argument("--context", type=int, help="attended tokens (decode: the KV length)")
    p.add_argument("--workers", type=int)
    p.add_argument("--tokens-per-s", type=float, help="target tokens/s per worker (default: what compute allows)")
    p.add_argument("--zipf", type=float, help="Zipf exponent of the n-gram ids (default 1.0)")
    p.add_argument("--trace", help="ids recorded with engram-train/engram-generate --record-ids (.npz)")
    p.add_argument("--cache-rows", type=int, help="worker hot-row cache, rows per table")
    p.add_argument("--target-hit-rate", type=float)
    p.add_argument("--cache-policy", choices=["lfu", "lru"])
    p.add_argument("--replicas", type=int)
    p.add_argument("--no-prefetch", action="store_true")
    p.add_argument("--ahead", type=int, help="prefill: batches whose rows are fetched before their forward, while the "
                                             "ones before compute (the engine does 1: a prompt's next chunk); default 0")
    p.add_argument("--device", help="compute device preset (h800, h100, b200, here-cpu) or one from --tiers-file")
    p.add_argument("--tier", help=f"where the tables live: {', '.join(TIER_PRESETS)}")
    p.add_argument("--cache-tier", help="where the worker cache lives (default hbm)")
    p.add_argument("--tiers-file", help="measured tiers/devices (written by --calibrate)")
    p.add_argument("--shards-per-node", type=int)
    p.add_argument("--shard-gbps", type=float, help="one shard's serving GB/s (default 10, assumed)")
    p.add_argument("--price", action="append", default=[], metavar="TIER=USD_PER_GB_MONTH")
    p.add_argument("--json", action="store_true")
    p.add_argument("--all-presets", action="store_true", help="a plan for every model preset and remote tier")
    p.add_argument("--calibrate", action="store_true", help="measure this machine's tiers and save them (--out)")
    p.add_argument("--out", default="bench/results/tiers-here.json", help="with --calibrate: where to save")
    p.add_argument("--quick", action="store_true", help="with --calibrate: fewer repeats (about 2 minutes)")
    p.add_argument("--disk-dir", default="/var/tmp", help="with --calibrate: where the here-disk tier's table file "
                   "goes (a directory on the disk to measure; the file is deleted at the end)")
    return p


def _read_input(path: str) -> dict:
    try:
        text = open(path).read()
    except FileNotFoundError:
        raise PlanInputError(f"--input {path!r} does not exist") from None
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - json and yaml raise different errors
        raise PlanInputError(f"--input {path!r} could not be parsed: {e}") from None
    if not isinstance(data, dict) or set(data) - {"model", "workload", "hardware", "prices"}:
        raise PlanInputError(f"--input {path!r}: expected a mapping with keys model, workload, hardware, prices")
    return data


def build(args) -> tuple[ModelShape, Workload, Hardware, dict]:
    """(model, workload, hardware, prices) from --input, then flags, over the presets."""
    data = _read_input(args.input) if args.input else {}
    extra_tiers: dict[str, Tier] = {}
    extra_devices: dict[str, Device] = {}
    hwd = dict(data.get("hardware") or {})
    tiers_file = args.tiers_file or hwd.pop("tiers_file", None)
    if tiers_file:
        extra_tiers = load_tiers(tiers_file)
        with open(tiers_file) as f:
            raw = json.load(f)
        extra_devices = {d["name"]: Device(**d) for d in raw.get("devices", [])} if isinstance(raw, dict) else {}
    # model
    md = data.get("model")
    if args.config:
        model = shape_from_config(args.config)
    elif args.model:
        model = resolve_model(args.model)
    elif isinstance(md, str):
        model = resolve_model(md)
    elif isinstance(md, dict):
        base = md.pop("preset", None) if "preset" in md else None
        model = resolve_model(base, md) if base else ModelShape.from_dict(md)
    else:
        model = resolve_model("v4.1-flash")
    # workload
    wl = dict(data.get("workload") or {})
    for flag, key in _WL_FLAGS.items():
        v = getattr(args, flag, None)
        if v is not None:
            wl[key] = v
    if args.no_prefetch:
        wl["prefetch"] = False
    wl.setdefault("seq_len", 1 if wl.get("mode") == "decode" else 512)
    workload = Workload.from_dict(wl)
    # hardware
    tier = resolve_tier(args.tier or hwd.pop("tier", "rdma-400g"), extra_tiers)
    # A network is never faster than the software driving it: the data plane's measured rate caps a preset.
    tier, binds = driven_by(tier, resolve_tier(DATA_PLANE_TIER, extra_tiers))
    cache_name = args.cache_tier or hwd.pop("cache_tier", "hbm")
    cache = resolve_tier(cache_name, extra_tiers) if cache_name not in (None, "none") else None
    device = resolve_device(args.device or hwd.pop("device", "h800"), extra_devices)
    kw = {k: hwd.pop(k) for k in ("shards_per_node", "shard_gbps", "shares_cpu", "usable_fraction",
                                  "shard_update_s_per_row") if k in hwd}
    if "baseline_tier" in hwd:
        kw["baseline_tier"] = resolve_tier(hwd.pop("baseline_tier"), extra_tiers)
    if hwd:
        raise PlanInputError(f"hardware: unknown fields {sorted(hwd)}")
    if args.shards_per_node is not None:
        kw["shards_per_node"] = args.shards_per_node
    if args.shard_gbps is not None:
        kw["shard_gbps"] = args.shard_gbps
    kw.setdefault("shares_cpu", device.name.startswith("here"))
    hw = Hardware(device=device, rows_tier=tier, cache_tier=cache, link_binds=binds, **kw)
    prices = dict(data.get("prices") or {})
    for item in args.price:
        name, _, val = item.partition("=")
        try:
            prices[name] = float(val)
        except ValueError:
            raise PlanInputError(f"--price {item!r}: expected TIER=USD_PER_GB_MONTH, e.g. rdma-400g=2.5") from None
    return model, workload, hw, prices


def cmd_plan(args) -> int:
    try:
        if args.calibrate:
            from engram_mem.plan.calibrate import calibrate

            calibrate(args.out, quick=args.quick, disk_dir=args.disk_dir)
            return 0
        if args.all_presets:
            return _all_presets(args)
        model, workload, hw, prices = build(args)
        result = plan(model, workload, hw, prices)
    except PlanInputError as e:
        print(f"engram-mem plan: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1, default=float) if args.json else format_plan(result))
    return 0


def _all_presets(args) -> int:
    out = []
    for name in MODEL_PRESETS:
        for mode, wl in (("prefill", Workload(mode="prefill", batch=8, seq_len=1024, workers=8)),
                         ("decode", Workload(mode="decode", batch=64, seq_len=1, context=4096, workers=64,
                                             cache_rows=16_384))):
            for tier in ("host-dram-pcie5", "cxl-pool", "rdma-400g", "tcp-100g", "nvme"):
                rows_tier, binds = driven_by(TIER_PRESETS[tier], TIER_PRESETS[DATA_PLANE_TIER])
                hw = Hardware(device=resolve_device(args.device or "h800"), rows_tier=rows_tier,
                              cache_tier=TIER_PRESETS["hbm"], link_binds=binds)
                p = plan(resolve_model(name), wl, hw)
                out.append({"model": name, "mode": mode, "tier": tier, "nodes": p["sizing"]["nodes"],
                            "GiB/node": round(p["sizing"]["bytes_per_node"] / 2**30, 1),
                            "exposed %": round(p["exposed_wait_pct"], 2), "penalty %": round(p["penalty_pct"], 2),
                            "tok/s/worker": round(p["tokens_per_s_per_worker"]),
                            "saturates first": p["bandwidth"]["saturates_first"],
                            "link": "software" if binds.startswith("data plane") else "line",
                            "util": round(p["bandwidth"]["utilization"][p["bandwidth"]["saturates_first"]], 3)})
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        from engram_mem.plan.report import text_table

        print(text_table(out, list(out[0])))
    return 0
