"""A small HTTP/1.1 server for admin endpoints (/metrics, /healthz), built on h11.

Bounded: request heads up to 16 KiB, bodies refused, 10 s to send a whole request (one
deadline from the moment the server waits for it, as web/http1.py: a client trickling bytes
does not extend it), 10 s to take the answer, at most 64 open connections and 16 of them per
client (an IPv4 address or an IPv6 /64); the last 16 slots go only to clients that hold none,
and a keep-alive connection ends after 30 s or 100 requests, so a few clients asking slowly
forever cannot keep the listener to themselves. It serves operators and Prometheus, not
visitors.

The status page (`/`) is public (it holds no figures); every other path needs the admin token
when one is set (`Authorization: Bearer <token>`), which check-config requires for a listener
off loopback. Without a token a request must name the listener by an IP address or `localhost`
(the Host header): a web page whose name an attacker re-points at 127.0.0.1 (DNS rebinding)
would otherwise read the figures through the operator's browser.

A POST (a write: `/acme/renew`) always needs the token: with none configured every POST is
refused (403), since a page in the operator's browser can send a simple form POST to a
loopback listener with no preflight. A request that says it comes from another site
(`Sec-Fetch-Site: cross-site`/`same-site`, or any `Origin` header, which browsers send on
cross-origin POSTs and this listener never needs) is refused (403) on every non-public path.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
from collections.abc import Awaitable, Callable, Iterable

import h11

from blindfold.core.iplist import visitor_key
from blindfold.obs.status import CSP, ICON

Handler = Callable[[str, str], Awaitable[tuple[int, str, bytes]]]
MAX_CONNECTIONS = 64
MAX_PER_ADDRESS = 16  # one address (a stuck scraper, a slowloris) leaves the rest to others
RESERVED_FOR_NEW = 16  # the last slots: only for a client that holds no connection yet
CONNECTION_LIFETIME_S = 30.0  # a keep-alive connection's answers end with `close` after this
MAX_REQUESTS_PER_CONNECTION = 100
REQUEST_TIMEOUT_S = 10.0  # to receive one whole request; also to send its answer
# the status page itself and its icon: no figures (the page asks status.json with the token)
PUBLIC_PATHS = frozenset({"/", "/favicon.ico"})


def _local_name(host: bytes) -> bool:
    """An IP literal or localhost, with or without a port."""
    name = host.rsplit(b":", 1)[0] if host.count(b":") == 1 else host
    name = name.strip(b"[]").lower()
    if name == b"localhost" or name.endswith(b".localhost"):
        return True
    try:
        ipaddress.ip_address(name.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        if host.startswith(b"[") and b"]:" in host:  # [v6]:port
            return _local_name(host.split(b"]:", 1)[0] + b"]")
        return False
    return True


def cross_site(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Sent by a browser on behalf of another site: any Origin (no page of ours posts), or a
    Sec-Fetch-Site other than same-origin/none."""
    for name, value in headers:
        if name == b"origin":
            return True
        if name == b"sec-fetch-site" and value.strip().lower() not in (b"same-origin", b"none"):
            return True
    return False


def authorized(token: bytes | None, headers: Iterable[tuple[bytes, bytes]]) -> bool:
    if token is None:
        return all(_local_name(value) for name, value in headers if name == b"host")
    for name, value in headers:
        if name == b"authorization":
            scheme, _, given = value.partition(b" ")
            if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token):
                return True
    return False


