"""Shared set-up of the model benchmarks: the two-node local Ray cluster, memory clusters pinned to a
node, the tokenizer, real text, and a model whose Engram tables are sized by --table-gb."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
NODE_A, NODE_B = "127.0.0.2", "127.0.0.3"


def start_two_nodes(cpus: int = 4, object_store_bytes: int = 1 << 30):
    """Ray head on 127.0.0.2 (this process, resource node_a) and a second node on 127.0.0.3 (node_b)."""
    import ray
    from ray.cluster_utils import Cluster

    from engram_mem.control.local import level_worker_niceness

    level_worker_niceness()   # shards and agents at the model's priority, as engram-mem's own clusters
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=cpus, node_ip_address=NODE_A, include_dashboard=False, resources={"node_a": 100},
        object_store_memory=object_store_bytes))
    cluster.add_node(num_cpus=cpus, node_ip_address=NODE_B, resources={"node_b": 100},
                     object_store_memory=object_store_bytes)
    ray.init(address=cluster.address, log_to_driver=False)
    return ray, cluster


def memory_on(node: str, name: str, shards: int = 2, **cluster):
    """A memory cluster whose shards all sit on node "a" (the worker's) or "b" (another node);
    cluster: more of its ClusterConfig (agent_cpus, ...)."""
    import engram_mem

    return engram_mem.connect(shards=shards, name=name, shard_resources={f"node_{node}": 1}, **cluster)


def model_config(config: str = "serving", table_gb: float | None = None):
    """(ModelConfig resolved for the tokenizer, TrainConfig, tokenizer); tables scaled to table_gb if given."""
    from engram_model.config import load_config
    from engram_model.train import load_or_train_tokenizer

    m, t = load_config(config)  # a path, or a name in engram_model/configs/
    if table_gb is not None:
        e = m.engram
        per_vocab = len(e.layer_ids) * e.heads_per_layer * e.head_dim * 4  # bytes per unit of engram_vocab_size
        v = int(table_gb * 2**30 / per_vocab) + 1
        m = dataclasses.replace(m, engram=dataclasses.replace(e, engram_vocab_size=[v] * e.n_orders))
    tok = load_or_train_tokenizer(None, t.tokenizer_vocab, t.val_fraction)
    return m.for_tokenizer(tok), t, tok


def text_windows(tok, lengths: list[int], seed: int = 0) -> list[np.ndarray]:
    """Windows of real text (the stdlib's validation files) with the given token lengths."""
    from engram_model.data import Corpus
    from engram_model.train import DEFAULT_RUNS

    corpus = Corpus.build(tok, 0.05, cache_dir=DEFAULT_RUNS / "cache")
    rng = np.random.default_rng(seed)
    val = corpus.val
    return [val[s:s + n].astype(np.int64) for n, s in
            ((n, int(rng.integers(0, val.size - n))) for n in lengths)]
