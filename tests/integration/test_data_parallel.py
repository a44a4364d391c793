"""Two data-parallel training workers (torch.distributed, gloo) on one memory cluster."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import engram_mem


@pytest.mark.timeout(900)
def test_two_workers_share_one_cluster_and_converge(ray_local, tmp_path):
    import ray

    with engram_mem.connect(shards=2, name="dp") as mem:
        address = ray.get_runtime_context().gcs_address
        env = dict(os.environ, OMP_NUM_THREADS="1")
        base = [sys.executable, "-m", "engram_model.train_cli", "--config", "tiny", "--memory", address,
                "--memory-name", "dp", "--steps", "60", "--eval-every", "30", "--no-progress",
                "--tokenizer", str(tmp_path / "tok.json"), "--set", "tokenizer_vocab=512"]
        run = subprocess.run(base + ["--out", str(tmp_path / "dp"), "--nproc", "2", "--reset-tables"],
                             env=env, capture_output=True, text=True, timeout=800)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
        h = json.loads((tmp_path / "dp" / "history.json").read_text())
        assert len(h["loss"]) == 60
        assert np.mean(h["loss"][-10:]) < np.mean(h["loss"][:5]) - 0.5, h["loss"]
        assert h["val_loss"][-1] < h["loss"][0] - 0.6, (h["val_loss"], h["loss"][0])  # well below the start
        # Both workers pushed into the same tables: every shard saw pushes from two workers' steps.
        tables = [n for n in mem.tables() if n.startswith("engram.")]
        assert len(tables) == 2
        pushed = sum(s["rows_pushed"] for s in mem.stats())
        assert pushed > 0
        # The checkpoint's dense weights serve with the cluster's tables (no tables file needed).
        assert (tmp_path / "dp" / "ckpt" / "model.safetensors").exists()


def _sync_check(rank, world, out_dir):
    import torch

    from engram_model import distributed
    from engram_model.config import load_config
    from engram_model.model import EngramModel

    m, _ = load_config("tiny")
    torch.manual_seed(0)
    model = EngramModel(m)  # dense part only; same init on every rank
    for p in model.parameters():
        p.grad = torch.full_like(p, float(rank + 1))  # rank-specific gradients
    for moe in model.moe_layers():
        moe.load.fill_(rank + 1)
    distributed.sync_dense_grads(model)
    distributed.sync_router_load(model)
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    loads = torch.cat([moe.load for moe in model.moe_layers()])
    torch.save({"grads": grads, "loads": loads}, f"{out_dir}/rank{rank}.pt")


def test_dense_gradients_and_router_loads_agree_across_workers(tmp_path):
    import torch

    from engram_model.distributed import launch

    launch(_sync_check, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["grads"], r1["grads"]) and torch.all(r0["grads"] == 1.5)  # mean of 1 and 2
    assert torch.equal(r0["loads"], r1["loads"]) and torch.all(r0["loads"] == 3.0)  # sum of 1 and 2
