"""The origin agent's side of ACME: tls-alpn-01 answers (RFC 8737) and the certificates its
own ACME orders add to the site's.

Edges forward a ClientHello offering ALPN `acme-tls/1` to the origin agent in every mode
(a keyless edge does not terminate it). When a challenge directory is configured the agent
peeks at each TLS connection's ClientHello (after the PROXY header, without consuming it);
one that offers `acme-tls/1` gets the challenge certificate for its SNI from the directory
and the connection ends after the handshake (§3: no application data follows). Any other
hello goes to the site's TLS unchanged.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any

from blindfold.acme.challenge import ACME_TLS_ALPN, ChallengeDir
from blindfold.config.origin import CertificateConfig, OriginConfig
from blindfold.core.clienthello import ClientHello, peek_client_hello
from blindfold.errors import ProtocolError

MAX_HELLO_BYTES = 16384
_PEEK_RETRY_S = 0.01
_PEEK_MAX_PAUSE_S = 0.25


def site_certificates(cfg: OriginConfig) -> tuple[CertificateConfig, ...]:
    """The certificates the site's TLS serves: the configured ones, then the ACME orders'."""
    extra = tuple(CertificateConfig(o.cert, o.key) for o in cfg.acme.orders) if cfg.acme else ()
    return cfg.certificates + extra


def challenge_dir(cfg: OriginConfig) -> ChallengeDir | None:
    path = cfg.acme_challenge_dir or (cfg.acme.challenge_dir if cfg.acme else "")
    return ChallengeDir(path) if path else None


async def peek_hello(sock: socket.socket, timeout_s: float) -> ClientHello | None:
    """The ClientHello at the front of `sock`'s receive queue (MSG_PEEK: the bytes stay for
    the TLS server), or None when the peer closed or sent something else. A hello spread over
    several TCP segments is re-peeked at a short interval until the deadline."""
    loop = asyncio.get_running_loop()
    pause = _PEEK_RETRY_S
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                data = sock.recv(MAX_HELLO_BYTES, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                ready = loop.create_future()
                loop.add_reader(sock.fileno(), ready.set_result, None)
                try:
                    await ready
                finally:
                    loop.remove_reader(sock.fileno())
                continue
            if not data:
                return None
            try:
                hello = peek_client_hello(data, MAX_HELLO_BYTES)
            except ProtocolError:
                return None  # the site's TLS answers it as it would
            if hello is not None:
                return hello
            if len(data) >= MAX_HELLO_BYTES:
                return None
            # the peeked bytes keep the socket readable: poll, backing off, so a hello
            # trickled in byte by byte costs a few wake-ups, not one per 10 ms (an edge sends
            # the whole hello at once)
            await asyncio.sleep(pause)
            pause = min(pause * 2, _PEEK_MAX_PAUSE_S)


def wants_challenge(hello: ClientHello | None) -> bool:
    return hello is not None and ACME_TLS_ALPN in hello.alpn


class _CloseAfterHandshake(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()

    def data_received(self, data: bytes) -> None:
        pass


async def answer_challenge(
    sock: socket.socket, ctx: ssl.SSLContext, handshake_timeout_s: float
) -> Any:
    """Complete the TLS handshake with the challenge certificate, then close."""
    loop = asyncio.get_running_loop()
    return await loop.connect_accepted_socket(
        _CloseAfterHandshake, sock, ssl=ctx, ssl_handshake_timeout=handshake_timeout_s
    )
