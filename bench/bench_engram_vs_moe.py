"""Benchmark: Engram-MoE vs a pure MoE of the same total and activated parameters, same data.

    .venv/bin/python bench/bench_engram_vs_moe.py                       # ~25 min on 2 CPU cores
    .venv/bin/python bench/bench_engram_vs_moe.py --steps 20 --no-save  # smoke run

The paper's claim at this machine's scale. The pair of configs (engram_model/configs/
bench_engram.json and bench_moe.json) is iso-parameter: the MoE gets the Engram tables back as
extra routed experts and the Engram projections back as a wider shared expert, so total and
activated parameter counts agree to within 0.1% (checked below, the run refuses otherwise).
Both models see the same token batches in the same order (same data seed) and are scored on the
same fixed validation windows of held-out stdlib files.

Prints a table; appends one JSON line to bench/results/engram_vs_moe.jsonl; writes both
validation curves to bench/results/engram_vs_moe.png. A benchmark, not a test: no assertion on
which model wins.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from engram_model.config import load_config
from engram_model.data import Corpus
from engram_model.model import count_params
from engram_model.train import DEFAULT_RUNS, load_or_train_tokenizer, plot_losses, train, tune_cpu_allocator

RESULTS = Path(__file__).parent / "results"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engram-config", default="bench_engram")
    p.add_argument("--moe-config", default="bench_moe")
    p.add_argument("--steps", type=int, default=None, help="override train.steps for both runs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--no-save", action="store_true", help="print only; write no JSON line or plot")
    p.add_argument("--progress", action="store_true", help="show tqdm bars")
    args = p.parse_args(argv)
    if torch.device(args.device).type == "cpu":
        tune_cpu_allocator()

    runs = {}
    for label, name in (("MoE", args.moe_config), ("Engram-MoE", args.engram_config)):
        m, t = load_config(name)
        if args.steps is not None:
            t = dataclasses.replace(t, steps=args.steps, warmup_steps=min(t.warmup_steps, max(1, args.steps // 10)))
        runs[label] = (name, m, t)
    (_, m_moe, t_moe), (_, m_eng, t_eng) = runs["MoE"], runs["Engram-MoE"]
    if t_moe != t_eng:
        sys.exit("the two configs must share one train section (same data, steps, schedule)")
    if m_moe.engram is not None or m_eng.engram is None:
        sys.exit("--moe-config must have no Engram layers and --engram-config must have some")

    tok = load_or_train_tokenizer(None, t_eng.tokenizer_vocab, t_eng.val_fraction)
    corpus = Corpus.build(tok, t_eng.val_fraction, cache_dir=DEFAULT_RUNS / "cache")
    counts = {label: count_params(m.for_tokenizer(tok)) for label, (_, m, _) in runs.items()}
    for key in ("total", "activated"):
        a, b = counts["MoE"][key], counts["Engram-MoE"][key]
        if abs(a - b) / b > 1e-3:
            sys.exit(f"configs are not iso-parameter: {key} {a} (MoE) vs {b} (Engram-MoE)")
    print(f"tokenizer: {tok.vocab_size} tokens -> {tok.compressed_vocab_size} compressed ({tok.reduction:.2%}); "
          f"corpus: {len(corpus.train) / 1e6:.2f}M train / {len(corpus.val) / 1e6:.3f}M val tokens "
          f"({corpus.n_train_files} / {corpus.n_val_files} files)")

    results = {}
    load_before = os.getloadavg()
    t0 = time.time()
    for label, (name, m, t) in runs.items():
        res = train(m, t, tokenizer=tok, corpus=corpus, device=args.device, progress=args.progress, name=label,
                    log=print)
        h = res.history
        tail = h["loss"][-max(1, len(h["loss"]) // 10):]
        results[label] = {
            "config": name, "params": counts[label], "final_val_loss": h["val_loss"][-1],
            "best_val_loss": min(h["val_loss"]), "final_train_loss": sum(tail) / len(tail),
            "train_seconds": round(h["train_seconds"], 1), "tokens": h["tokens"][-1],
            "tokens_per_second": round(h["tokens"][-1] / h["train_seconds"], 1),
            "val_step": h["val_step"], "val_loss": h["val_loss"],
        }
        del res
    wall = time.time() - t0
    load_after = os.getloadavg()

    moe, eng = results["MoE"], results["Engram-MoE"]
    delta = eng["final_val_loss"] - moe["final_val_loss"]
    cols = ["model", "total params", "activated", "Engram tables", "routed experts", "val loss", "best val",
            "train loss", "time (s)", "tok/s"]
    rows = [[label, f"{r['params']['total'] / 1e6:.3f}M", f"{r['params']['activated'] / 1e6:.3f}M",
             f"{r['params']['engram_tables'] / 1e6:.3f}M", f"{r['params']['routed_experts'] / 1e6:.3f}M",
             f"{r['final_val_loss']:.4f}", f"{r['best_val_loss']:.4f}", f"{r['final_train_loss']:.4f}",
             f"{r['train_seconds']:.0f}", f"{r['tokens_per_second']:.0f}"] for label, r in results.items()]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    print()
    print(line(cols))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    ppl = lambda x: float(torch.tensor(x).exp())
    print(f"\nEngram-MoE - MoE validation loss: {delta:+.4f} nats/token (perplexity {ppl(moe['final_val_loss']):.2f} -> "
          f"{ppl(eng['final_val_loss']):.2f}); {t_eng.steps} steps x {t_eng.tokens_per_step} tokens = "
          f"{eng['tokens'] / 1e6:.2f}M tokens each, {t_eng.dtype} on {args.device}, wall {wall / 60:.1f} min")

    if args.no_save:
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "bench": "engram_vs_moe", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": git_commit(),
        "device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "steps": t_eng.steps,
        "tokens_per_step": t_eng.tokens_per_step, "dtype": t_eng.dtype, "wall_seconds": round(wall, 1),
        # other work on the machine slows the runs (not the losses, which are deterministic)
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
        "tokenizer": {"vocab": tok.vocab_size, "compressed": tok.compressed_vocab_size, "reduction": round(tok.reduction, 4)},
        "delta_val_loss": round(delta, 4), "results": results,
        "model_configs": {label: m.for_tokenizer(tok).to_dict() for label, (_, m, _) in runs.items()},
        "train_config": t_eng.to_dict(),
    }
    with open(out / "engram_vs_moe.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    plot_losses({f"{label} ({r['params']['total'] / 1e6:.1f}M total, {r['params']['activated'] / 1e6:.2f}M active): "
                 f"{r['final_val_loss']:.3f}": (r["val_step"], r["val_loss"]) for label, r in results.items()},
                out / "engram_vs_moe.png", ylabel="validation cross-entropy (nats/token)",
                title=f"Engram-MoE vs MoE, iso-parameter, {eng['tokens'] / 1e6:.1f}M tokens of Python stdlib")
    print(f"wrote {out / 'engram_vs_moe.jsonl'} and {out / 'engram_vs_moe.png'}")


if __name__ == "__main__":
    main()
