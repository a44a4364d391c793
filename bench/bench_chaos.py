"""Chaos: faults in any order under counted pushes and checked reads, then the invariants counted.

    .venv/bin/python bench/bench_chaos.py [--minutes 10] [--seed 1] [--every 10 40] [--faults a,b,...]

(as root: the data directory is a size-limited tmpfs it mounts; run it under flock /tmp/engram-ray.lock.)

A cluster started as an operator does (`engram-mem up --shards 2 --replicas 2 --replica-ack all
--data-dir <tmpfs>`: two simulated Ray nodes, 127.0.0.2 and .3), two writers pushing the
known-effect workload of tests/kill_workload.py (SGD lr 1, gradient -1: an acknowledged push adds
exactly 1.0; each writer its own pair of rows per push, and 256 "ballast" rows every push of both
writers adds to), two readers checking every row they read (a pair row is 0 or 1, 1 once its push
was acknowledged, never back to 0 once seen; a ballast row lies between the pushes acknowledged
before the read and those started by its end, and never decreases for that reader), and a nemesis
that, from a seeded schedule (each round every kind once, in a seeded order), every `--every`
seconds starts one fault in its own thread, so faults overlap:

- kill -9 of a primary, a replica, the controller, or a client process mid-push (another client
  then retries its unacknowledged pushes with their keys);
- kill -9 of the `scale` or `checkpoint` CLI process mid-command, and of an `up` mid-start (of a
  side cluster, the main one being up), followed by that side cluster's `down`;
- SIGSTOP of a shard member for 5-15 s; a scale 2 <-> 3;
- a shard's directory deleted, then its primary killed (it restores from its in-sync replica);
- the data disk filled until writes are refused, then freed.

At the end it heals everything, stops the writers and counts: acknowledged pushes lost, applied
twice, reported failed yet present, rows differing from the acknowledged history, read violations,
requests failed by kind, the longest stretch without an acknowledged push (and without a read)
per fault kind; then `down`, `up` again on the same data directory (the rows must come back
equal) and `down`, with every process and /dev/shm file of both clusters gone.

Prints a table, appends a JSON line to bench/results/chaos.jsonl and draws bench/results/chaos.png.
`run()` is what tests/integration/test_chaos.py calls with a short schedule and a fixed seed.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (HERE, ROOT):
    if p not in sys.path:
        sys.path.insert(0, p)

FAULTS = ("kill-primary", "kill-replica", "kill-controller", "kill-client", "kill-up", "kill-scale",
          "kill-checkpoint", "sigstop-shard", "scale", "delete-shard-dir", "disk-full")
TABLE, BALLAST = "k", 256
CLIENT_PUSHES = 400  # rows reserved for each killed client process


@dataclass
class Event:
    kind: str
    t0: float
    t1: float = 0.0
    detail: str = ""
    error: str = ""


@dataclass
class Config:
    seconds: float = 600
    seed: int = 1
    every: tuple = (10.0, 40.0)
    stop_s: tuple = (5.0, 15.0)       # SIGSTOP length
    faults: tuple = FAULTS
    workdir: str = ""
    name: str = "chaos"
    disk_mb: int = 256
    restart_check: bool = True
    rounds: int = 0                   # > 0: stop after that many rounds (each kind once per round)
    rows: int = 1 << 18               # table rows: two writers use half of them, ~50 pushes/s each on 2 cores
    snapshot_s: float = 10.0
    log: list = field(default_factory=list)


def _cli(cfg: Config, *args, name: str | None = None) -> list[str]:
    return [sys.executable, "-m", "engram_mem.tools.cli", "--name", name or cfg.name, *args]


class Reader(threading.Thread):
    """Gathers the ballast and a sample of pair rows in a loop; checks each value against what the
    writers were told before the read and what they had started by its end."""

    def __init__(self, mem, writers, ballast, seed):
        super().__init__(daemon=True)
        self.mem, self.writers, self.ballast = mem, writers, ballast[:64]
        self.rng = np.random.default_rng(seed)
        self.stop = threading.Event()
        self.reads, self.ok_at, self.errors, self.violations = 0, [], {}, []
        self.seen_one: set[int] = set()
        self.ballast_max = 0.0

    def run(self):
        while not self.stop.is_set():
            told = [list(w.told) for w in self.writers]       # ended before the read
            picks = []
            for w, t in zip(self.writers, told):
                n = min(len(t) + 1, len(w.rows))
                for i in self.rng.integers(0, n, 16) if n else []:
                    picks.append((w, t, int(i)))
            ids = np.concatenate([self.ballast] + [w.rows[i] for w, _, i in picks]).astype(np.int64)
            try:
                got = self.mem.gather(TABLE, ids)
            except Exception as e:  # noqa: BLE001 - counted by kind
                k = type(e).__name__
                self.errors[k] = self.errors.get(k, 0) + 1
                time.sleep(0.2)
                continue
            started = sum(len(w.told) + 1 for w in self.writers)  # by the read's end (one in flight each)
            self.reads += 1
            self.ok_at.append(time.monotonic())
            v = got[:, 0]
            if not np.all(got == got[:, :1]) or not np.all(v == np.round(v)):
                self.violations.append("a row's columns disagree or are not whole numbers")
            acked = sum(sum(1 for x in t if x in ("acked", "maybe->acked")) for t in told)
            b = v[:self.ballast.size]
            if b.min() < acked or b.max() > started or b.min() < self.ballast_max:
                self.violations.append(f"ballast {b.min():.0f}..{b.max():.0f}, acked before {acked}, "
                                       f"started by the end {started}, seen before {self.ballast_max:.0f}")
            self.ballast_max = max(self.ballast_max, float(b.min()))
            for j, (w, t, i) in enumerate(picks):
                pair = v[self.ballast.size + 2 * j: self.ballast.size + 2 * j + 2]
                row = int(w.rows[i][0])
                must = i < len(t) and t[i] in ("acked", "maybe->acked")
                if pair.max() > 1 or (must and pair.min() < 1) or (row in self.seen_one and pair.min() < 1):
                    self.violations.append(f"push {i} rows {w.rows[i].tolist()} read {pair.tolist()}, "
                                           f"told {t[i] if i < len(t) else 'in flight'}")
                if pair.min() >= 1:
                    self.seen_one.add(row)
            time.sleep(0.02)


class Chaos:
    def __init__(self, cfg: Config):
        from engram_mem.control import local

        self.cfg, self.local = cfg, local
        self.rng = random.Random(cfg.seed)
        self.home = os.path.join(cfg.workdir, "home")
        self.data = os.path.join(cfg.workdir, "data")
        local.STATE_DIR = self.home  # this process finds the cluster where the CLI put it
        self.env = dict(os.environ, ENGRAM_MEM_HOME=self.home)
        self.events: list[Event] = []
        self.running: dict[str, threading.Thread] = {}
        self.stopped: set[int] = set()
        self.exclusive = threading.Lock()   # delete-shard-dir runs alone
        self.clients: list[dict] = []        # killed client processes: their rows and what they logged
        self.side_left: list[str] = []
        self.scale_refused: list[str] = []   # scales refused, nothing changed, while disk-full ran
        self.cli_errors: list[str] = []
        self.filler = os.path.join(self.data, "filler")
        self.shards = 2

    # ---- the cluster -----------------------------------------------------------------------
    def start(self):
        import ray

        import engram_mem
        from tests.kill_workload import rows_of_push

        os.makedirs(self.data, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.cfg.disk_mb}m", "tmpfs", self.data], check=True)
        self.up_args = ["up", "--shards", "2", "--replicas", "2", "--replica-ack", "all", "--data-dir", self.data,
                        "--snapshot-interval", str(self.cfg.snapshot_s)]
        out = subprocess.run(_cli(self.cfg, *self.up_args), env=self.env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        self.state = self.local.load_state(self.cfg.name)
        self.local.attach_ray(self.state["ray_address"])
        self.ray = ray
        self.mem = engram_mem.connect(name=self.cfg.name)
        self.mem.create_table(TABLE, rows=self.cfg.rows, dim=4, optimizer={"name": "sgd"}, init_std=0.0)
        pairs, ballast = rows_of_push(self.mem.view, TABLE, self.cfg.rows, rows=self.cfg.rows)
        self.ballast = ballast[:BALLAST]
        n_client = len(self.cfg.faults) and 40 * CLIENT_PUSHES
        self.client_pairs = pairs[:n_client]
        pairs = pairs[n_client:]
        self.writer_pairs = [pairs[0::2], pairs[1::2]]

    def clients_start(self):
        import engram_mem
        from tests.kill_workload import Pusher

        self.wmem = [engram_mem.connect(name=self.cfg.name) for _ in range(2)]
        self.writers = [Pusher(m, TABLE, rows, self.ballast) for m, rows in zip(self.wmem, self.writer_pairs)]
        self.rmem = [engram_mem.connect(name=self.cfg.name) for _ in range(2)]
        self.readers = [Reader(m, self.writers, self.ballast, self.cfg.seed + i) for i, m in enumerate(self.rmem)]
        for t in self.writers + self.readers:
            t.start()

    # ---- the nemesis -----------------------------------------------------------------------
    def nemesis(self):
        self.t_start = time.monotonic()
        end = self.t_start + self.cfg.seconds
        order: list[str] = []
        started = 0
        while not (self.cfg.rounds and started >= self.cfg.rounds * len(self.cfg.faults)):
            wait = self.rng.uniform(*self.cfg.every)
            if time.monotonic() + wait > end:
                break
            time.sleep(wait)
            if not order:  # the schedule: every kind once per round, in a seeded order
                order = self.rng.sample(list(self.cfg.faults), len(self.cfg.faults))
            kind, seed = order.pop(0), self.rng.randrange(1 << 30)
            started += 1
            if kind in self.running and self.running[kind].is_alive():
                self.cfg.log.append(f"{time.monotonic() - self.t_start:7.1f}s {kind}: skipped, the last one still runs")
                continue
            th = threading.Thread(target=self._fault, args=(kind, random.Random(seed)), daemon=True)
            self.running[kind] = th
            th.start()
        time.sleep(self.cfg.every[0] if self.cfg.rounds else max(0.0, end - time.monotonic()))

    def _fault(self, kind: str, rng: random.Random):
        ev = Event(kind, time.monotonic())
        self.events.append(ev)
        try:
            if kind == "delete-shard-dir":
                with self.exclusive:
                    ev.detail = getattr(self, "_f_" + kind.replace("-", "_"))(rng)
            else:
                with _shared(self.exclusive):
                    ev.detail = getattr(self, "_f_" + kind.replace("-", "_"))(rng)
        except Exception as e:  # noqa: BLE001 - a fault that could not be injected is reported, not fatal
            ev.error = f"{type(e).__name__}: {e}"[:300]
        ev.t1 = time.monotonic()
        line = f"{ev.t0 - self.t_start:7.1f}s {kind} ({ev.t1 - ev.t0:.1f}s): {ev.detail}" + \
            (f" ERROR {ev.error}" if ev.error else "")
        self.cfg.log.append(line)
        print(line, flush=True)

    def _live(self) -> dict:
        return self.mem.refresh(check_shards=True).raw["shards"]

    def _member_pid(self, rng, member: int):
        shards = self._live()
        sid = rng.choice(sorted(shards))
        s = shards[sid]
        return sid, (s["pid"] if member == 0 else s["replicas"][member - 1]["pid"])

    def _f_kill_primary(self, rng):
        sid, pid = self._member_pid(rng, 0)
        os.kill(pid, signal.SIGKILL)
        return f"shard {sid} pid {pid}"

    def _f_kill_replica(self, rng):
        sid, pid = self._member_pid(rng, 1)
        os.kill(pid, signal.SIGKILL)
        return f"shard {sid} replica pid {pid}"

    def _f_kill_controller(self, rng):
        procs = [p for p in self.local.ray_processes(self.cfg.name)
                 if (p.cmdline() or [""])[0].startswith("ray::ClusterController")]
        for p in procs:
            p.kill()
        return f"pid {[p.pid for p in procs]}"

    def _f_sigstop_shard(self, rng):
        sid, pid = self._member_pid(rng, rng.choice([0, 1]))
        secs = rng.uniform(*self.cfg.stop_s)
        os.kill(pid, signal.SIGSTOP)
        self.stopped.add(pid)
        time.sleep(secs)
        _cont(pid)
        self.stopped.discard(pid)
        return f"shard {sid} pid {pid} for {secs:.1f}s"

    def _f_scale(self, rng):
        """A scale 2 <-> 3. Refused with ResourceExhausted ("nothing changed") while `disk-full` holds the
        data disk full (a new shard cannot create its directory, or the switch cannot write the cluster
        file): that is the cluster's answer, counted in scale_refused, not a fault that failed."""
        from engram_mem.errors import ResourceExhausted

        n = 3 if len(self.mem.view.shard_ids) == 2 else 2
        t0 = time.monotonic()
        try:
            self.mem.scale(n)
        except ResourceExhausted as e:
            said = str(getattr(e, "cause", None) or e).strip().splitlines()[-1]
            full = [x for x in self.events if x.kind == "disk-full" and (not x.t1 or x.t1 >= t0)]
            if "refused, nothing changed" not in said or not full:
                raise
            self.scale_refused.append(said[:300])
            return f"to {n}: refused while the disk is full ({said[:160]})"
        return f"to {n}"

    def _kill_cli(self, rng, args, lo, hi, name=None):
        p = subprocess.Popen(_cli(self.cfg, *args, name=name), env=self.env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        after = rng.uniform(lo, hi)
        try:
            out, _ = p.communicate(timeout=after)
            said = " | ".join(x for x in out.strip().splitlines() if "authentication" not in x)
            return f"{' '.join(args)} finished before the kill ({after:.1f}s): {said[-200:]}"
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            return f"{' '.join(args)} killed after {after:.1f}s"

    def _f_kill_scale(self, rng):
        n = 3 if len(self.mem.view.shard_ids) == 2 else 2
        return self._kill_cli(rng, ["scale", str(n)], 2.5, 6.0)  # after its attach (~2 s)

    def _f_kill_checkpoint(self, rng):
        return self._kill_cli(rng, ["checkpoint"], 2.5, 4.0)

    def _f_kill_up(self, rng):
        """`up` of a side cluster killed mid-start, then `down`: nothing of it may stay."""
        side = f"{self.cfg.name}-side"
        what = self._kill_cli(rng, ["up", "--shards", "1"], 2.0, 10.0, name=side)
        down = subprocess.run(_cli(self.cfg, "down", name=side), env=self.env, capture_output=True, text=True,
                              timeout=120)
        left = [f"{p.pid}" for p in self.local.ray_processes(side)]
        if down.returncode != 0 or left:
            self.side_left.append(f"down rc {down.returncode} {down.stderr[-200:]} left {left}")
        return f"{what}; down: {down.stdout.strip()[-120:]}"

    def _f_delete_shard_dir(self, rng):
        """A shard's directory deleted, then its primary killed: it restores from its in-sync replica."""
        from engram_mem.storage.snapshot import shard_dir

        deadline = time.monotonic() + 60
        while True:
            shards = self._live()
            sid = rng.choice(sorted(shards))
            s = shards[sid]
            rep = s.get("replication") or {}
            if s.get("ready") and rep and all(r.get("in_sync") for r in rep.values()):
                break
            assert time.monotonic() < deadline, f"no shard with an in-sync replica in 60 s: {rep}"
            time.sleep(1)
        shutil.rmtree(shard_dir(self.data, int(sid)), ignore_errors=True)
        time.sleep(rng.uniform(0.5, 3))
        os.kill(s["pid"], signal.SIGKILL)
        self._wait_ready(180)  # alone: nothing else happens to the cluster until it is back
        return f"shard {sid} directory deleted, pid {s['pid']} killed"

    def _f_disk_full(self, rng):
        """Fill the data disk until a writer is refused (or 15 s), hold 1-5 s, free it."""
        refused0 = sum(w.told.count("refused") for w in self.writers)
        t0 = time.monotonic()
        with open(self.filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError:
                pass
            while time.monotonic() - t0 < 15 and sum(w.told.count("refused") for w in self.writers) == refused0:
                time.sleep(0.1)
            time.sleep(rng.uniform(1, 5))
        os.unlink(self.filler)
        refused = sum(w.told.count("refused") for w in self.writers) - refused0
        return f"full for {time.monotonic() - t0:.1f}s, {refused} push(es) refused"

    def _f_kill_client(self, rng):
        """A client process pushing with its own keys, killed mid-push; another retries its unacknowledged
        pushes with their keys."""
        k = len(self.clients)
        if (k + 1) * CLIENT_PUSHES > len(self.client_pairs):
            return "no rows left for another client"
        rows = self.client_pairs[k * CLIENT_PUSHES:(k + 1) * CLIENT_PUSHES]
        base = os.path.join(self.cfg.workdir, f"client{k}")
        np.save(base + ".npy", rows)
        cid = f"chaos-client-{self.cfg.seed}-{k}"
        rec = {"rows": rows, "cid": cid, "log": base + ".log"}
        self.clients.append(rec)
        p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--client", self.cfg.name, base + ".npy",
                              cid, rec["log"]], env=self.env, stdout=subprocess.DEVNULL, stderr=open(base + ".err", "w"))
        want, deadline = rng.randint(3, 40), time.monotonic() + 60
        while time.monotonic() < deadline and p.poll() is None and _log(rec["log"])[1] < want:
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.2))
        p.kill()
        p.wait()
        started, acked = _log(rec["log"])
        for i in range(acked, started):  # the one in flight (if any): retried under its key
            self._push_client(rec, i)
        rec["n"] = started
        how = "killed" if p.returncode == -signal.SIGKILL else f"exited {p.returncode} ({_last_error(base + '.err')})"
        return f"pid {p.pid} {how} after {acked} acked, {started - acked} in flight (retried with its key)"

    def _push_client(self, rec, i):
        g = -np.ones((2, 4), np.float32)
        end = time.monotonic() + 300
        while True:
            try:
                return self.mem.push(TABLE, rec["rows"][i], g, lr=1.0, key=(rec["cid"], i + 1))
            except Exception:  # noqa: BLE001 - retried under its key until acknowledged
                if time.monotonic() > end:
                    raise
                time.sleep(0.3)

    # ---- heal and count --------------------------------------------------------------------
    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            try:
                shards = self._live()
                if all(s.get("ready") and all(r.get("ready") for r in s.get("replicas", [])) for s in shards.values()):
                    return
            except Exception:  # noqa: BLE001 - a member still restarting
                pass
            assert time.monotonic() < deadline, "the cluster did not come back ready"
            time.sleep(0.5)

    def heal(self):
        for pid in list(self.stopped):
            _cont(pid)
        for th in list(self.running.values()):
            th.join(timeout=300)
        if os.path.exists(self.filler):
            os.unlink(self.filler)
        self._wait_ready(300)
        time.sleep(2)  # the writers' pushes in flight through the last fault end
        for t in self.writers + self.readers:
            t.stop.set()
        for t in self.writers + self.readers:
            t.join(timeout=400)

    def count(self) -> dict:
        told = [np.array(w.told) for w in self.writers]
        got = [self.mem.gather(TABLE, w.rows[:len(t)].reshape(-1)).reshape(len(t), 2, 4) if len(t) else
               np.zeros((0, 2, 4), np.float32) for w, t in zip(self.writers, told)]
        rest = [self.mem.gather(TABLE, w.rows[len(t):len(t) + 200].reshape(-1)) for w, t in zip(self.writers, told)]
        ballast = self.mem.gather(TABLE, self.ballast)
        n = {k: int(sum((t == k).sum() for t in told)) for k in ("acked", "maybe->acked", "unavailable", "refused", "other")}
        ok = [(t == "acked") | (t == "maybe->acked") for t in told]
        unav = [t == "unavailable" for t in told]
        refused = [t == "refused" for t in told]
        applied = [g[:, :, 0] for g in got]
        cl = [self.mem.gather(TABLE, c["rows"].reshape(-1))[:, 0].reshape(-1, 2) for c in self.clients if "n" in c]
        cl_n = [c["n"] for c in self.clients if "n" in c]
        # counted in pushes: lost (acknowledged, a row missing), twice (a row above 1), reported failed yet
        # present (Unavailable: "not applied"), refused yet present (ResourceExhausted: "nothing applied")
        lost = sum(int((a[o].min(axis=1) < 1).sum()) for a, o in zip(applied, ok)) + \
            sum(int((c[:k].min(axis=1) < 1).sum()) for c, k in zip(cl, cl_n))
        twice = sum(int((a.max(axis=1) > 1).sum()) for a in applied) + sum(int((c.max(axis=1) > 1).sum()) for c in cl)
        failed_present = sum(int((a[f].max(axis=1) > 0).sum()) for a, f in zip(applied, unav))
        refused_present = sum(int((a[f].max(axis=1) > 0).sum()) for a, f in zip(applied, refused))
        # rows: each as the history says (a refused push's rows are counted above, an 'other' one's are unknown)
        n_ok = sum(int(o.sum()) for o in ok)
        differing = sum(int((a[o] != 1).sum() + (a[f] != 0).sum()) for a, o, f in zip(applied, ok, unav)) + \
            sum(int((c[:k] != 1).sum() + (c[k:] != 0).sum()) for c, k in zip(cl, cl_n)) + \
            int(((ballast < n_ok) | (ballast > n_ok + n["refused"] + n["other"])).sum()) + \
            sum(int((r != 0).sum()) for r in rest) + sum(int((g != g[:, :, :1]).sum()) for g in got)
        self.final = {"writers": [g.copy() for g in got], "ballast": ballast.copy(), "clients": [c.copy() for c in cl]}
        return {"pushes": dict(n, total=sum(n.values()), client_processes=len(cl), client_pushes=sum(cl_n)),
                "lost": lost, "applied_twice": twice, "failed_present": failed_present,
                "refused_present": refused_present, "rows_differing": differing,
                "read_violations": sum(len(r.violations) for r in self.readers),
                "reads": sum(r.reads for r in self.readers),
                "read_errors": _merge([r.errors for r in self.readers]),
                "push_errors": [e[:200] for w in self.writers for e in w.other][:10],
                "violations": [v for r in self.readers for v in r.violations][:10]}

    def stalls(self) -> dict:
        """The longest stretch without an acknowledged push (writes) and without a read (reads), per fault
        kind active at the stretch's start (or started during it)."""
        w_ok = sorted(t for w in self.writers for k, t in zip(w.told, w.ended_at) if k in ("acked", "maybe->acked"))
        r_ok = sorted(t for r in self.readers for t in r.ok_at)
        out = {}
        for what, ok in (("write", w_ok), ("read", r_ok)):
            for a, b in zip(ok, ok[1:]):
                if b - a < 0.5:
                    continue
                kinds = {e.kind for e in self.events if e.t0 <= b and (e.t1 or b) + 1.0 >= a}
                for k in kinds or {"(none)"}:
                    d = out.setdefault(k, {"write": 0.0, "read": 0.0})
                    d[what] = max(d[what], b - a)
        return out

    def down_up_check(self) -> dict:
        """down; up on the same data dir: every row back as it was; down; nothing of the cluster left."""
        import engram_mem

        for m in self.wmem + self.rmem + [self.mem]:
            m.close()
        self.ray.shutdown()
        res = {}
        down = subprocess.run(_cli(self.cfg, "down"), env=self.env, capture_output=True, text=True, timeout=120)
        res["down"] = down.stdout.strip()[-200:] + down.stderr.strip()[-200:]
        if self.cfg.restart_check:
            up = subprocess.run(_cli(self.cfg, *self.up_args), env=self.env, capture_output=True, text=True,
                                timeout=300)
            if up.returncode != 0:
                res["up_after"] = up.stdout[-300:] + up.stderr[-500:]
                res["rows_differing_after_restart"] = -1
            else:
                self.local.attach_ray(self.local.load_state(self.cfg.name)["ray_address"])
                with engram_mem.connect(name=self.cfg.name) as mem:
                    diff = int((mem.gather(TABLE, self.ballast) != self.final["ballast"]).sum())
                    for w, g in zip(self.writers, self.final["writers"]):
                        if len(g):
                            diff += int((mem.gather(TABLE, w.rows[:len(g)].reshape(-1)).reshape(g.shape) != g).sum())
                    for c, g in zip([c for c in self.clients if "n" in c], self.final["clients"]):
                        diff += int((mem.gather(TABLE, c["rows"].reshape(-1))[:, 0].reshape(-1, 2) != g).sum())
                    res["rows_differing_after_restart"] = diff
                self.ray.shutdown()
                subprocess.run(_cli(self.cfg, "down"), env=self.env, capture_output=True, text=True, timeout=120)
        left = [f"{p.pid}" for n in (self.cfg.name, f"{self.cfg.name}-side") for p in self.local.ray_processes(n)]
        shm = [os.path.join(self.state["shm_dir"], self.state["cluster_id"])]
        res["left_processes"] = left + self.side_left
        res["left_shm"] = [s for s in shm if os.path.exists(s)]
        return res

    def cleanup(self):
        for pid in list(self.stopped):
            _cont(pid)
        try:
            import ray

            ray.shutdown()
        except Exception:  # noqa: BLE001
            pass
        for n in (self.cfg.name, f"{self.cfg.name}-side"):
            self.local.teardown(n, clean_timeout=0)
        subprocess.run(["umount", "-l", self.data], capture_output=True)


