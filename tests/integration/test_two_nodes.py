"""Two Ray nodes on this machine (127.0.0.2 and 127.0.0.3): shards spread over both."""

import numpy as np

import engram_mem


def test_shards_on_both_nodes_serve_a_worker_on_either(two_nodes):
    ray = two_nodes
    with engram_mem.connect(shards=2, name="two-nodes") as mem:
        assert {s["node_ip"] for s in mem.view.shards.values()} == {"127.0.0.2", "127.0.0.3"}
        spec = mem.create_table("t", rows=30_000, dim=32, seed=2)
        ids = np.random.default_rng(0).integers(0, spec.rows, (4, 100))
        assert np.array_equal(mem.gather("t", ids), spec.init_rows(ids.reshape(-1)).reshape(4, 100, 32))

        @ray.remote(num_cpus=1)
        def remote_worker(ids):
            # A worker on either node attaches to the same memory cluster by name.
            with engram_mem.connect(name="two-nodes") as client:
                client.push("t", ids[:3], np.ones((3, 32), np.float32), lr=1.0)
                return ray.util.get_node_ip_address(), client.gather("t", ids)

        nodes = {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes()}
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        results = ray.get([remote_worker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[ip], soft=False))
                           .remote(ids.reshape(-1)[k * 50:(k + 1) * 50]) for k, ip in enumerate(["127.0.0.2", "127.0.0.3"])])
        assert {ip for ip, _ in results} == {"127.0.0.2", "127.0.0.3"}
        for k, (_, rows) in enumerate(results):
            sub = ids.reshape(-1)[k * 50:(k + 1) * 50]
            want = spec.init_rows(sub)
            want[:3] -= 1.0
            assert np.allclose(rows, want, atol=1e-6)
