"""The admission core (edge.admission) without sockets: real ClientHellos (OpenSSL's, through
memory BIOs, and synthetic ones), real route tables built by the real modes from a config,
real guards, and the clock passed in. Each verdict is checked as the socket code would carry
it out: what is refused and why, which origins in which order, the exact PROXY header."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from blindfold.config import loads
from blindfold.config.edge import EdgeConfig
from blindfold.core.clienthello import ClientHello, peek_client_hello
from blindfold.core.iplist import parse_address
from blindfold.core.proxyproto import PP2_TYPE_ALPN, PP2_TYPE_AUTHORITY, parse_proxy_header
from blindfold.core.routing import SniRouter
from blindfold.edge.admission import Forward, Refuse, Terminate, Verdict, admit
from blindfold.edge.guards import Admission, Guards
from blindfold.edge.lists import ListSet
from blindfold.edge.mode import Connection, Mode, RouteState
from blindfold.edge.modes import MODES
from blindfold.edge.origins import Origin, OriginPool
from blindfold.edge.stats import RouteStats, WorkerStats
from blindfold.io.reactor import Reactor
from blindfold.obs.log import JsonLog
from tests.helpers.tlsbuild import ext, handshake, openssl_hello, records, simple_hello

ORIGIN_A = ("127.0.0.1", 9001)
ORIGIN_B = ("127.0.0.1", 9002)
LOCAL = ("192.0.2.10", 443)


@dataclass(frozen=True)
class Peer:
    ip: str
    client_port: int
    local: tuple[str, int] | None
    adm: Admission


class Context:
    """What a mode sees of a worker (edge.mode.ModeContext), with a clock the test sets."""

    def __init__(
        self, config: EdgeConfig, log: JsonLog, loop: asyncio.AbstractEventLoop, guards: Guards
    ) -> None:
        self.index = 0
        self.reactor = Reactor()
        self.guards = guards
        self.stats = WorkerStats()
        self.loop = loop
        self.now = 0.0
        self.config = config
        self.router: SniRouter[RouteState] = SniRouter([])
        self.log = log
        self.conns: Collection[Connection] = ()

    def may_log_refusal(self) -> bool:
        return True


class Table:
    """A route table as the worker builds it (edge.worker.Worker.apply_config), without DNS:
    every route's origins are ORIGIN_A and ORIGIN_B."""

    def __init__(self, text: str, tmp: Path) -> None:
        config = loads(text).edge
        assert config is not None
        self.loop = asyncio.new_event_loop()
        self.guards = Guards(config, 1, 0.0)
        log = JsonLog.open(str(tmp / "edge.log"), process="test")
        self.ctx = Context(config, log, self.loop, self.guards)
        self.guards.allow = ListSet(
            "allowlist", "allowlist_files", (), config.allow, strict=True
        ).ipset
        modes: dict[str, Mode] = {}
        self.routes: dict[str, RouteState] = {}
        entries: list[tuple[str, RouteState]] = []
        default = None
        for i, rc in enumerate(config.routes):
            mode = modes.get(rc.mode) or modes.setdefault(rc.mode, MODES[rc.mode](self.ctx))
            origins = [
                Origin(f"{host}:{port}", socket.AF_INET, (host, port))
                for host, port in (ORIGIN_A, ORIGIN_B)[: len(rc.origins)]
            ]
            route = RouteState(
                config.route_name(i),
                OriginPool(origins, rc.balance, config.origin_down_s),
                rc.proxy_protocol,
                rc.proxy_protocol_tlvs,
                RouteStats(),
                mode,
                mode.build(f"edge.routes[{i}]", rc, config, None),
            )
            self.routes[route.name] = route
            entries.extend((pattern, route) for pattern in rc.sni)
            if rc.default:
                default = route
        self.router = SniRouter(entries, default)
        self.ctx.router = self.router

    def peer(self, ip: str = "198.51.100.7", now: float = 0.0) -> Peer:
        version, addr = parse_address(ip)
        refused, adm = self.guards.admit(version, addr, now)
        assert refused is None and adm is not None
        return Peer(ip, 40000, LOCAL, adm)

    def admit(self, hello: ClientHello, peer: Peer | None = None, now: float = 0.0) -> Verdict:
        return admit(hello, peer or self.peer(now=now), self.router, self.guards, now)

    def close(self) -> None:
        self.loop.close()


def hello_of(flight: bytes) -> ClientHello:
    hello = peek_client_hello(flight)
    assert hello is not None
    return hello


TLS13 = hello_of(openssl_hello("www.pass.test", ("h2", "http/1.1")))
TLS12 = hello_of(openssl_hello("www.pass.test", max_version=ssl.TLSVersion.TLSv1_2))


