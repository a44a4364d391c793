"""Helpers every benchmark uses: time a call, print a table, append a JSON line, draw a plot.

Benchmarks measure; tests assert. Nothing here asserts a speed.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass
class Timing:
    name: str
    seconds: list[float]
    nbytes: int = 0          # bytes moved per call, for GB/s
    extra: dict | None = None

    @property
    def p50(self) -> float:
        return float(np.percentile(self.seconds, 50))

    @property
    def p99(self) -> float:
        return float(np.percentile(self.seconds, 99))

    @property
    def gbps(self) -> float:
        return self.nbytes / self.p50 / 1e9 if self.nbytes else 0.0

    def row(self) -> dict:
        return {"name": self.name, "p50_ms": round(self.p50 * 1e3, 3), "p99_ms": round(self.p99 * 1e3, 3),
                "gbps": round(self.gbps, 4), "calls": len(self.seconds), **(self.extra or {})}


def time_calls(name: str, fn, inputs: list, warmup: int = 3, nbytes: int = 0, extra: dict | None = None) -> Timing:
    """Call fn(x) for each input (after `warmup` untimed calls); one wall-clock time per call."""
    for x in inputs[:warmup]:
        fn(x)
    secs = []
    for x in inputs[warmup:]:
        t0 = time.perf_counter()
        fn(x)
        secs.append(time.perf_counter() - t0)
    return Timing(name, secs, nbytes, extra)


def threads_arg(p, default: int, why: str) -> None:
    """--threads: torch's intra-op threads for a model benchmark (0: torch's default)."""
    p.add_argument("--threads", type=int, default=default,
                   help=f"torch threads (0: torch's default, one per core). 1 leaves this 2-core machine's other "
                        f"core to the data path, as a node with cores of its own for the agent and shards would; {why}")


def set_threads(n: int) -> int:
    """Apply --threads; returns the threads torch uses."""
    import torch

    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def cpu_by_role() -> dict[str, float]:
    """CPU seconds (user + system) used so far by this machine's processes of a run, by role: "model"
    (this process), "agent" (fetch agents), "shards" (shard actors, primaries and replicas), "ray"
    (every other Ray process: raylets, GCS, controller, workers). The difference of two calls is
    what each role spent in between; on these shared cores it says where a step's CPU went, and
    it carries over to machines where the roles have cores of their own."""
    import psutil

    out = {"model": 0.0, "agent": 0.0, "shards": 0.0, "ray": 0.0}
    me = os.getpid()
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["pid"] == me:
                role = "model"
            elif "FetchAgent" in cmd:
                role = "agent"
            elif "Shard" in cmd and cmd.startswith("ray::"):
                role = "shards"
            elif p.info["name"] in ("raylet", "gcs_server") or cmd.startswith("ray::") or "site-packages/ray/" in cmd:
                role = "ray"
            else:
                continue
            t = p.cpu_times()
            out[role] += t.user + t.system
        except psutil.Error:
            continue
    return out


def print_table(rows: list[dict], columns: list[str], title: str = "") -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    lines = [title] if title else []
    lines.append("  ".join(c.ljust(widths[c]) for c in columns))
    lines.append("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        lines.append("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    out += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:,.1f}"
    return "" if v is None else str(v)


def machine() -> dict:
    return {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": _git_commit(),
            # the nice value Ray starts its workers (shards, agents) at; model_setup levels it to 0 unless set
            "ray_worker_niceness": os.environ.get("RAY_worker_niceness")}


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""


def append_jsonl(name: str, record: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps({"machine": machine(), **record}, default=float) + "\n")
    return path


def save_figure(fig, name: str, quick: bool = False) -> str:
    """Write a benchmark's figure to bench/results/<name>.png (<name>-quick.png for a smoke run)."""
    import matplotlib.pyplot as plt

    os.makedirs(RESULTS, exist_ok=True)
    fig.tight_layout()
    path = os.path.join(RESULTS, f"{name}-quick.png" if quick else f"{name}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")
    return path


def bar_plot(name: str, labels: list[str], values: list[float], ylabel: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.png")
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) + 2), 4.2))
    bars = ax.bar(range(len(labels)), values, color="#4477aa")
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
