"""The fetch agent's messages and slots, without a cluster: what is accepted, and what is refused by name."""

import fcntl
import os

import numpy as np
import pytest

from engram_mem.agent import protocol as P
from engram_mem.agent.slots import Slot, array, fetch_layout, map_slot, push_layout
from engram_mem.errors import MaybeApplied, RequestTooLarge


def test_a_message_round_trips_and_keeps_its_request_id():
    raw = P.pack(P.FETCH, 2 ** 40 + 3, {"table": "t", "slot": 1, "n": 5})
    op, rid, meta = P.unpack(raw, P.REQUEST_OPS)
    assert (op, rid) == (P.FETCH, 2 ** 40 + 3)
    assert P.meta_dict(meta, op, {"table": str, "slot": int, "n": int}) == {"table": "t", "slot": 1, "n": 5}


@pytest.mark.parametrize("raw, words", [
    (b"", "shorter than"),
    (b"HTTP/1.1 200 OK\r\n\r\n\r\n", "magic"),
    (P.HEADER.pack(P.MAGIC, 1, P.FETCH, 0, 1, 0), "version 1"),  # the version before a Fetch reply was binary
    (P.HEADER.pack(P.MAGIC, P.VERSION, 77, 0, 1, 0), "unknown op 77"),
    (P.HEADER.pack(P.MAGIC, P.VERSION, P.FETCH, 4, 1, 0), "flags"),
    (P.HEADER.pack(P.MAGIC, P.VERSION, P.FETCH, 0, 1, 9) + b"{}", "says 9 meta bytes"),
])
def test_bytes_that_are_not_a_message_are_refused_by_name(raw, words):
    with pytest.raises(P.MessageError, match=words):
        P.unpack(raw, P.REQUEST_OPS)


@pytest.mark.parametrize("meta, words", [
    (b"\xff", "not JSON"), (b"[1]", "JSON list"), (b'{"slot": 1, "n": 1}', "'table' is missing"),
    (b'{"table": "t", "slot": true, "n": 1}', "'slot' is bool"), (b'{"table": "t", "slot": 1, "n": -2}', ">= 0"),
])
def test_meta_fields_are_checked_by_name(meta, words):
    with pytest.raises(P.MessageError, match=words):
        P.meta_dict(meta, P.FETCH, {"table": str, "slot": int, "n": int})


def test_a_message_over_the_limit_is_refused_before_it_is_sent():
    with pytest.raises(RequestTooLarge, match="limit"):
        P.pack(P.STATS, 1, {"x": "y" * P.MAX_MESSAGE})


def test_errors_travel_with_their_class():
    e = P.decode_error(P.encode_error(MaybeApplied("push: shard 1 died")), "agent")
    assert type(e) is MaybeApplied and "shard 1 died" in str(e)


def test_layouts_are_aligned_and_do_not_overlap():
    ids, uniq, inv, rows, end = fetch_layout(1001, 24)
    assert [o % 64 for o in (ids, uniq, inv, rows)] == [0, 0, 0, 0]
    assert uniq >= 8 * 1001 and inv - uniq >= 8 * 1001 and rows - inv >= 8 * 1001 and end - rows >= 1001 * 24
    i, g, e = push_layout(7, 16)
    assert g >= 56 and g % 64 == 0 and e - g >= 7 * 16


def test_a_slot_is_shared_memory_both_sides_see():
    slot = Slot(0, 5000)
    try:
        mm = map_slot(os.dup(slot.fd), slot.nbytes, max_bytes=1 << 30)   # the agent's mapping of it
        array(slot.mm, np.int64, 64, 3)[:] = [4, 5, 6]
        assert array(mm, np.int64, 64, 3).tolist() == [4, 5, 6]
        with pytest.raises(OSError):  # sealed: it cannot shrink under the agent's mapping
            os.ftruncate(slot.fd, 10)
    finally:
        slot.close()


def test_the_agent_maps_only_sealed_memory_files_as_big_as_they_say():
    with pytest.raises(P.MessageError, match="outside"):
        map_slot(os.memfd_create("x"), 10 << 30, max_bytes=1 << 30)
    fd = os.memfd_create("unsealed", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 4096)
    with pytest.raises(P.MessageError, match="not sealed"):
        map_slot(os.dup(fd), 4096, max_bytes=1 << 30)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    with pytest.raises(P.MessageError, match="holds 4096 bytes"):
        map_slot(os.dup(fd), 8192, max_bytes=1 << 30)
    assert len(map_slot(fd, 4096, max_bytes=1 << 30)) == 4096
    r, w = os.pipe()
    with pytest.raises(P.MessageError, match="not a sealable memory file"):
        map_slot(r, 4096, max_bytes=1 << 30)
    os.close(w)
