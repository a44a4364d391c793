"""The files in deploy/ work: the launcher YAML validates against the pinned Ray's schema, KubeRay agrees
with it, and the cluster its start commands make puts every shard on the memory node.

The loopback test follows the "On a real cluster" steps (notes/issue-9-README.md): it runs the
YAML's own start commands (the head's on 127.0.0.2, a memory node's on 127.0.0.3, each with its
node type's resources in RAY_OVERRIDE_RESOURCES as the launcher sets them), with ports, temp dir
and `--block` added so the Ray processes are this test's own; then `engram-mem up --address ...
--shard-resource memory_node=1`, `status --json`, `down`. `ray stop` lines are skipped (they would
stop other Ray clusters on this machine); the test stops its own `ray start --block` processes by
their process group.

    pytest -q tests/integration/test_deploy.py
"""

import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jsonschema
import pytest
import ray
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(ROOT, "deploy")
BIN = os.path.dirname(sys.executable)
HEAD_IP, MEMORY_IP = "127.0.0.2", "127.0.0.3"


def _launcher():
    with open(os.path.join(DEPLOY, "ray-cluster.yaml")) as f:
        return yaml.safe_load(f)


def test_launcher_yaml_validates_against_the_pinned_ray_schema():
    with open(os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")) as f:
        schema = json.load(f)
    cfg = _launcher()
    jsonschema.validate(cfg, schema)
    types = cfg["available_node_types"]
    assert set(types) == {"head", "memory", "gpu"} and cfg["head_node_type"] == "head"
    assert [t for t, v in types.items() if "memory_node" in v["resources"]] == ["memory"]
    assert types["gpu"]["resources"].get("GPU", 0) >= 1 and "GPU" not in types["memory"]["resources"]
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        assert isinstance(cmd, str) and "--resources" not in cmd  # resources come from the node types


def _kuberay_groups():
    with open(os.path.join(DEPLOY, "kuberay.yaml")) as f:
        doc = yaml.safe_load(f)
    assert doc["kind"] == "RayCluster" and doc["spec"]["rayVersion"] == ray.__version__
    groups = {"head": doc["spec"]["headGroupSpec"]}
    groups.update({g["groupName"]: g for g in doc["spec"]["workerGroupSpecs"]})
    return groups


def test_kuberay_manifest_agrees_with_the_launcher_and_names_images_the_dockerfile_builds():
    types = _launcher()["available_node_types"]
    groups = _kuberay_groups()
    assert set(groups) == set(types)
    with open(os.path.join(DEPLOY, "Dockerfile")) as f:
        dockerfile = f.read()
    built = set(re.findall(r"-t (\S+) \.", dockerfile))
    for name, g in groups.items():
        custom = g.get("rayStartParams", {}).get("resources")
        custom = json.loads(json.loads(custom)) if custom else {}  # KubeRay's quoted-JSON string
        want = {k: v for k, v in types[name]["resources"].items() if k not in ("CPU", "GPU")}
        assert custom == want, (name, custom, want)
        containers = g["template"]["spec"]["containers"]
        assert all(c["image"] in built for c in containers), ([c["image"] for c in containers], built)
        gpus = sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in containers)
        assert gpus == types[name]["resources"].get("GPU", 0), name
    assert "pip install --no-cache-dir ." in dockerfile  # the project's own install step


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _start_command(cmd: str, head_port: int, node_ip: str, temp_dir: str) -> tuple[list[str], dict]:
    """A YAML start command made runnable here: our venv's ray, the head address, own ports, --block;
    and the environment its VAR=value prefix sets (token auth, the workers' nice value)."""
    words = shlex.split(cmd.replace("$RAY_HEAD_IP", HEAD_IP))
    env = {}
    while words and "=" in words[0] and not words[0].startswith("-"):
        k, _, v = words.pop(0).partition("=")
        env[k] = v
    assert env == {"RAY_AUTH_MODE": "token", "RAY_worker_niceness": "0"}, cmd
    argv = words
    argv[0] = os.path.join(BIN, "ray")
    argv = [a for a in argv if not a.startswith("--autoscaling-config")]  # written by `ray up` on real heads
    argv = [f"--port={head_port}" if a == "--port=6379" else a.replace(":6379", f":{head_port}") for a in argv]
    p = _free_ports(7)
    argv += [f"--node-ip-address={node_ip}", f"--node-manager-port={p[0]}", f"--object-manager-port={p[1]}",
             f"--dashboard-agent-listen-port={p[2]}", f"--dashboard-agent-grpc-port={p[3]}",
             f"--runtime-env-agent-port={p[4]}", f"--metrics-export-port={p[5]}", "--min-worker-port=0",
             "--max-worker-port=0", "--object-store-memory=200000000", "--disable-usage-stats", "--block"]
    if "--head" in argv:
        argv += [f"--ray-client-server-port={p[6]}", "--include-dashboard=false", f"--temp-dir={temp_dir}"]
    return argv, env


