"""The Ray Serve deployment of engram-serve: replicas that attach to the memory cluster as read-only inference workers.

    engram-serve --checkpoint runs/demo/ckpt --memory local --replicas 2          # `engram-mem up` cluster
    engram-serve --checkpoint runs/demo/ckpt --memory embedded --autoscale 1:4     # one command, all local

    from engram_model.deployment import ServeSpec, deploy
    url = deploy(ServeSpec(checkpoint="runs/demo/ckpt", memory_address=gcs, replicas=2, port=8000))

Each replica loads the checkpoint's dense weights, connects to the memory cluster named
memory_name in the Ray cluster it runs in, reads the Engram rows through ClusterRows (train=False:
no pushes; prefetch and the hot-row cache per replica as for any inference worker) and runs its own
continuous-batching Engine behind the OpenAI API (openai_api.make_app). Serve's proxy spreads
requests over the replicas; responses carry the replica id as `system_fingerprint`. Replicas are
placed by the resources they ask for (replica_resources, e.g. {"GPU": 1} or a custom node resource),
and the deployment either has a fixed number of replicas or autoscales between MIN and MAX on
ongoing requests per replica.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ray import serve


@dataclass
class ServeSpec:
    checkpoint: str
    memory_address: str | None = None      # Ray address of the memory cluster; None: in-process tables
    memory_name: str = "engram-mem"
    model_name: str = "engram"
    replicas: int = 1
    autoscale: tuple[int, int] | None = None   # (min, max) replicas; overrides replicas
    max_batch: int = 16
    policy: str = "continuous"
    prefill_chunk: int = 64
    cache_mb: int = 64
    device: str = "cpu"
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    replica_resources: dict[str, float] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    app_name: str = "engram"
    default_max_tokens: int = 16

    def __post_init__(self):
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.autoscale is not None and not (0 <= self.autoscale[0] <= self.autoscale[1] and self.autoscale[1] >= 1):
            raise ValueError(f"autoscale must be MIN:MAX with 0 <= MIN <= MAX and MAX >= 1, got {self.autoscale}")


@serve.ingress()
class EngramReplica:
    def __init__(self, spec: ServeSpec):
        from engram_model.engine import Engine, EngineConfig

        self.spec, self.mem = spec, None
        if spec.memory_address:
            import engram_mem
            from engram_model.cluster_rows import load_for_inference

            self.mem = engram_mem.connect(spec.memory_address, name=spec.memory_name, read_only=True)  # reads rows only
            model, tok = load_for_inference(spec.checkpoint, self.mem, device=spec.device,
                                            cache_bytes=spec.cache_mb << 20)
        else:
            from engram_model.checkpoint import load_model

            model, tok = load_model(spec.checkpoint, device=spec.device)
        self.engine = Engine(model, tok, EngineConfig(max_batch=spec.max_batch, policy=spec.policy,
                                                         prefill_chunk=spec.prefill_chunk))
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve (not expected)
            self.replica = "local"

    def __serve_build_asgi_app__(self):
        from engram_model.openai_api import make_app

        return make_app(self.engine, self.spec.model_name, self.spec.default_max_tokens,
                        fingerprint=f"engram-{self.replica}")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
            rows = getattr(engine.model, "rows", None)
            if rows is not None:
                rows.close()
        if getattr(self, "mem", None) is not None:
            self.mem.close()


def deploy(spec: ServeSpec, blocking: bool = False) -> str:
    """Start Serve's HTTP proxy on spec.host:port in the current Ray cluster and run the app; -> base URL."""
    serve.start(http_options={"host": spec.host, "port": spec.port})
    options = {"ray_actor_options": {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus,
                                     "resources": dict(spec.replica_resources)},
               # enough requests per replica to fill its batch, plus as many waiting
               "max_ongoing_requests": 2 * spec.max_batch}
    if spec.autoscale is not None:
        lo, hi = spec.autoscale
        options["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
                                         "target_ongoing_requests": max(1, spec.max_batch // 2)}
    else:
        options["num_replicas"] = spec.replicas
    app = serve.deployment(EngramReplica, name="EngramReplica").options(**options).bind(spec)
    serve.run(app, name=spec.app_name, route_prefix="/", blocking=blocking)
    return f"http://{spec.host}:{spec.port}"


def undeploy(spec: ServeSpec) -> None:
    serve.delete(spec.app_name)
