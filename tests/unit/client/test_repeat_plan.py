"""routing.repeat_plan: which ids a gather asks for, where their rows land, and where repeats come from."""

import numpy as np
import pytest

from engram_mem.client.routing import DEDUP_SHARE, repeat_plan


def _apply(flat: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What a gather does with the plan: the rows of `send` land at out[dest] (or in order), then the repeats."""
    send, dest, dups = repeat_plan(flat)
    out = np.full((flat.size, table.shape[1]), np.nan, np.float32)
    got = table[send]
    if dest is None:
        out[:send.size] = got
    else:
        out[dest] = got
    if dups is not None:
        out[dups[0]] = out[dups[1]]
    return out, send


@pytest.mark.parametrize("n,universe", [(0, 10), (1, 10), (5000, 10**6), (5000, 600), (5000, 3)])
def test_every_position_gets_its_ids_row(n, universe):
    rng = np.random.default_rng(n + universe)
    table = rng.standard_normal((max(universe, 1), 4)).astype(np.float32)
    flat = rng.integers(0, universe, n)
    out, _ = _apply(flat, table)
    assert np.array_equal(out, table[flat])


def test_few_repeats_ask_for_every_id_in_order_and_copy_the_repeats():
    flat = np.arange(100, dtype=np.int64)
    flat[[10, 20, 30]] = [5, 5, 7]  # 3 repeats in 100: under 1/DEDUP_SHARE
    send, dest, dups = repeat_plan(flat)
    assert dest is None and np.array_equal(send, flat)  # rows land straight in place
    rep, src = dups
    # each repeated position copies from an earlier-or-later position holding the same id, never itself
    assert set(rep.tolist()).isdisjoint(src.tolist())
    assert np.array_equal(flat[rep], flat[src]) and rep.size == 3


def test_many_repeats_ask_for_each_distinct_id_once():
    rng = np.random.default_rng(1)
    flat = rng.integers(0, 50, 1000)
    send, dest, dups = repeat_plan(flat)
    assert np.array_equal(np.sort(send), np.unique(flat))  # each distinct id once
    assert np.all(np.diff(dest) > 0) and np.array_equal(flat[dest], send)
    assert dups[0].size == flat.size - send.size
    assert (flat.size - send.size) * DEDUP_SHARE > flat.size


def test_distinct_ids_have_no_plan_to_carry_out():
    flat = np.random.default_rng(2).permutation(10_000).astype(np.int64)
    send, dest, dups = repeat_plan(flat)
    assert send is flat and dest is None and dups is None
