"""How a gather's part is cut into requests and parallel streams (TcpConnector.stream_ranges), and
all_or_none: a failed stream stops its siblings before the error goes on."""

import asyncio

import pytest

from engram_mem.transport.connector import all_or_none
from engram_mem.transport.tcp_connector import STREAM_BYTES, TcpConnector


def _cover(ranges, n):
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a < b for a, b in ranges) and all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))


@pytest.mark.parametrize("n, row_bytes, max_request, streams", [
    (1000, 256, 256 << 20, 1),                        # small: one request, one stream
    (65536, 1024, 256 << 20, 4),                      # 64 MB: four streams of 16 MB
    (2 * STREAM_BYTES // 1024 - 1, 1024, 256 << 20, 1),  # just under 2 x STREAM_BYTES: one
    (2 * STREAM_BYTES // 1024, 1024, 256 << 20, 2),
    (200_000, 1024, 4 << 20, None),                   # the reply limit (16 MB) cuts first
])
def test_ranges_cover_the_ids_within_the_limits(n, row_bytes, max_request, streams):
    c = TcpConnector("x", max_request)
    ranges = list(c.stream_ranges(n, row_bytes))
    _cover(ranges, n)
    max_ids = min(max_request // 8, 4 * max_request // row_bytes)
    assert all(b - a <= max_ids for a, b in ranges)
    if streams is not None:
        assert len(ranges) == streams
        assert len(ranges) == 1 or all((b - a) * row_bytes >= STREAM_BYTES for a, b in ranges)


def test_a_failed_stream_cancels_the_others_before_the_error_goes_on():
    ended = []

    async def slow(i):
        try:
            await asyncio.sleep(10)
        finally:
            ended.append(i)

    async def failing():
        await asyncio.sleep(0.01)
        raise RuntimeError("stream lost")

    async def main():
        with pytest.raises(RuntimeError, match="stream lost"):
            await all_or_none([slow(1), failing(), slow(2)])
        return sorted(ended)

    assert asyncio.run(main()) == [1, 2]  # both siblings had ended when the error arrived
