"""Reads: gathers, from the first member of each shard that answers.

A gather asks for each distinct id once where its repeats are many (routing.repeat_plan),
splits the ids by shard, sends the per-shard requests at once and receives each part's rows
into the output in place (one shard's, in request order, straight in); the repeats' rows are
copied from one occurrence each at the end. Without out=, the output is an array of the client's
(buffers.ReplyBuffers: memory of a gather's array the caller has dropped, its pages already there).
It waits for this client's earlier writes and pushes to the table first (read-your-writes).
"""

from __future__ import annotations

import concurrent.futures
import logging

import numpy as np

from engram_mem.client.gather_future import GatherFuture, Reshaped
from engram_mem.client.routing import ClusterView, dest_rows, repeat_plan, split_by_shard
from engram_mem.transport.connector import all_or_none
from engram_mem.errors import EngramMemError, InvalidArgument, NotReady, ShardUnavailable

log = logging.getLogger("engram_mem.client.reads")


class Reads:
    """The reads half of MemoryClient (a mixin: the state is MemoryClient.__init__'s)."""

    def gather(self, name: str, ids, *, as_torch: bool = False, device=None, out=None):
        """Rows for `ids` (int64, any shape): ids.shape + (dim,), numpy (or torch with as_torch/device).

        bfloat16 tables come back as uint16 bit patterns in numpy, and as torch.bfloat16 in torch.
        out: the caller's own buffer for the rows (a C-contiguous numpy array of the table's storage
        dtype, or a CPU torch tensor, pinned or not, viewed as one): rows land in it as they arrive
        and it is returned (no array of the client's own)."""
        return self.gather_async(name, ids, as_torch=as_torch, device=device, out=out).result()

    def gather_async(self, name: str, ids, *, as_torch: bool = False, device=None, out=None) -> GatherFuture:
        t = self._table(name)
        flat, shape = self._ids(t.spec, ids)
        if out is not None:
            out = _out_buffer(t.spec, out, flat.size)
        send, dest, dups = repeat_plan(flat)
        inner = self._chans.submit(self._gather(name, send, dest, flat.size, dups, out))
        return GatherFuture(Reshaped(inner, tuple(shape) + (t.spec.storage_dim,)), t.spec.dtype, as_torch=as_torch,
                            device=device, spec=t.spec)

    async def _gather(self, name: str, send: np.ndarray, dest: np.ndarray | None, n_out: int,
                      dups: tuple[np.ndarray, np.ndarray] | None, given: np.ndarray | None = None,
                      spread: bool | None = None):
        """Rows of the ids `send` into out[dest] (out[:len(send)] if dest is None); then
        out[dups[0]] = out[dups[1]] for repeated ids. Returns out [n_out, dim] (`given`, if given).
        spread: read from every member in turn (None: as this client does, `read_replicas`)."""
        await self._after_pending(name)

        async def attempt(view: ClusterView):
            t = view.table(name)
            grouped, parts, order = split_by_shard(t, send, len(view.shard_ids))
            out = self.buffers.empty((n_out, t.spec.storage_dim), t.spec.storage_dtype) if given is None else given
            await all_or_none([self._gather_part(view, name, rank, grouped[a:b], out, a,
                                                 dest_rows(dest, order, a, b), spread)
                               for rank, a, b in parts if b > a])  # a failed part stops the others
            if dups is not None and dups[0].size:
                out[dups[0]] = out[dups[1]]
                self._copied["repeat_bytes"] += dups[0].size * out.shape[1] * out.itemsize
            return out

        return await self._retrying(f"gather {name!r}", attempt)

    async def _gather_part(self, view: ClusterView, name: str, rank: int, ids: np.ndarray, out: np.ndarray,
                           start: int, dest: np.ndarray | None, spread: bool | None = None):
        """One shard's rows, from the first of its members that answers (see _read_members)."""
        members = self._read_members(view, rank, spread)
        for i, m in enumerate(members):
            try:
                return await self._gather_from(m, view.epoch, name, ids, out, start, dest)
            except EngramMemError as e:
                # The last member's error goes to the caller (retried, or what the primary refuses); a
                # replica's error of any kind, and a primary that is down or not ready, fail over.
                if i == len(members) - 1 or (m.get("member", 0) == 0 and not isinstance(e, (ShardUnavailable,
                                                                                            NotReady))):
                    raise
                self._mark_down(view, m, e)

    async def _gather_from(self, member: dict, epoch: int, name: str, ids: np.ndarray, out: np.ndarray,
                           start: int, dest: np.ndarray | None):
        """One member's rows into out[start:start+len(ids)], or scattered to out[dest]."""
        await self._connector(member).gather(member, epoch, name, ids, out, start, dest)

    def gather_distinct_async(self, name: str, ids: np.ndarray, out: np.ndarray | None = None,
                              dest: np.ndarray | None = None, spread: bool | None = None) -> concurrent.futures.Future:
        """Rows [n, dim] for distinct int64 ids, in their order (no de-duplication pass, no expansion).

        out/dest: land the rows in the caller's array instead, row i at out[dest[i]] (out[i] when
        dest is None); the future then gives `out`. Rows of one shard for out[0:n] arrive straight
        in (no copy on the client). spread: read a replicated shard from all its members in turn, or
        its primary first (None: as this client does; the fetch agent passes each worker's choice)."""
        t = self._table(name)
        flat, _ = self._ids(t.spec, ids)
        if out is not None:
            if not isinstance(out, np.ndarray) or out.ndim != 2 or out.shape[1] != t.spec.storage_dim or \
                    out.dtype != t.spec.storage_dtype or not out.flags.c_contiguous:
                raise InvalidArgument(f"table {name!r}: out= must be a C-contiguous [rows, {t.spec.storage_dim}] "
                                      f"{t.spec.storage_dtype} array")
            fits = out.shape[0] >= flat.size if dest is None else (
                dest.size == flat.size and (not dest.size or 0 <= int(dest.min()) <= int(dest.max()) < out.shape[0]))
            if not fits:
                raise InvalidArgument(f"table {name!r}: out= ({out.shape[0]} rows) and dest= do not place {flat.size} "
                                      f"rows (dest needs one position per id, within out)")
        elif dest is not None:
            raise InvalidArgument("dest= needs out=")

        async def run():
            return await self._gather(name, flat, dest, flat.size, None, out, spread)

        return self._chans.submit(run())

def _out_buffer(spec, out, n: int) -> np.ndarray:
    """The caller's buffer as a [n, storage_dim] numpy view, or InvalidArgument saying what is wrong."""
    if hasattr(out, "detach"):  # a torch tensor: its CPU memory (pinned or not) as numpy
        if out.device.type != "cpu":
            raise InvalidArgument(f"table {spec.name!r}: out= is a {out.device} tensor; rows land in host memory "
                                  f"(give a pinned CPU tensor and copy it to the device with non_blocking=True)")
        import torch

        out = out.view(torch.uint16) if out.dtype == torch.bfloat16 else out
        out = out.numpy()
    if not isinstance(out, np.ndarray) or out.dtype != spec.storage_dtype or not out.flags.c_contiguous \
            or not out.flags.writeable or out.size != n * spec.storage_dim:
        raise InvalidArgument(f"table {spec.name!r}: out= must be a writeable C-contiguous {spec.storage_dtype} array "
                              f"of {n} x {spec.storage_dim} values; got "
                              f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}")
    return out.reshape(n, spec.storage_dim)
