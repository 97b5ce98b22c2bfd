"""How the TLS transport cuts what the HTTP layer wrote in one turn into records
(io.tls13_transport.records): full records across write boundaries, nothing lost or reordered,
slices rather than copies inside one write."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from blindfold.io.tls13_transport import RECORD_BYTES, records


@given(st.lists(st.integers(min_value=1, max_value=3 * RECORD_BYTES + 7), max_size=8))
def test_records_are_full_in_order_and_complete(sizes: list[int]) -> None:
    pieces = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    out = records(pieces)
    total = sum(sizes)
    assert b"".join(bytes(r) for r in out) == b"".join(pieces)
    assert len(out) == -(-total // RECORD_BYTES)  # ceil: no short record but the last
    assert all(len(r) == RECORD_BYTES for r in out[:-1])
    assert all(0 < len(r) <= RECORD_BYTES for r in out)


def test_a_head_shares_the_first_record_with_its_body_and_big_bodies_are_not_copied() -> None:
    head, body = b"HTTP/1.1 200 OK\r\ncontent-length: 102400\r\n\r\n", bytes(102400)
    out = records([head, body])
    assert len(out) == 7 and bytes(out[0]).startswith(head)  # not 8: no record for the head
    assert all(isinstance(r, memoryview) and r.obj is body for r in out[1:-1])
