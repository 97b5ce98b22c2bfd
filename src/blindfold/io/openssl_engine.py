"""The edge's own TLS, for routes whose certificate and key the edge may hold (blind routes:
the content is sealed, so the edge's TLS protects nothing secret). OpenSSL through
`ssl.SSLObject` over memory BIOs, behind the same interface as `core.tls13_server.TlsServer`,
so `io.tls13_transport.TlsServerProtocol` runs either. Memory BIOs also let the ClientHello
the layer-4 path has already read be fed in first."""

from __future__ import annotations

import ssl

from blindfold.core.tls13_server import (
    ConnectionFailed,
    DataReceived,
    Event,
    HandshakeCompleted,
    PeerClosed,
)

_READ = 1 << 16
_CLOSE_NOTIFY_ERRORS = (ssl.SSLZeroReturnError,)


class OpenSslServer:
    """`receive(data, now) -> events`, `data_to_send()`, `send(data)`, `close()`; states
    handshake -> open -> closed."""

    def __init__(self, context: ssl.SSLContext, server_name: str | None) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._in, self._out, server_side=True)
        self.server_name = server_name
        self.state = "handshake"
        self.alpn: str | None = None
        self.cipher_suite = 0
        self.resumed = False
        self.key_updates_received = 0
        self.key_updates_sent = 0

    def data_to_send(self) -> bytes:
        return self._out.read()

    def receive(self, data: bytes, now: float) -> list[Event]:
        if self.state == "closed":
            return []
        self._in.write(data)
        events: list[Event] = []
        try:
            if self.state == "handshake":
                try:
                    self._ssl.do_handshake()
                except ssl.SSLWantReadError:
                    return events
                self.state = "open"
                self.alpn = self._ssl.selected_alpn_protocol()
                self.resumed = self._ssl.session_reused
                events.append(HandshakeCompleted(self.alpn, 0, self.resumed))
            while True:
                try:
                    chunk = self._ssl.read(_READ)
                except ssl.SSLWantReadError:
                    break
                if not chunk:
                    raise ssl.SSLZeroReturnError
                events.append(DataReceived(chunk))
        except _CLOSE_NOTIFY_ERRORS:
            self.state = "closing"
            events.append(PeerClosed())
        except ssl.SSLError as exc:
            self.state = "closed"
            reason = (exc.reason or "ssl_error").lower()
            events.append(ConnectionFailed(reason, None, str(exc)))
        return events

    def send(self, data: bytes | bytearray | memoryview) -> None:
        if self.state != "open":
            return
        try:
            self._ssl.write(data)
        except ssl.SSLError:
            self.state = "closed"

    def close(self) -> None:
        if self.state in ("open", "closing"):
            try:
                self._ssl.unwrap()
            except ssl.SSLError:
                pass
        self.state = "closed"