class _shared:
    """Faults other than delete-shard-dir wait while one runs (it needs a quiet shard to delete)."""

    def __init__(self, lock):
        self.lock = lock

    def __enter__(self):
        with self.lock:
            pass

    def __exit__(self, *exc):
        return False


def _cont(pid):
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def _merge(ds):
    out = {}
    for d in ds:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _last_error(path) -> str:
    try:
        with open(path) as f:
            lines = [x for x in f.read().strip().splitlines() if "authentication" not in x]
    except FileNotFoundError:
        return ""
    return lines[-1][-200:] if lines else ""


def _log(path) -> tuple[int, int]:
    """(pushes started, pushes acknowledged) of a client process's log."""
    try:
        with open(path) as f:
            lines = f.read().split("\n")[:-1]  # a torn last line is not counted
    except FileNotFoundError:
        return 0, 0
    return sum(1 for x in lines if x.startswith("s")), sum(1 for x in lines if x.startswith("a"))


def client_process(name, rows_file, cid, log_path):
    """A client that pushes its rows one by one with keys (cid, i + 1), logging each start and ack."""
    import engram_mem

    rows = np.load(rows_file)
    g = -np.ones((2, 4), np.float32)
    with engram_mem.connect(name=name) as mem, open(log_path, "a") as log:
        for i, pair in enumerate(rows):
            log.write(f"s {i}\n")
            log.flush()
            mem.push(TABLE, pair, g, lr=1.0, key=(cid, i + 1))
            log.write(f"a {i}\n")
            log.flush()