def _wait_nodes(env, address: str, n: int, timeout: float = 180) -> None:
    code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print(sum(1 for x in ray.nodes() if x['Alive']))")
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = subprocess.run([sys.executable, "-c", code, address], env=env, capture_output=True, text=True, timeout=120)
        if r.returncode == 0 and r.stdout.strip().isdigit() and int(r.stdout.strip()) >= n:
            return
        time.sleep(2)
    raise AssertionError(f"the Ray cluster at {address} did not get {n} nodes: {r.stdout} {r.stderr[-2000:]}")


@pytest.mark.slow
def test_yaml_start_commands_make_a_cluster_whose_shards_all_land_on_the_memory_node(tmp_path):
    cfg = _launcher()
    types = cfg["available_node_types"]
    head_port = _free_ports(1)[0]
    temp_dir = tempfile.mkdtemp(prefix="rd", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
               ENGRAM_MEM_HOME=str(tmp_path / "home"), PYTHONPATH=ROOT)
    address = f"{HEAD_IP}:{head_port}"
    procs = []

    def start(cmd, node_type, node_ip):
        argv, cmd_env = _start_command(cmd, head_port, node_ip, temp_dir)
        e = dict(env, **cmd_env, RAY_OVERRIDE_RESOURCES=json.dumps(types[node_type]["resources"]))
        log = open(tmp_path / f"{node_type}.log", "w")
        procs.append(subprocess.Popen(argv, env=e, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    cli = lambda *a: subprocess.run([sys.executable, "-m", "engram_mem.tools.cli", "--name", "deploy-test", *a],  # noqa: E731
                                    env=env, capture_output=True, text=True, timeout=300)
    try:
        for cmd in cfg["head_start_ray_commands"]:
            if " ray stop" not in f" {cmd}" and "/ray stop" not in cmd:
                start(cmd, "head", HEAD_IP)
        _wait_nodes(env, address, 1)
        for cmd in cfg["worker_start_ray_commands"]:
            if "/ray stop" not in cmd:
                start(cmd, "memory", MEMORY_IP)
        _wait_nodes(env, address, 2)
        up = cli("up", "--address", address, "--shards", "2", "--shard-resource", "memory_node=1", "--cpus-per-shard", "1")
        assert up.returncode == 0, up.stdout + up.stderr
        try:
            st = cli("status", "--address", address, "--json", "--interval", "0.1")
            assert st.returncode == 0, st.stderr
            shards = json.loads(st.stdout)["shards"]
            assert len(shards) == 2 and {s["node_ip"] for s in shards} == {MEMORY_IP}, shards
        finally:
            down = cli("down", "--address", address)
        assert down.returncode == 0, down.stdout + down.stderr
    finally:
        for p in procs[::-1]:
            try:
                os.killpg(p.pid, signal.SIGTERM)  # the process group of our own `ray start --block`
            except ProcessLookupError:
                pass
        for p in procs[::-1]:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        time.sleep(1)
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # stragglers of that group (raylet workers)
            except ProcessLookupError:
                pass
        subprocess.run(["rm", "-rf", temp_dir])


def test_grafana_dashboard_queries_only_metrics_a_shard_exports():
    from prometheus_client import generate_latest

    from engram_mem.shard.metrics import ShardMetrics

    with open(os.path.join(DEPLOY, "grafana-engram-mem.json")) as f:
        dash = json.load(f)
    m = ShardMetrics(0)
    for rpc in ("Gather", "Push"):
        m.request(rpc)
        m.observe(rpc, 0.001)
        m.error(rpc, "INVALID_ARGUMENT", "InvalidArgument")
    m.moved("gathered", 1, 4)
    m.watch(log_bytes=lambda: 4096, snapshot_time=lambda: time.time() - 30)  # as the shard actor does
    got = m.summary()
    assert got["log_bytes"] == 4096 and 29 <= got["snapshot_age_seconds"] < 120
    exported = set(re.findall(r"^([a-z_]+)[{ ]", generate_latest(m.registry).decode(), re.M))
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {n for e in exprs for n in re.findall(r"\b((?:engram_mem|process)_[a-z_]+)", e)}
    assert len(dash["panels"]) >= 8 and used and used <= exported, used - exported
