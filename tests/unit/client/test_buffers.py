"""ReplyBuffers: a gather's own array reuses a dropped one's memory, and never while it is referenced."""

import gc

import numpy as np
import pytest
import torch

from engram_mem.client.buffers import MIN_BYTES, ReplyBuffers


def test_a_dropped_array_s_memory_serves_the_next_one_of_about_its_size():
    pool = ReplyBuffers(keep_bytes=64 << 20)
    a = pool.empty((4096, 256), np.float32)           # 4 MiB
    assert a.shape == (4096, 256) and a.dtype == np.float32
    assert a.flags.c_contiguous and a.flags.writeable and a.flags.owndata is False
    addr = a.ctypes.data
    a[:] = 7.0
    del a
    gc.collect()
    assert pool.held_bytes() == 4 << 20
    b = pool.empty((3000, 256), np.float32)           # rounds up to the same 4 MiB block
    assert b.ctypes.data == addr and (pool.reused, pool.fresh) == (1, 1)
    assert pool.held_bytes() == 0
    c = pool.empty((4096, 256), np.float32)           # b still lives: a block of its own
    assert c.ctypes.data != addr and pool.fresh == 2


@pytest.mark.parametrize("holder", ["view", "torch", "reshape"])
def test_memory_is_not_reused_while_anything_still_sees_it(holder):
    pool = ReplyBuffers(keep_bytes=64 << 20)
    a = pool.empty((2048, 512), np.float32)
    a[:] = np.arange(512, dtype=np.float32)
    keep = {"view": lambda x: x[10:20], "torch": torch.from_numpy, "reshape": lambda x: x.reshape(-1)}[holder](a)
    addr = a.ctypes.data
    del a
    gc.collect()
    assert pool.held_bytes() == 0
    other = pool.empty((2048, 512), np.float32)
    assert other.ctypes.data != addr
    other[:] = -1.0                                  # must not reach what `keep` sees
    assert float(np.asarray(keep).reshape(-1)[5]) == 5.0
    del keep
    gc.collect()
    assert pool.held_bytes() == 4 << 20


def test_small_arrays_and_a_disabled_pool_use_numpy_s_own():
    pool = ReplyBuffers()
    small = pool.empty((8, 16), np.float32)
    assert small.nbytes < MIN_BYTES and small.flags.owndata
    off = ReplyBuffers(keep_bytes=0)
    big = off.empty((1 << 20,), np.uint16)
    assert big.flags.owndata and big.dtype == np.uint16
    del small, big
    assert pool.held_bytes() == off.held_bytes() == 0 and pool.fresh == off.fresh == 0


def test_free_blocks_are_kept_up_to_keep_bytes_oldest_dropped_first():
    pool = ReplyBuffers(keep_bytes=8 << 20)
    a0, a1, a2 = (pool.empty((1 << 20,), np.float32) for _ in range(3))  # three 4 MiB blocks
    first = a0.ctypes.data
    del a0
    del a1
    del a2
    gc.collect()
    assert pool.held_bytes() == 8 << 20               # the first one freed went back to the allocator
    again = [pool.empty((1 << 20,), np.float32) for _ in range(2)]
    assert first not in {x.ctypes.data for x in again} and pool.reused == 2