def run(cfg: Config) -> dict:
    """One chaos run; returns the report (the invariants, faults, stalls)."""
    own = not cfg.workdir
    if own:
        cfg.workdir = tempfile.mkdtemp(prefix="engram-chaos-")
    ch = Chaos(cfg)
    t0 = time.monotonic()
    try:
        ch.start()
        ch.clients_start()
        print(f"chaos: cluster up ({time.monotonic() - t0:.0f}s), writers and readers running; "
              f"{cfg.seconds:.0f}s of faults", flush=True)
        ch.nemesis()
        print("chaos: healing", flush=True)
        ch.heal()
        rep = ch.count()
        print(f"chaos: counted ({time.monotonic() - t0:.0f}s); down, up, down", flush=True)
        rep["stalls"] = ch.stalls()
        rep["faults"] = _merge([{e.kind: 1} for e in ch.events])
        rep["fault_errors"] = [f"{e.kind}: {e.error}" for e in ch.events if e.error]
        rep["scale_refused"] = ch.scale_refused
        try:
            rep.update(ch.down_up_check())
        except Exception as e:  # noqa: BLE001 - the counts above stand; the restart check is reported failed
            ch.cleanup()  # what the run left is then what teardown could not remove
            shm = os.path.join(ch.state["shm_dir"], ch.state["cluster_id"])
            rep.update(rows_differing_after_restart=-1, up_after=f"down/up/down failed: {type(e).__name__}: {e}"[:500],
                       left_processes=[f"{p.pid}" for n in (cfg.name, f"{cfg.name}-side")
                                       for p in ch.local.ray_processes(n)] + ch.side_left,
                       left_shm=[shm] if os.path.exists(shm) else [])
        rep["seconds"] = round(time.monotonic() - t0, 1)
        rep["seed"], rep["schedule_s"], rep["every"] = cfg.seed, cfg.seconds, list(cfg.every)
        rep["log"] = cfg.log
        return rep
    finally:
        ch.cleanup()
        if own:
            shutil.rmtree(cfg.workdir, ignore_errors=True)


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--client":
        return client_process(*sys.argv[2:6])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--every", type=float, nargs=2, default=(10.0, 40.0))
    p.add_argument("--faults", default=",".join(FAULTS))
    p.add_argument("--name", default="chaos")
    args = p.parse_args(argv)
    from common import append_jsonl, print_table, save_figure

    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench_chaos: stopped by SIGTERM"))  # run() cleans up

    long = args.minutes >= 10  # enough rows for ~80 min of pushes, and room for their snapshots
    cfg = Config(seconds=args.minutes * 60, seed=args.seed, every=tuple(args.every),
                 faults=tuple(args.faults.split(",")), name=args.name, rows=1 << 20 if long else 1 << 18,
                 disk_mb=768 if long else 256, snapshot_s=30.0 if long else 10.0)
    rep = run(cfg)
    rows = [{"fault": k, "injected": n, "longest write stall s": round(rep["stalls"].get(k, {}).get("write", 0.0), 1),
             "longest read stall s": round(rep["stalls"].get(k, {}).get("read", 0.0), 1)}
            for k, n in sorted(rep["faults"].items())]
    print_table(rows, ["fault", "injected", "longest write stall s", "longest read stall s"],
                title=f"chaos: {rep['seconds']:.0f} s, seed {rep['seed']}, a fault every {cfg.every[0]:.0f}-{cfg.every[1]:.0f} s")
    inv = {k: rep[k] for k in ("lost", "applied_twice", "failed_present", "refused_present", "rows_differing",
                               "read_violations",
                               "rows_differing_after_restart")}
    print_table([dict(rep["pushes"], reads=rep["reads"], **inv)],
                list(rep["pushes"]) + ["reads", *inv])
    print("read errors:", rep["read_errors"], "| push errors:", rep["push_errors"][:3],
          "| fault errors:", rep["fault_errors"][:5], "| scales refused:", len(rep["scale_refused"]), "| left:", rep["left_processes"], rep["left_shm"])
    append_jsonl("chaos", {k: v for k, v in rep.items() if k != "log"})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    kinds = sorted(rep["faults"])
    x = np.arange(len(kinds))
    ax.bar(x - 0.2, [rep["stalls"].get(k, {}).get("write", 0) for k in kinds], 0.4, label="no acknowledged push")
    ax.bar(x + 0.2, [rep["stalls"].get(k, {}).get("read", 0) for k in kinds], 0.4, label="no read")
    ax.set_xticks(x, [f"{k} ({rep['faults'][k]})" for k in kinds], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("longest stretch, s")
    ax.set_title(f"chaos {rep['seconds'] / 60:.1f} min, seed {rep['seed']}: lost {rep['lost']}, "
                 f"twice {rep['applied_twice']}, acked {rep['pushes']['acked'] + rep['pushes']['maybe->acked']}",
                 fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, "chaos", quick=args.minutes < 10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
