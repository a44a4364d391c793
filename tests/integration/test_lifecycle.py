"""`engram-mem up` interrupted at any point, then `down`: real processes, real signals, a real Ray.

Each case runs the CLI as a user does, with its own ENGRAM_MEM_HOME and cluster name. Every
process the CLI starts inherits that ENGRAM_MEM_HOME, so "nothing left" is checked by it (psutil,
every live process's environment) and by Ray's process names among processes newer than the test,
independently of how `down` finds them.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

SHM = "/dev/shm/engram-mem"


def _cli(name, args, env):
    return [sys.executable, "-m", "engram_mem.tools.cli", "--name", name, *args]


def _run(name, args, env, timeout=240):
    return subprocess.run(_cli(name, args, env), env=env, capture_output=True, text=True, timeout=timeout)


def _foreign(p, env: dict, home: str) -> bool:
    """Whether a young Ray process belongs to another cluster on this machine (another `up`'s Ray, a
    test or benchmark running beside this one): its environment names another ENGRAM_MEM_HOME or
    Ray directory, or it holds files open in another `up` cluster's Ray directory. A process that
    says nothing either way is counted as ours."""
    if env.get("ENGRAM_MEM_HOME", home) != home:
        return True
    ours = {ray_dir_of(home, n) for n in _NAMES}
    mark = env.get("ENGRAM_MEM_RAY_DIR")
    if mark is not None and mark not in ours:
        return True
    try:
        opened = {os.readlink(f"/proc/{p.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{p.pid}/fd")}
    except OSError:
        return False
    dirs = {f.split("/")[2] for f in opened if f.startswith("/tmp/engram-mem-ray-")}
    return bool(dirs) and not dirs & {d.split("/")[2] for d in ours}


def ray_dir_of(home: str, name: str) -> str:
    """engram_mem.control.local.ray_dir(name) as the CLI computes it with ENGRAM_MEM_HOME=home."""
    return f"/tmp/engram-mem-ray-{hashlib.sha1(f'{home}/{name}'.encode()).hexdigest()[:12]}"


_NAMES: list[str] = []   # the cluster names this test has used (their Ray directories are ours)


def _ours(home: str, since: float) -> list[str]:
    """Live processes the CLI started (their environment names our ENGRAM_MEM_HOME), or Ray processes
    younger than the test that no other cluster claims: 'name pid' each."""
    out = []
    for p in psutil.process_iter(["pid", "name", "cmdline", "environ", "create_time", "status"]):
        try:
            if p.pid == os.getpid() or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            env = p.info["environ"] or {}
            cmd = " ".join(p.info["cmdline"] or [])
            rayish = p.info["name"] in ("gcs_server", "raylet") or cmd.startswith("ray::") or "site-packages/ray/" in cmd \
                or "ray.util.client.server" in cmd
            if env.get("ENGRAM_MEM_HOME") == home or (rayish and p.info["create_time"] >= since
                                                      and not _foreign(p, env, home)):
                out.append(f"{p.info['name']} {p.pid}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _shm_dirs() -> set[str]:
    return set(os.listdir(SHM)) if os.path.isdir(SHM) else set()


@pytest.fixture
def cli_env(tmp_path):
    home = str(tmp_path / "home")
    env = dict(os.environ, ENGRAM_MEM_HOME=home)
    tables = tmp_path / "tables.json"
    tables.write_text(json.dumps([{"name": "emb", "rows": 20_000, "dim": 8}]))
    return env, home, str(tables), tmp_path


def _leaves_nothing(name, env, home, since, shm_before):
    _NAMES.append(name)
    down = _run(name, ["down"], env, timeout=60)
    assert down.returncode == 0, down.stdout + down.stderr
    left = _ours(home, since)
    assert left == [], f"`down` left processes: {left}; it said: {down.stdout}{down.stderr}"
    assert _shm_dirs() <= shm_before, f"`down` left /dev/shm/engram-mem/{_shm_dirs() - shm_before}"
    assert not os.path.exists(os.path.join(home, f"{name}.json"))
    return down


def test_up_killed_at_any_point_then_down_stops_everything(cli_env):
    """kill -9 of `up` 3, 6 and 9 s into its start (with a data directory and two simulated nodes),
    and a `down` racing an `up` that was not killed: each time down stops every process and removes
    the cluster's /dev/shm directory; `status` then finds nothing."""
    env, home, tables, tmp = cli_env
    since, shm_before = time.time() - 1, _shm_dirs()
    for i, delay in enumerate((3, 6, 9, None)):
        name = f"life-{os.getpid()}-{i}"
        up = subprocess.Popen(_cli(name, ["up", "--shards", "2", "--replicas", "2", "--tables", tables,
                                          "--data-dir", str(tmp / f"data{i}")], env),
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if delay is not None:
            time.sleep(delay)
            up.send_signal(signal.SIGKILL)
            up.wait()
            _leaves_nothing(name, env, home, since, shm_before)
        else:  # down while up is still starting: down stops the up too
            time.sleep(5)
            _leaves_nothing(name, env, home, since, shm_before)
            assert up.wait(timeout=10) != 0
        status = _run(name, ["status"], env)
        assert status.returncode != 0 and "no local memory cluster" in status.stderr


def test_up_repairs_a_half_dead_cluster(cli_env):
    """A cluster whose GCS was killed -9 (raylets, agents and shards still alive): `up` says what it
    found, clears it and starts fresh; the new cluster serves; `down` leaves nothing."""
    env, home, tables, tmp = cli_env
    since, shm_before = time.time() - 1, _shm_dirs()
    name = f"life-{os.getpid()}-gcs"
    first = _run(name, ["up", "--shards", "1", "--tables", tables], env)
    try:
        assert first.returncode == 0, first.stdout + first.stderr
        gcs = [p for p in psutil.process_iter(["name", "environ"])
               if p.info["name"] == "gcs_server" and (p.info["environ"] or {}).get("ENGRAM_MEM_HOME") == home]
        assert len(gcs) == 1
        gcs[0].kill()
        gcs[0].wait(10)
        again = _run(name, ["up", "--shards", "1", "--tables", tables], env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "cleaned up what an earlier" in again.stderr and "accepts no connections" in again.stderr, again.stderr
        status = _run(name, ["status"], env)
        assert status.returncode == 0 and "table emb: 20,000 x 8" in status.stdout, status.stdout + status.stderr
    finally:
        _leaves_nothing(name, env, home, since, shm_before)