def _route(name: str, sni: list[str], **extra: object) -> str:
    out = f'[[edge.routes]]\nname = "{name}"\nsni = {sni!r}\norigins = ["a:1", "b:2"]\n'
    for key, value in extra.items():
        if isinstance(value, bool):
            out += f"{key} = {str(value).lower()}\n"
        elif isinstance(value, (int, float)):
            out += f"{key} = {value}\n"
        else:
            out += f"{key} = {value}\n" if str(value).startswith("{") else f'{key} = "{value}"\n'
    return out.replace("'", '"') + "\n"


@pytest.fixture
def files(tmp_path: Path, site: dict[str, Path]) -> dict[str, str]:
    manifest = tmp_path / "manifest-public.pem"
    manifest.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    return {
        "cert": str(site["cert"]),
        "key": str(site["key"]),
        "ca": str(site["ca"]),
        "manifest": str(manifest),
    }


@pytest.fixture
def table(tmp_path: Path, files: dict[str, str]) -> Iterator[Table]:
    keyserver = (
        f'{{ addresses = ["127.0.0.1:7"], client_cert = "{files["cert"]}", '
        f'client_key = "{files["key"]}", ca = "{files["ca"]}" }}'
    )
    text = (
        '[edge]\nlisten = ["127.0.0.1:0"]\norigin_down_s = 10\nallow = ["203.0.113.0/24"]\n\n'
        + _route("pass", ["*.pass.test"], proxy_protocol="v2")
        + _route("v1", ["v1.test"], proxy_protocol="v1")
        + _route("plain", ["plain.test"], proxy_protocol="none")
        + _route(
            "keyless",
            ["example.test", "*.example.test"],
            mode="keyless",
            certificate=files["cert"],
            origin_ca=files["ca"],
            keyserver=keyserver,
        )
        + _route(
            "blind",
            ["cdn.test"],
            mode="blind",
            certificate=files["cert"],
            key=files["key"],
            origin_ca=files["ca"],
            origin_server_name="www.pass.test",
            blind=f'{{ manifest_public_key = "{files["manifest"]}" }}',
        )
        + '[[edge.ja4_rules]]\nname = "old-tls"\nprefix = "t12"\naction = "block"\n\n'
        + f'[[edge.ja4_rules]]\nname = "slow"\nja4 = "{TLS13.ja4}"\naction = "rate_limit"\n'
        + 'rate_per_s = 1\nburst = 1\nper = "ip"\n'
    )
    t = Table(text, tmp_path)
    yield t
    t.close()


def test_no_route_for_the_name_is_refused(table: Table) -> None:
    assert table.admit(hello_of(simple_hello(b"elsewhere.test"))) == Refuse("unknown_sni")
    assert table.admit(hello_of(simple_hello(None))) == Refuse("no_sni")


def test_a_default_route_takes_unknown_and_missing_names(tmp_path: Path) -> None:
    text = '[edge]\nlisten = ["127.0.0.1:0"]\n\n' + _route("only", ["a.test"], default=True)
    t = Table(text, tmp_path)
    try:
        for sni in (b"elsewhere.test", None):
            verdict = t.admit(hello_of(simple_hello(sni)))
            assert isinstance(verdict, Forward) and verdict.route is t.routes["only"]
    finally:
        t.close()


def test_passthrough_forwards_with_the_visitors_proxy_header(table: Table) -> None:
    verdict = table.admit(TLS13)
    assert isinstance(verdict, Forward)
    assert verdict.route is table.routes["pass"]
    assert [o.sockaddr for o in verdict.origins] == [ORIGIN_A, ORIGIN_B]
    parsed = parse_proxy_header(verdict.proxy_header)
    assert parsed is not None
    header, used = parsed
    assert used == len(verdict.proxy_header)  # the header alone: the hello follows unchanged
    assert (header.version, header.src, header.dst) == (2, ("198.51.100.7", 40000), LOCAL)
    assert header.tlv(PP2_TYPE_AUTHORITY) == b"www.pass.test"
    assert header.tlv(PP2_TYPE_ALPN) == b"h2"
    v1 = table.admit(hello_of(simple_hello(b"v1.test")))
    assert isinstance(v1, Forward)
    assert v1.proxy_header == b"PROXY TCP4 198.51.100.7 192.0.2.10 40000 443\r\n"
    plain = table.admit(hello_of(simple_hello(b"plain.test")))
    assert isinstance(plain, Forward) and plain.proxy_header == b""


