"""node_agent(): the fetch agent of this node for a memory cluster, started by the first worker that asks.

The agent is a named, detached Ray actor pinned to the node (NodeAffinitySchedulingStrategy,
not soft), so every worker of the node finds the same one, whichever process started it, and it
outlives the worker that did. Ray restarts it if its process dies; it ends itself when the
memory cluster's controller is gone (service.py).
"""

from __future__ import annotations

from engram_mem.config import NAMESPACE


def agent_name(cluster_name: str, node_id: str) -> str:
    return f"{cluster_name}-agent-{node_id[:16]}"


def node_agent(client, node_id: str | None = None):
    """The Ray actor handle of this node's fetch agent for `client`'s memory cluster."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from engram_mem.agent.service import FetchAgent

    node_id = node_id or ray.get_runtime_context().get_node_id()
    cluster, cluster_id = client.view.raw["name"], client.view.raw["cluster_id"]
    name = agent_name(cluster, node_id)
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        pass
    return ray.remote(FetchAgent).options(
        name=name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached", num_cpus=0,
        max_restarts=-1, max_task_retries=-1, max_concurrency=4,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(cluster, cluster_id, node_id)
