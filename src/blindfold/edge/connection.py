"""One visitor connection: peek the ClientHello, ask the admission core what to do with it,
and carry the verdict out: refuse, forward (PROXY header and hello bytes unchanged to the
first origin that accepts, then relay both ways), or let the route's mode take it.

Phases: HELLO (reading the ClientHello under hello_timeout_s and max_hello_bytes) ->
CONNECTING (trying origins under connect_timeout_s each) -> RELAY (idle_timeout_s) -> DONE, or
HELLO -> TAKEN (a mode owns it: it forwards it, hands it to asyncio or closes it) -> DONE.
Every exit goes through `close`, which releases the guards' slot, counts the outcome and
writes the connection's one log line.

Each socket is registered with the reactor at most once, edge-triggered for input and output,
and only when it must wait (with TCP_DEFER_ACCEPT the hello is usually readable at accept, and
on fast links the origin accepts the first write at once). Handlers are swapped, not
re-registered, between phases; closing a socket removes it from epoll.
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import time
from typing import Protocol

from blindfold.config.edge import EdgeConfig
from blindfold.core.clienthello import ClientHello, HelloReader
from blindfold.core.routing import SniRouter
from blindfold.edge import admission
from blindfold.edge.admission import Forward, Terminate
from blindfold.edge.guards import Admission, Guards
from blindfold.edge.mode import RouteState
from blindfold.edge.origins import Origin
from blindfold.edge.stats import WorkerStats
from blindfold.errors import ProtocolError
from blindfold.io import compat
from blindfold.io.compat import CSocket
from blindfold.io.reactor import (
    EPOLLERR,
    EPOLLET,
    EPOLLHUP,
    EPOLLIN,
    EPOLLOUT,
    EPOLLRDHUP,
    Reactor,
    Timer,
)
from blindfold.io.relay import PipePool, Relay
from blindfold.io.tls13_transport import TlsServerProtocol
from blindfold.obs.log import JsonLog

HELLO, CONNECTING, RELAY, DONE, TAKEN = 0, 1, 2, 3, 4
WATCH = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
_STREAM_NONBLOCK = socket.SOCK_STREAM | socket.SOCK_NONBLOCK  # no separate fcntl call
_WAIT_CONNECT = {errno.EAGAIN, errno.ENOTCONN, errno.EINPROGRESS, errno.EALREADY}
_ALPN_JSON: dict[tuple[bytes, ...], str] = {}
_ALERT_RECORD = b"\x15\x03\x03\x00\x02"  # RFC 8446 §5.1: an unprotected alert record


class Host(Protocol):
    """The worker as its connections see it."""

    @property
    def reactor(self) -> Reactor: ...

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None: ...

    @property
    def config(self) -> EdgeConfig: ...

    @property
    def router(self) -> SniRouter[RouteState]: ...

    @property
    def guards(self) -> Guards: ...

    @property
    def stats(self) -> WorkerStats: ...

    @property
    def log(self) -> JsonLog: ...

    @property
    def pipes(self) -> PipePool: ...

    @property
    def relay_mode(self) -> str: ...

    @property
    def index(self) -> int: ...

    @property
    def conns(self) -> set[Conn]: ...

    @property
    def relaying(self) -> set[Conn]: ...

    def may_log_refusal(self) -> bool: ...


class Conn:
    __slots__ = (
        "adm",
        "attempts",
        "buf",
        "client",
        "client_in",
        "client_port",
        "fd",
        "header",
        "hello",
        "ip",
        "l7",
        "l7_bytes",
        "l7_transport",
        "last",
        "local",
        "moved",
        "origin",
        "origin_in",
        "osock",
        "out",
        "phase",
        "reader",
        "registered",
        "relay",
        "route",
        "started",
        "timer",
        "worker",
    )

    def __init__(
        self,
        worker: Host,
        sock: CSocket,
        ip: str,
        port: int,
        adm: Admission,
        local: tuple[str, int] | None,
    ) -> None:
        self.worker = worker
        self.client = sock
        self.fd = sock.fileno()
        self.ip = ip
        self.client_port = port
        self.adm = adm
        # the listener's address; for a wildcard listener read from the socket before
        # admission (the PROXY header names it), None if that fails
        self.local = local
        self.started = self.last = worker.reactor.now
        self.phase = HELLO
        self.buf = b""  # the hello's bytes, once read (forwarded unchanged)
        self.reader: HelloReader | None = None
        self.hello: ClientHello | None = None
        self.route: RouteState | None = None
        self.origin: Origin | None = None
        self.osock: CSocket | None = None
        self.out = b""
        self.header = b""  # the PROXY header before its authentication (per connection)
        self.attempts: list[Origin] = []
        self.relay: Relay | None = None
        self.registered = False
        self.timer: Timer | None = None
        self.moved = 0  # relay.moved at the last idle check
        # Edge-triggered readiness seen before the relay starts: may a socket hold bytes that
        # no future event will announce?
        self.client_in = False
        self.origin_in = False
        self.l7: TlsServerProtocol | None = None  # handed off: the socket belongs to asyncio
        self.l7_bytes = (0, 0)
        self.l7_transport: asyncio.BaseTransport | None = None

    # ---------------------------------------------------------------- HELLO
    def start(self) -> None:
        # With TCP_DEFER_ACCEPT the hello is usually readable already: try before polling.
        # Without, it is usually still on its way: a read now would only return EAGAIN.
        if self.worker.config.defer_accept:
            self._read_hello()
        if self.phase == HELLO:
            worker = self.worker
            self.timer = worker.reactor.call_later(
                worker.config.hello_timeout_s, self._hello_timeout
            )
            worker.reactor.add(self.fd, WATCH, self._on_client)
            self.registered = True

    def _on_client(self, mask: int) -> None:
        if mask & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
            if self.phase != HELLO:  # CONNECTING: the relay will read it
                self.client_in = True
                return
            # Edge-triggered: after FIN/RST read on to the end, no further edge will come.
            ended = mask & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)
            while self._read_hello() and ended and self.phase == HELLO:
                pass

    def _read_hello(self) -> bool:
        """Read what has arrived and try to parse. True if bytes were read (more may follow)."""
        worker = self.worker
        reader = self.reader
        if reader is None:
            config = worker.config
            reader = self.reader = HelloReader(config.max_hello_bytes, config.max_hello_records)
        want = reader.max_bytes - len(reader)
        try:
            data = self.client.recv(want)
        except BlockingIOError:
            return False
        except OSError:
            self.close("refused", "hello_eof")
            return False
        if not data:
            self.close("refused", "hello_eof")
            return False
        self.client_in = len(data) == want  # a full read may have left bytes behind
        t0 = time.perf_counter()
        try:
            # the reader keeps its place: each byte is parsed once however the hello is cut
            hello = reader.feed(data)
        except ProtocolError as exc:
            worker.stats.hello_parse.observe(time.perf_counter() - t0)
            self.refuse_with_alert(exc)
            return False
        worker.stats.hello_parse.observe(time.perf_counter() - t0)
        if hello is not None:
            self.buf = reader.raw
            self.reader = None
            self.hello = hello
            self._on_hello(hello)
        return True

    def _hello_timeout(self) -> None:
        self.timer = None
        if self.phase == HELLO:
            self.close("refused", "hello_timeout")

    def _on_hello(self, hello: ClientHello) -> None:
        worker = self.worker
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        worker.stats.count_ja4(hello.ja4)
        if self.local is None:  # a wildcard listener: the PROXY header names the address
            self.local = self._sockname()
        verdict = admission.admit(hello, self, worker.router, worker.guards, worker.reactor.now)
        self.route = verdict.route
        if isinstance(verdict, Forward | Terminate):
            verdict.route.stats.opened += 1
        if isinstance(verdict, Forward):
            self._forward(verdict)
        elif isinstance(verdict, Terminate):
            if not verdict.route.mode.begin(self, verdict.route, hello):
                self.forward()
        else:
            self._refuse(verdict.reason, verdict.alert)

    def _forward(self, verdict: Forward) -> None:
        self.phase = CONNECTING
        header = verdict.proxy_header
        self.header = header
        self.attempts = verdict.origins
        self._connect_next(None)

    def _sockname(self) -> tuple[str, int] | None:
        try:
            name = self.client.getsockname()
        except OSError:
            return None
        return (name[0], name[1])

    @property
    def hello_bytes(self) -> bytes:
        return self.buf

    def refuse_with_alert(self, exc: ProtocolError) -> None:
        self._refuse(exc.reason, exc.alert)

    def _refuse(self, reason: str, alert: int | None) -> None:
        """Refuse the way a TLS server would: a malformed hello's fatal alert (RFC 8446 §6,
        unencrypted: no keys exist yet), then close. Unread input is drained first so that the
        close is a FIN, not a reset that could destroy the alert on its way."""
        if alert is not None and self.phase in (HELLO, TAKEN) and self.l7 is None:
            try:
                self.client.send(_ALERT_RECORD + bytes((2, alert)))
                for _ in range(4):
                    if not self.client.recv(65536):
                        break
            except OSError:
                pass
        self.close("refused", reason)

    def proxy_header(self) -> bytes:
        assert self.route is not None and self.hello is not None
        return admission.proxy_header(
            self.route, self.hello, (self.ip, self.client_port), self.local
        )

    # ---------------------------------------------------------------- TAKEN (edge.mode.Connection)
    @property
    def taken(self) -> bool:
        return self.phase == TAKEN

    @property
    def pending(self) -> bool:
        return self.phase == TAKEN and self.l7 is None

    def take(self) -> None:
        """The route's mode owns the connection now: out of the reactor until it is
        forwarded, handed to asyncio or closed."""
        self.phase = TAKEN
        if self.registered:
            self.worker.reactor.remove(self.fd)
            self.registered = False

    def forward(self) -> None:
        route, hello = self.route, self.hello
        assert route is not None and hello is not None
        self.client_in = True  # bytes may have arrived while nobody watched
        self._forward(admission.forward(route, hello, self, self.worker.reactor.now))

    def send_now(self, data: bytes) -> None:
        if data:
            try:
                self.client.send(data)  # an alert: small, the socket buffer takes it
            except OSError:
                pass

    def hand_off(self, protocol: TlsServerProtocol, send_buffer_bytes: int = 0) -> None:
        loop = self.worker.loop
        assert loop is not None and self.phase == TAKEN
        # asyncio wants the Python type; type and protocol given, not asked of the kernel
        # again (two getsockopt); TCP's number keeps asyncio's TCP_NODELAY
        client = self.client
        sock = socket.socket(client.family, socket.SOCK_STREAM, socket.IPPROTO_TCP, client.detach())
        self.client = sock
        if send_buffer_bytes:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)
            except OSError:
                pass
        self.l7 = protocol
        self.l7_transport = compat.socket_transport(loop, sock, protocol)

    def finished(self, reason: str, bytes_in: int, bytes_out: int) -> None:
        self.l7_bytes = (bytes_in, bytes_out)
        self.l7 = None  # the transport has closed the socket
        transport, self.l7_transport = self.l7_transport, None
        if transport is not None:  # no reference cycle left for the collector (compat)
            compat.release_transport(transport)
        if reason in ("closed", "eof"):
            self.close("closed", "")
        else:
            self.close("reset" if not reason.startswith("tls_") else "refused", reason)

    # ---------------------------------------------------------------- CONNECTING
    def _connect_next(self, failure: str | None) -> None:
        worker = self.worker
        reactor = worker.reactor
        route = self.route
        assert route is not None  # set before CONNECTING
        if self.osock is not None:  # the previous attempt failed
            reactor.forget(self.osock.fileno())
            self.osock.close()
            self.osock = None
            if self.origin is not None and failure is not None:
                self._origin_failed(self.origin, failure)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        while self.attempts:
            origin = self.attempts.pop(0)
            self.origin = origin
            try:
                osock = CSocket(origin.family, _STREAM_NONBLOCK)
            except OSError:
                self.close("origin_failed", "socket_error")
                return
            osock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rc = osock.connect_ex(origin.sockaddr)
            if rc != 0 and rc != errno.EINPROGRESS:
                osock.close()
                failure = _connect_reason(rc)
                self._origin_failed(origin, failure)
                continue
            # Each attempt sends everything from the start: a previous attempt may have sent
            # part of it before it failed.
            if route.proxy_auth is not None and self.header:
                # a header authenticated for this very connection (its port is bound now)
                local = osock.getsockname()
                self.out = (
                    admission.authenticated(
                        route, self.header, local[:2], origin.sockaddr[:2], time.time()
                    )
                    + self.buf
                )
            else:
                self.out = self.header + self.buf if self.header else self.buf
            self.osock = osock
            # On loopback and fast links the connection is often up already: send now and
            # skip a trip through the poller.
            try:
                sent = osock.send(self.out)
            except OSError as exc:
                if exc.errno in _WAIT_CONNECT:
                    self._wait_connect(osock)
                    return
                self.osock = None
                osock.close()
                failure = _connect_reason(exc.errno or 0)
                self._origin_failed(origin, failure)
                continue
            self.out = self.out[sent:]
            if self.out:
                self._wait_connect(osock)
                return
            self._start_relay()
            return
        self.close("origin_failed", failure or "no_origin")

    def _origin_failed(self, origin: Origin, failure: str) -> None:
        route = self.route
        assert route is not None
        was_up = origin.is_up(self.worker.reactor.now)
        route.pool.mark_down(origin, failure, self.worker.reactor.now)
        if was_up:
            self.worker.log.log(
                "origin_down",
                route=route.name,
                origin=origin.text,
                reason=failure,
                down_s=route.pool.down_s,
            )

    def _wait_connect(self, osock: CSocket) -> None:
        reactor = self.worker.reactor
        reactor.add(osock.fileno(), WATCH, self._on_origin_connect)
        self.timer = reactor.call_later(self.worker.config.connect_timeout_s, self._connect_timeout)

    def _connect_timeout(self) -> None:
        self.timer = None
        if self.phase == CONNECTING:
            self._connect_next("connect_timeout")

    def _on_origin_connect(self, mask: int) -> None:
        osock = self.osock
        if osock is None or self.phase != CONNECTING:
            return
        if mask & (EPOLLIN | EPOLLRDHUP):
            self.origin_in = True
        if mask & (EPOLLERR | EPOLLHUP):
            err = osock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err or mask & EPOLLHUP:
                self._connect_next(_connect_reason(err or errno.ECONNREFUSED))
                return
        if not mask & EPOLLOUT:
            return
        try:
            sent = osock.send(self.out)
        except OSError as exc:
            if exc.errno in _WAIT_CONNECT:
                return
            self._connect_next(_connect_reason(exc.errno or 0))
            return
        self.out = self.out[sent:]
        if not self.out:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self._start_relay()

    # ---------------------------------------------------------------- RELAY
    def _start_relay(self) -> None:
        worker = self.worker
        reactor = worker.reactor
        route, origin, osock = self.route, self.origin, self.osock
        assert route is not None and origin is not None and osock is not None
        if origin.down_until:
            route.pool.mark_up(origin)
        self.phase = RELAY
        self.last = reactor.now
        origin.active += 1
        route.stats.active += 1
        worker.relaying.add(self)
        self.out = self.buf = b""
        relay = self.relay = Relay(
            worker.pipes,
            self.client,
            osock,
            self._on_relay_done,
            worker.relay_mode,
            a_readable=self.client_in,
            b_readable=self.origin_in,
        )
        if self.registered:
            reactor.set_handler(self.fd, relay.on_a)
        else:
            reactor.add(self.fd, WATCH, relay.on_a)
            self.registered = True
        ofd = osock.fileno()
        if reactor.is_registered(ofd):
            reactor.set_handler(ofd, relay.on_b)
        else:
            reactor.add(ofd, WATCH, relay.on_b)
        relay.start()

    def _on_relay_done(self, error: str | None) -> None:
        relay = self.relay
        if relay is not None and relay.first_end == "b" and relay.bytes_b_to_a == 0:
            # The origin ended the connection without a single byte of TLS: what a TLS server
            # does with a PROXY header it does not expect, or without one it requires.
            self.close("reset" if error else "closed", ORIGIN_CLOSED_BEFORE_TLS)
        elif error is None:
            self.close("closed", "")
        else:
            self.close("reset", error)

    # ---------------------------------------------------------------- DONE
    def close(self, outcome: str, reason: str) -> None:
        if self.phase == DONE:
            return
        phase = self.phase
        self.phase = DONE
        worker = self.worker
        reactor = worker.reactor
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        bytes_up = bytes_down = 0
        relay = self.relay
        if relay is not None:
            relay.release()
            bytes_up = relay.bytes_a_to_b
            bytes_down = relay.bytes_b_to_a
            self.relay = None
        if self.registered:
            reactor.forget(self.fd)
        if phase == TAKEN:
            l7, self.l7 = self.l7, None
            if l7 is not None:  # still open (ban, drain deadline): asyncio closes the socket
                l7.abort()
            elif self.client.fileno() >= 0:
                self.client.close()
            bytes_up, bytes_down = self.l7_bytes
        else:
            self.client.close()
        if self.osock is not None:
            reactor.forget(self.osock.fileno())
            self.osock.close()
        worker.guards.release(self.adm)
        worker.conns.discard(self)
        route = self.route
        if phase == RELAY:
            worker.relaying.discard(self)
            assert route is not None and self.origin is not None
            route.stats.active -= 1
            self.origin.active -= 1
            route.stats.bytes_to_origin += bytes_up
            route.stats.bytes_to_client += bytes_down
        if outcome == "refused":
            worker.stats.refuse(reason)
        if route is not None:
            outcomes = route.stats.outcomes
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if worker.config.log_connections and (outcome != "refused" or worker.may_log_refusal()):
            worker.log.line(self._log_line(outcome, reason, phase, bytes_up, bytes_down))

    def _log_line(
        self, outcome: str, reason: str, phase: int, bytes_up: int, bytes_down: int
    ) -> str:
        """The connection's log line, built by hand: every field is either ours (outcome,
        reason, numbers), validated (IP, SNI as an ASCII hostname, JA4) or JSON-encoded once and
        cached (route and origin names, ALPN lists)."""
        worker = self.worker
        hello = self.hello
        route = self.route
        if hello is not None:
            sni = f'"{hello.sni}"' if hello.sni else "null"
            alpn = _ALPN_JSON.get(hello.alpn)
            if alpn is None:
                alpn = json.dumps(list(hello.alpn_text[:8]))
                if len(_ALPN_JSON) > 1024:
                    _ALPN_JSON.clear()
                _ALPN_JSON[hello.alpn] = alpn
            ja4 = f'"{hello.ja4}"'
        else:
            sni, alpn, ja4 = "null", "[]", "null"
        origin = self.origin.json if self.origin is not None and phase >= CONNECTING else "null"
        return (
            f'"client":"{self.ip}","client_port":{self.client_port},"sni":{sni},"alpn":{alpn},'
            f'"ja4":{ja4},"route":{route.json_name if route else "null"},"origin":{origin},'
            f'"outcome":"{outcome}","reason":{f"{chr(34)}{reason}{chr(34)}" if reason else "null"},'
            f'"bytes_in":{bytes_up},"bytes_out":{bytes_down},'
            f"{_HINT_JSON if reason == ORIGIN_CLOSED_BEFORE_TLS else ''}"
            f'"duration_s":{worker.reactor.now - self.started:.6f},"worker":{worker.index}'
        )


ORIGIN_CLOSED_BEFORE_TLS = "origin_closed_before_tls"
_HINT = (
    "the origin closed the connection before any TLS byte: check that the route's "
    "proxy_protocol (default v2) matches what the origin expects (the origin agent's "
    "proxy_protocol, default required) and that this edge's address is in its trusted_edges"
)
_HINT_JSON = f'"hint":{json.dumps(_HINT)},'


def _connect_reason(err: int) -> str:
    if err == errno.ECONNREFUSED:
        return "refused"
    if err == errno.ETIMEDOUT:
        return "connect_timeout"
    if err in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "unreachable"
    return errno.errorcode.get(err, f"errno{err}").lower()
