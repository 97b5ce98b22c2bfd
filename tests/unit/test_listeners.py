"""SO_REUSEPORT groups steered by client address (real sockets, several loopback sources)."""

from __future__ import annotations

import select
import socket

import pytest

from blindfold.io.listeners import bind_group, steer_index


@pytest.mark.parametrize("workers", [2, 3, 4])
def test_bpf_steering_matches_the_python_mirror(workers: int) -> None:
    socks = bind_group("127.0.0.1:0", workers, defer_accept_s=0)
    port = socks[0].getsockname()[1]
    try:
        assert all(s.getsockname()[1] == port for s in socks)
        seen: dict[str, set[int]] = {}
        for i in range(2, 30):
            src = f"127.0.{i}.{(i * 37) % 250 + 1}"
            for _ in range(2):
                c = socket.socket()
                c.bind((src, 0))
                c.connect(("127.0.0.1", port))
                ready, _, _ = select.select(socks, [], [], 2)
                assert ready
                index = socks.index(ready[0])
                conn, _ = socks[index].accept()
                conn.close()
                c.close()
                seen.setdefault(src, set()).add(index)
        for src, indexes in seen.items():
            assert indexes == {steer_index(src, workers)}, src
        assert len({i for s in seen.values() for i in s}) > 1  # it does spread
    finally:
        for s in socks:
            s.close()


def test_ipv6_prefix_grouping_mirror() -> None:
    # /48 grouping: the same /48 maps to one worker whatever the rest
    a = steer_index("2001:db8:1:2::5", 7, 48)
    assert all(
        steer_index(f"2001:db8:1:{x:x}::{y:x}", 7, 48) == a
        for x in range(0, 300, 17)
        for y in range(1, 50, 7)
    )
    b = steer_index("2001:db8:1:2::5", 7, 64)
    assert all(
        steer_index(f"2001:db8:1:2:{x:x}::{y:x}", 7, 64) == b
        for x in range(0, 300, 17)
        for y in range(1, 50, 7)
    )


def test_bind_error_leaves_nothing_open() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        with pytest.raises(OSError):
            bind_group(f"127.0.0.1:{port}", 2)
    finally:
        holder.close()


def test_a_second_group_on_the_same_port_is_refused() -> None:
    first = bind_group("127.0.0.1:0", 2)
    port = first[0].getsockname()[1]
    try:
        with pytest.raises(OSError):
            bind_group(f"127.0.0.1:{port}", 2)  # would silently share the port otherwise
    finally:
        for s in first:
            s.close()