class AdminServer:
    def __init__(
        self, handler: Handler, token: bytes | None = None, post_paths: frozenset[str] = frozenset()
    ) -> None:
        """`post_paths`: the only paths a POST (with an empty body) may reach, with the token
        like any other path; every other POST, and every other method, is answered 405."""
        self._handler = handler
        self.token = token
        self._post_paths = post_paths
        self._open = 0
        self._per_address: dict[str, int] = {}
        self.server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._serve, host, port, limit=16384)
        sockname = self.server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        address = visitor_key(str(peer[0])) if isinstance(peer, tuple) and peer else ""
        held = self._per_address.get(address, 0)
        if (
            self._open >= MAX_CONNECTIONS
            or held >= MAX_PER_ADDRESS
            or (held and self._open >= MAX_CONNECTIONS - RESERVED_FOR_NEW)
        ):
            writer.close()
            return
        self._open += 1
        self._per_address[address] = held + 1
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16384)
        loop = asyncio.get_running_loop()
        close_at = loop.time() + CONNECTION_LIFETIME_S
        served = 0
        try:
            while True:
                deadline = loop.time() + REQUEST_TIMEOUT_S
                event = await self._next_event(conn, reader, deadline)
                if isinstance(event, h11.Request):
                    method = event.method.decode("ascii", "replace")
                    path = event.target.decode("ascii", "replace").split("?")[0]
                    if method not in ("GET", "HEAD") and not (
                        method == "POST" and path in self._post_paths
                    ):
                        status, ctype, body = 405, "text/plain", b"method not allowed\n"
                    elif path not in PUBLIC_PATHS and cross_site(event.headers):
                        status, ctype, body = 403, "text/plain", b"cross-site request refused\n"
                    elif method == "POST" and self.token is None:
                        status, ctype, body = 403, "text/plain", b"POST needs admin_token_file\n"
                    elif path not in PUBLIC_PATHS and not authorized(self.token, event.headers):
                        status, ctype, body = 401, "text/plain", b"admin token required\n"
                        if self.token is None:
                            status, body = 403, b"name this listener by its address\n"
                    elif path == "/favicon.ico":
                        status, ctype, body = 200, "image/svg+xml", ICON
                    else:
                        status, ctype, body = await self._handler(method, path)
                    # drain the (empty) body before answering
                    while not isinstance(
                        await self._next_event(conn, reader, deadline), h11.EndOfMessage
                    ):
                        pass
                    headers = [
                        ("content-type", ctype),
                        ("content-length", str(len(body))),
                        ("cache-control", "no-store"),
                        ("x-content-type-options", "nosniff"),
                        ("content-security-policy", CSP),
                        ("referrer-policy", "no-referrer"),
                    ]
                    if status == 401:
                        headers.append(("www-authenticate", 'Bearer realm="blindfold admin"'))
                    served += 1
                    if served >= MAX_REQUESTS_PER_CONNECTION or loop.time() >= close_at:
                        headers.append(("connection", "close"))  # h11 then ends the connection
                    writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
                    if method != "HEAD":
                        writer.write(conn.send(h11.Data(data=body)))
                    writer.write(conn.send(h11.EndOfMessage()))
                    async with asyncio.timeout(REQUEST_TIMEOUT_S):
                        await writer.drain()
                    if conn.our_state is h11.MUST_CLOSE:
                        break
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    break
        except asyncio.CancelledError:
            # The process is stopping. Ended quietly: this task is start_server's own, nobody
            # awaits it, and Python 3.11's done-callback calls task.exception() on a cancelled
            # task, which logs "Exception in callback" with a traceback.
            pass
        except (h11.RemoteProtocolError, TimeoutError, ConnectionError):
            try:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    writer.write(
                        conn.send(
                            h11.Response(
                                status_code=400,
                                headers=[("content-length", "0"), ("connection", "close")],
                            )
                        )
                    )
                    writer.write(conn.send(h11.EndOfMessage()))
            except h11.LocalProtocolError:
                pass
        finally:
            self._open -= 1
            left = self._per_address[address] - 1
            if left:
                self._per_address[address] = left
            else:
                del self._per_address[address]
            writer.close()

    @staticmethod
    async def _next_event(
        conn: h11.Connection, reader: asyncio.StreamReader, deadline: float
    ) -> object:
        """The next h11 event, by the loop time `deadline` (TimeoutError)."""
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            async with asyncio.timeout_at(deadline):
                data = await reader.read(16384)
            conn.receive_data(data)
