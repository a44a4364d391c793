"""Where and how urgently a memory-service process runs: the cores a node's fetch agent or a
shard runs on, and its threads' scheduling priority (nice value).

    ClusterConfig(agent_cpus=(15,), shard_cpus=(14, 15))   # on every node; None: the OS decides
    ClusterConfig(agent_nice=-10, shard_nice=-10)          # woken ahead of the model's threads

A node that runs a model on some cores and engram-mem's data path beside it can keep the two
apart, so that a fetch agent woken for each fetch never waits for a core the model holds and the
model's threads never share theirs with it; serving engines bind their processes the same way (a
core list per process). On a 2-core machine with a one-thread model it made no measurable
difference (docs/benchmarks.md, Decode). The cores are named as on each node; a
node that lacks some of them uses those it has, and a node that has none of them leaves the
process where the OS put it (logged), rather than refuse to serve.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("engram_mem.affinity")


def parse_cpus(cpus, what: str) -> tuple[int, ...] | None:
    """A core list as a sorted tuple of distinct ints >= 0 (None stays None), or ValueError naming `what`."""
    if cpus is None:
        return None
    if isinstance(cpus, str):
        cpus = [c for c in cpus.replace(" ", "").split(",") if c]
        try:
            return parse_cpus(_ranges(cpus), what)
        except ValueError:
            raise ValueError(f"{what} {','.join(cpus)!r} must be core numbers like 0,2-3") from None
    try:
        out = tuple(sorted(set(cpus)))
    except TypeError:
        raise ValueError(f"{what} must be a list of core numbers, got {type(cpus).__name__}") from None
    if not out or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 65536 for c in out):
        raise ValueError(f"{what} must be a non-empty list of core numbers in 0..65535, got {list(cpus)}")
    return out


def _ranges(items: list[str]) -> list[int]:
    out: list[int] = []
    for item in items:
        lo, sep, hi = item.partition("-")
        out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    return out


def pin_process(cpus, what: str) -> set[int] | None:
    """Run every thread of this process (and those it starts later) on `cpus`, as far as this node
    has them. Returns the cores applied, or None when nothing was changed (cpus None, or none of
    them here)."""
    if cpus is None:
        return None
    have = os.sched_getaffinity(0)
    use = set(cpus) & have
    if not use:
        log.warning("%s: none of the cores %s is available to this process (it may use %s); left as it is",
                    what, sorted(cpus), sorted(have))
        return None
    if use != set(cpus):
        log.warning("%s: cores %s are not available here; running on %s", what, sorted(set(cpus) - use), sorted(use))
    for tid in _threads():
        try:
            os.sched_setaffinity(tid, use)
        except (ProcessLookupError, PermissionError):  # a thread that ended meanwhile
            pass
    return use


NICE_RANGE = (-20, 19)


def parse_nice(nice, what: str) -> int | None:
    """A nice value as an int in -20..19 (None stays None), or ValueError naming `what`."""
    if nice is None:
        return None
    if isinstance(nice, bool) or not isinstance(nice, (int, str)):
        raise ValueError(f"{what} must be an integer nice value in -20..19, got {nice!r}")
    try:
        n = int(nice)
    except ValueError:
        raise ValueError(f"{what} {nice!r} must be an integer nice value in -20..19") from None
    if not NICE_RANGE[0] <= n <= NICE_RANGE[1]:
        raise ValueError(f"{what} must be in -20..19 (lower runs sooner), got {n}")
    return n


def set_nice(nice: int | None, what: str) -> int | None:
    """Give every thread of this process (and those its threads start later, which inherit it) the
    nice value `nice`. A data path woken for each fetch then gets a core ahead of the model's
    threads instead of after their time slice (on 2 shared cores, -10 took decode's exposed wait
    from 1.58% at nice 0 to 1.12% here: docs/benchmarks.md, Decode). Raising priority (below 0) needs
    CAP_SYS_NICE (root, or `--cap-add SYS_NICE` / a pod's capabilities); without it the process
    keeps its priority, logged, rather than refuse to serve. Returns the value applied, or None."""
    if nice is None:
        now = os.getpriority(os.PRIO_PROCESS, 0)
        if now > 0:
            log.warning("%s runs at nice %d (Ray starts its workers at 15): the model's threads run first on a shared "
                        "core; start Ray with RAY_worker_niceness=0 (engram-mem's own clusters do) or set a nice value",
                        what, now)
        return None
    applied = True
    for tid in _threads():
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass
        except PermissionError:
            applied = False
    if not applied:
        log.warning("%s: not allowed to set nice %d (needs CAP_SYS_NICE); left at %d", what, nice,
                    os.getpriority(os.PRIO_PROCESS, 0))
        return None
    return nice


def thread_nices(pid: int | str = "self") -> dict[int, int]:
    """{thread id: its nice value} of a process."""
    out = {}
    for tid in _threads(pid):
        try:
            out[tid] = os.getpriority(os.PRIO_PROCESS, tid)
        except ProcessLookupError:
            pass
    return out


def thread_affinities(pid: int | str = "self") -> dict[int, set[int]]:
    """{thread id: its cores} of a process (every thread, not just the main one)."""
    out = {}
    for tid in _threads(pid):
        try:
            out[tid] = os.sched_getaffinity(tid)
        except ProcessLookupError:
            pass
    return out


def _threads(pid: int | str = "self") -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:  # no /proc: this thread only
        return [0]