def test_origins_round_robin_and_a_down_one_is_tried_last(table: Table) -> None:
    hello = hello_of(simple_hello(b"plain.test"))

    def first(now: float) -> tuple[str, int]:
        verdict = table.admit(hello, now=now)
        assert isinstance(verdict, Forward)
        return verdict.origins[0].sockaddr  # type: ignore[return-value]

    assert [first(0.0) for _ in range(4)] == [ORIGIN_A, ORIGIN_B, ORIGIN_A, ORIGIN_B]
    route = table.routes["plain"]
    route.pool.mark_down(route.pool.origins[0], "refused", 1.0)
    verdict = table.admit(hello, now=2.0)
    assert isinstance(verdict, Forward)
    assert [o.sockaddr for o in verdict.origins] == [ORIGIN_B, ORIGIN_A]  # still offered, last
    assert {first(5.0) for _ in range(3)} == {ORIGIN_B}
    assert {first(11.0) for _ in range(2)} == {ORIGIN_A, ORIGIN_B}  # origin_down_s is over


def test_ja4_rules_block_and_rate_limit_by_the_clock(table: Table) -> None:
    assert table.admit(TLS12) == Refuse("ja4_block", table.routes["pass"])
    allowlisted = table.peer("203.0.113.5")
    assert isinstance(table.admit(TLS12, allowlisted), Forward)  # the allowlist skips rules
    peer = table.peer("198.51.100.9")
    assert isinstance(table.admit(TLS13, peer, 10.0), Forward)  # the burst of one
    assert table.admit(TLS13, peer, 10.1) == Refuse("ja4_rate", table.routes["pass"])
    assert isinstance(table.admit(TLS13, table.peer("198.51.100.10"), 10.2), Forward)  # per ip
    assert isinstance(table.admit(TLS13, peer, 11.2), Forward)  # a second later: a token
    assert table.guards.rule_matches == {
        ("old-tls", "ja4_block"): 1,
        ("slow", "pass"): 3,
        ("slow", "ja4_rate"): 1,
    }


def test_keyless_terminates_what_its_engine_can_answer_and_forwards_the_rest(
    table: Table,
) -> None:
    route = table.routes["keyless"]
    stats = route.state.stats
    hello = hello_of(openssl_hello("www.example.test"))
    assert table.admit(hello) == Terminate(route)
    # TLS 1.2 only: the origin has the key and answers it (the rule above is for pass.test's
    # fingerprint prefix too, so this one comes from an allowlisted address)
    old = hello_of(openssl_hello("example.test", max_version=ssl.TLSVersion.TLSv1_2))
    verdict = table.admit(old, table.peer("203.0.113.6"))
    assert isinstance(verdict, Forward) and verdict.route is route
    assert stats.fallbacks == {"tls12_only": 1}
    assert stats.handshakes == {}


def test_keyless_never_asks_the_key_server_about_a_hello_without_sni(
    tmp_path: Path, files: dict[str, str]
) -> None:
    keyserver = (
        f'{{ addresses = ["127.0.0.1:7"], client_cert = "{files["cert"]}", '
        f'client_key = "{files["key"]}", ca = "{files["ca"]}" }}'
    )
    text = '[edge]\nlisten = ["127.0.0.1:0"]\n\n' + _route(
        "k",
        ["example.test"],
        mode="keyless",
        default=True,
        certificate=files["cert"],
        origin_ca=files["ca"],
        keyserver=keyserver,
    )
    t = Table(text, tmp_path)
    try:
        verdict = t.admit(hello_of(openssl_hello(None)))
        assert isinstance(verdict, Forward) and verdict.route is t.routes["k"]
        assert t.routes["k"].state.stats.fallbacks == {"no_sni": 1}
    finally:
        t.close()


def test_a_hello_the_mode_cannot_read_is_refused_with_its_alert(table: Table) -> None:
    """A key_share extension the peek did not look into, malformed: decode_error (RFC 8446
    §6.2), counted as a failed handshake of the route."""
    from tests.helpers.tlsbuild import client_hello_body, sigalgs_ext, sni_ext, versions_ext

    body = client_hello_body(
        extensions=[
            sni_ext(b"example.test"),
            versions_ext([0x0304]),
            sigalgs_ext([0x0403]),
            ext(0x0033, b"\x00\x05\x00\x1d\x00"),  # a key_share list that overruns itself
        ]
    )
    verdict = table.admit(hello_of(records(handshake(body))))
    assert isinstance(verdict, Refuse) and verdict.route is table.routes["keyless"]
    assert verdict.alert == 50  # decode_error
    assert table.routes["keyless"].state.stats.handshakes == {f"tls_{verdict.reason}": 1}


def test_blind_terminates_every_hello_for_its_name(table: Table) -> None:
    route = table.routes["blind"]
    assert table.admit(hello_of(openssl_hello("cdn.test"))) == Terminate(route)
