"""Guards at layer 4: lists, per-address limits, fingerprint rules, the global cap."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest

from blindfold.core.clienthello import peek_client_hello
from tests.helpers import tlsbuild
from tests.helpers.clients import get, http_get, tls_connect, wait_until
from tests.helpers.edgeproc import EdgeProcess, edge_config, route
from tests.helpers.origin import TlsOrigin

Start = Callable[..., EdgeProcess]
OK = b"HTTP/1.1 200 "


def routes(origin: TlsOrigin) -> str:
    return route(["example.test"], [f"127.0.0.1:{origin.port}"])


def refused(port: int, ca: Path, source: str) -> bool:
    try:
        get(port, "example.test", ca, source=source)
    except (ssl.SSLError, OSError):
        return True
    return False


def test_blocklist_file_reloads_on_change(
    start_edge: Start, origin: TlsOrigin, site: dict[str, Path], tmp_path: Path
) -> None:
    drop = tmp_path / "drop.txt"
    drop.write_text("; a DROP-style list\n127.0.0.3/32 ; SBL1\n2001:db8::/32\n")
    edge = start_edge(
        edge_config(routes(origin), blocklist_files=[str(drop)], list_check_interval_s=0.2)
    )
    assert refused(edge.port, site["ca"], "127.0.0.3")
    assert OK in get(edge.port, "example.test", site["ca"], source="127.0.0.2")
    line = edge.wait_conn(outcome="refused", reason="blocklist")
    assert line is not None and line["client"] == "127.0.0.3"
    assert len(origin.seen.peers) == 1  # only the allowed client reached the origin

    # an open connection from .2 survives the list change that blocks .2
    keep = tls_connect(edge.port, "example.test", site["ca"], source="127.0.0.2")
    assert OK in http_get(keep, keep_alive=True)
    drop.write_text("127.0.0.2\n")
    assert wait_until(lambda: len(edge.records("lists_reloaded")) == 2, 10)  # both workers
    assert refused(edge.port, site["ca"], "127.0.0.2")
    assert OK in get(edge.port, "example.test", site["ca"], source="127.0.0.3")
    assert OK in http_get(keep, keep_alive=True)
    keep.close()
    assert edge.metric("blindfold_list_entries", list="blocklist") == 1


def test_allowlist_bypasses_blocklist_and_limits(
    start_edge: Start, origin: TlsOrigin, site: dict[str, Path]
) -> None:
    edge = start_edge(
        edge_config(
            routes(origin), block=["127.0.0.0/16"], allow=["127.0.0.4"], per_ip_concurrent=1
        )
    )
    assert refused(edge.port, site["ca"], "127.0.0.5")
    held = [
        tls_connect(edge.port, "example.test", site["ca"], source="127.0.0.4") for _ in range(3)
    ]  # over per_ip_concurrent, allowed anyway
    for conn in held:
        assert OK in http_get(conn, keep_alive=True)
        conn.close()


def test_per_ip_concurrency_holds_for_one_address_only(
    start_edge: Start, origin: TlsOrigin, site: dict[str, Path]
) -> None:
    edge = start_edge(edge_config(routes(origin), per_ip_concurrent=3))
    held = [
        tls_connect(edge.port, "example.test", site["ca"], source="127.0.0.10") for _ in range(3)
    ]
    assert refused(edge.port, site["ca"], "127.0.0.10")
    assert OK in get(edge.port, "example.test", site["ca"], source="127.0.0.11")
    assert edge.wait_conn(outcome="refused", reason="per_ip_concurrent") is not None
    held[0].close()
    assert wait_until(lambda: not refused(edge.port, site["ca"], "127.0.0.10"), 5)
    for conn in held[1:]:
        conn.close()


def test_per_ip_rate(start_edge: Start, origin: TlsOrigin, site: dict[str, Path]) -> None:
    edge = start_edge(edge_config(routes(origin), per_ip_rate_per_s=0.5, per_ip_burst=4))
    results = [refused(edge.port, site["ca"], "127.0.0.12") for _ in range(6)]
    assert results == [False] * 4 + [True] * 2
    assert not refused(edge.port, site["ca"], "127.0.0.13")  # another address has its own bucket
    assert edge.metric("blindfold_connections_refused_total", reason="per_ip_rate") == 2


def _python_ja4() -> str:
    hello = peek_client_hello(tlsbuild.openssl_hello("example.test", ()))
    assert hello is not None
    return hello.ja4


def test_ja4_block_and_rate_rules(
    start_edge: Start, origin: TlsOrigin, site: dict[str, Path]
) -> None:
    ja4 = _python_ja4()  # this process's OpenSSL, as tls_connect uses it (no ALPN)
    rules = (
        f'[[edge.ja4_rules]]\nname = "py"\nja4 = "{ja4}"\naction = "block"\n\n'
        '[[edge.ja4_rules]]\nname = "tls12"\nprefix = "t12"\naction = "rate_limit"\n'
        "rate_per_s = 0.01\nburst = 1\n"
    )
    edge = start_edge(edge_config(routes(origin)) + rules)
    assert refused(edge.port, site["ca"], "127.0.0.20")
    line = edge.wait_conn(outcome="refused", reason="ja4_block")
    assert line is not None and line["ja4"] == ja4
    assert edge.metric("blindfold_ja4_rule_matches_total", rule="py", result="ja4_block") == 1

    def tls12() -> bool:
        ctx = ssl.create_default_context(cafile=str(site["ca"]))
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        try:
            raw = socket.create_connection(("127.0.0.1", edge.port), timeout=5)
            with ctx.wrap_socket(raw, server_hostname="example.test") as tls:
                return OK in http_get(tls)
        except (ssl.SSLError, OSError):
            return False

    assert [tls12(), tls12()] == [True, False]  # burst 1, then the bucket is empty
    assert edge.metric("blindfold_ja4_rule_matches_total", rule="tls12", result="ja4_rate") == 1


def test_global_cap(start_edge: Start, origin: TlsOrigin, site: dict[str, Path]) -> None:
    edge = start_edge(edge_config(routes(origin), max_connections=2, workers=1))
    held = [
        tls_connect(edge.port, "example.test", site["ca"], source=f"127.0.0.{30 + i}")
        for i in range(2)
    ]
    assert refused(edge.port, site["ca"], "127.0.0.40")
    assert edge.metric("blindfold_connections_refused_total", reason="global_cap") == 1
    for conn in held:
        conn.close()


@pytest.mark.parametrize("bad", ["127.0.0.1:9", "999.0.0.1"])
def test_inline_lists_are_validated(bad: str, tmp_path: Path) -> None:
    from blindfold.cli.main import main

    conf = tmp_path / "c.toml"
    conf.write_text(edge_config(route(["a.test"], ["127.0.0.1:1"]), block=[bad]))
    assert main(["check-config", str(conf)]) == 2
