"""Data-parallel training workers on one memory cluster: torch.distributed (gloo on CPU, nccl on GPU).

    engram-train --config small --memory 127.0.0.2:6379 --nproc 2

Each worker process trains on its own batches. Dense gradients are averaged with an all-reduce,
so every worker keeps identical dense weights; the MoE routers' load counters are summed the same
way, so their balancing biases stay identical too. The Engram tables are not replicated: each
worker pushes its own table gradient (scaled by 1/world_size, so the pushes add up to the global
batch's gradient) straight to the shards, which apply each push as it arrives (asynchronous
parameter-server semantics for the sparse part). A worker always reads its own updates; another
worker's update of the same step may land just before or just after its read.

    def worker(rank, world): ...
    launch(worker, nproc=2)                      # spawns the processes, joins them, raises on failure
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def allreduce_mean(tensors: list[torch.Tensor]) -> None:
    """Average tensors across workers in place, as one flat buffer (one collective per step)."""
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def sync_dense_grads(model: torch.nn.Module) -> None:
    """All-reduce (mean) the gradients of every dense parameter; None grads count as zeros."""
    if not is_distributed():
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    allreduce_mean([p.grad for p in params])


def sync_router_load(model) -> None:
    """Sum the MoE routers' load counters across workers before the bias update."""
    if not is_distributed():
        return
    for moe in model.moe_layers():
        dist.all_reduce(moe.load)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(local_rank: int, fn, nproc: int, port: int, backend: str, args: tuple) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    dist.init_process_group(backend, rank=local_rank, world_size=nproc)
    try:
        fn(local_rank, nproc, *args)
    finally:
        dist.destroy_process_group()


def launch(fn, nproc: int, *args, backend: str | None = None) -> None:
    """Run fn(rank, world_size, *args) in nproc processes on this machine (fn must be picklable)."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    torch.multiprocessing.spawn(_entry, args=(fn, nproc, _free_port(), backend, args), nprocs=nproc, join=True)
