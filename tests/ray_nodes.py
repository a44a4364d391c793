"""Simulated Ray nodes on this machine for multi-node tests (loopback addresses 127.0.0.2, .3, ...)."""

import time


def start_nodes(workers: list[dict], system_config: dict | None = None):
    """A Ray cluster of simulated nodes on this machine: the head at 127.0.0.2 plus `workers` (add_node
    arguments), with ray.init attached; retried like ray_local. Returns (cluster, [worker nodes])."""
    import ray
    from ray.cluster_utils import Cluster

    from engram_mem.control.local import level_worker_niceness

    level_worker_niceness()   # shards and agents at the driver's priority, as engram-mem's own clusters
    if ray.is_initialized():
        ray.shutdown()
    head = dict(num_cpus=4, node_ip_address="127.0.0.2", include_dashboard=False, object_store_memory=256 << 20)
    if system_config:
        head["_system_config"] = system_config
    for attempt in range(4):
        cluster = None
        try:
            cluster = Cluster(initialize_head=True, head_node_args=head)
            nodes = [cluster.add_node(**w) for w in workers]
            ray.init(address=cluster.address, log_to_driver=False)
            return cluster, nodes
        except Exception:
            ray.shutdown()
            if cluster is not None:
                cluster.shutdown()
            if attempt == 3:
                raise
            time.sleep(5 * (attempt + 1))
