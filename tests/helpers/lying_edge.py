"""A hostile keyless edge for tests: it holds a real edge identity (the client certificate the key
server knows) and runs our own TLS 1.3 core with a real visitor (curl), but when the handshake
needs its signature it sends the key server whatever a liar would (`Trick`).

The edge process is the liar here, so nothing of `blindfold edge` runs: one thread accepts the
visitor, drives `core.tls13_server.TlsServer`, and answers one HTTP request once the handshake
completes (which it must never do for a name the edge is not authorised for)."""

from __future__ import annotations

import queue
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from blindfold.core import keyless_wire as w
from blindfold.core import tls13_server as ts
from blindfold.core.clienthello import ClientHello, peek_client_hello

DEADLINE_S = 10.0


class KeyServerLink:
    """Raw frames to the key server over one mutual-TLS connection: the liar writes any bytes."""

    def __init__(self, port: int, tls: ssl.SSLContext) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)
        self.sock = tls.wrap_socket(raw, server_hostname="keyserver.test")
        self.decoder = w.FrameDecoder()
        self.frames: list[w.Frame] = []
        self.next_id = 1

    def call(self, frame: bytes) -> w.Frame:
        """Send one frame's bytes; return the next frame the key server answers with."""
        self.sock.sendall(frame)
        while not self.frames:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the key server closed the connection")
            self.frames += self.decoder.feed(data)
        return self.frames.pop(0)

    def call_raw(self, data: bytes) -> bytes:
        """Send any bytes; everything the key server answers until it closes."""
        self.sock.sendall(data)
        reply = b""
        while chunk := self.sock.recv(65536):
            reply += chunk
        return reply

    def rid(self) -> int:
        self.next_id += 1
        return self.next_id

    def close(self) -> None:
        self.sock.close()


@dataclass
class Attempt:
    """What the liar has in hand when the visitor's handshake needs its signature."""

    hello: ClientHello
    request: ts.SignatureRequested
    link: KeyServerLink
    answers: list[w.Frame] = field(default_factory=list)

    def ask(self, frame: bytes) -> bytes | None:
        """Send a frame; the signature if the key server signed, else None (answer kept)."""
        answer = self.link.call(frame)
        self.answers.append(answer)
        return w.decode_sign_response(answer.body) if answer.type == w.SIGN_RESPONSE else None


Trick = Callable[[Attempt], bytes | None]


@dataclass
class Outcome:
    handshake_completed: bool = False
    answers: list[w.Frame] = field(default_factory=list)
    failure: str = ""
    served: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class LyingEdge:
    """Accepts visitor connections one at a time; each gets the next trick. One thread serves
    them all."""

    def __init__(self, identity: ts.ServerIdentity, ks_port: int, edge_tls: ssl.SSLContext):
        self.identity = identity
        self.link = KeyServerLink(ks_port, edge_tls)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(DEADLINE_S)
        self.port = self.listener.getsockname()[1]
        self.sessions = ts.SessionStore(60, 100)
        self._work: queue.Queue[tuple[Trick, Outcome] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._last: Outcome | None = None

    def serve_one(self, trick: Trick) -> Outcome:
        """Serve the next visitor connection with `trick`; the Outcome fills in."""
        self._last = outcome = Outcome()
        self._work.put((trick, outcome))
        return outcome

    def join(self) -> None:
        """Wait until the last connection is served."""
        if self._last is not None:
            assert self._last.done.wait(DEADLINE_S + 5), "the lying edge did not finish"

    def close(self) -> None:
        self._work.put(None)
        self._thread.join(DEADLINE_S + 5)
        self.listener.close()
        self.link.close()

    def _run(self) -> None:
        while (item := self._work.get()) is not None:
            trick, outcome = item
            try:
                self._serve(trick, outcome)
            finally:
                outcome.done.set()

    def _serve(self, trick: Trick, outcome: Outcome) -> None:
        try:
            conn, _addr = self.listener.accept()
        except OSError as exc:
            outcome.failure = f"accept: {exc}"
            return
        with conn:
            conn.settimeout(DEADLINE_S)
            try:
                self._handshake(conn, trick, outcome)
            except (OSError, ConnectionError) as exc:
                outcome.failure = outcome.failure or f"io: {exc}"

    def _handshake(self, conn: socket.socket, trick: Trick, outcome: Outcome) -> None:
        buf = b""
        hello = None
        while hello is None:
            data = conn.recv(65536)
            if not data:
                outcome.failure = "visitor left before its ClientHello"
                return
            buf += data
            hello = peek_client_hello(buf)
        server = ts.TlsServer(
            self.identity, ts.TlsSettings(alpn=("http/1.1",)), self.sessions, hello.sni or "", hello
        )
        events = server.receive(buf, 0.0)
        request = next(e for e in events if isinstance(e, ts.SignatureRequested))
        attempt = Attempt(hello, request, self.link)
        signature = trick(attempt)
        outcome.answers = attempt.answers
        if signature is None:
            server.signature_failed("refused")
            conn.sendall(server.data_to_send())
            outcome.failure = "no signature"
            return
        events = server.signature_received(signature, 0.0)
        conn.sendall(server.data_to_send())
        while server.state not in ("closed",):
            data = conn.recv(65536)
            if not data:
                break
            events = server.receive(data, 0.0)
            for event in events:
                if isinstance(event, ts.HandshakeCompleted):
                    outcome.handshake_completed = True
                elif isinstance(event, ts.DataReceived) and b"\r\n\r\n" in event.data:
                    server.send(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 18\r\nConnection: close\r\n\r\n"
                        b"read by a liar :-)"
                    )
                    server.close()
                    outcome.served = True
                elif isinstance(event, ts.ConnectionFailed):
                    outcome.failure = event.reason
            out = server.data_to_send()
            if out:
                conn.sendall(out)
