"""The private CPython internals blindfold relies on, in one place, checked at start-up.

Each saves measurable work on a hot path or works around a stdlib gap; none has a public
equivalent in the Python versions we support (pyproject's requires-python: those the test
suite ran on). Every daemon calls `check()` before it starts (`io.service`), so a Python that
lacks one fails at once with a message naming the version and what is missing, never later
inside a visitor's connection.

- `socket.socket._accept()`: accept(2) returning (fd, address) with no socket.socket built
  around it: the edge worker's accept loop (`raw_accept`).
- `_socket.socket`: the C socket type without socket.socket's Python layer (IntEnum
  conversions, io refcounts), which cost more per relayed connection than the rest of
  accept: the edge's visitor and origin sockets on the passthrough path (`CSocket`).
- `BaseSelectorEventLoop._make_socket_transport(sock, protocol)`: an accepted socket becomes
  an asyncio transport at once, calling `connection_made` on the next turn
  (`connect_accepted_socket` costs a task, a future and a wait per connection): the edge's
  hand-off of a terminated connection to asyncio (`socket_transport`).
- `_SelectorSocketTransport._read_ready_cb`: a bound method of the transport itself, cleared
  once the transport is closed so that reference counting frees it (`release_transport`;
  optional: a transport without it is left alone).
- `asyncio.sslproto.SSLProtocol._on_handshake_complete`, `_outgoing`, `_transport`: CPython
  3.11+ aborts a failed server handshake without sending the alert OpenSSL wrote; the
  origin agent sends it (`install_ssl_alerts`).
"""

from __future__ import annotations

import _socket
import asyncio
import asyncio.selector_events
import asyncio.sslproto
import inspect
import socket
import sys
from collections.abc import Callable
from typing import Any

CSocket = _socket.socket


class CompatError(RuntimeError):
    """This Python lacks an internal blindfold relies on."""


def _missing() -> list[str]:
    out = []
    if not callable(getattr(socket.socket, "_accept", None)):
        out.append("socket.socket._accept")
    if not isinstance(CSocket, type):
        out.append("_socket.socket")
    loop_cls = asyncio.selector_events.BaseSelectorEventLoop
    if not callable(vars(loop_cls).get("_make_socket_transport")):  # its own, not the stub
        out.append("asyncio.selector_events.BaseSelectorEventLoop._make_socket_transport")
    ssl_cls: Any = asyncio.sslproto.SSLProtocol
    hook = vars(ssl_cls).get("_on_handshake_complete")
    if not callable(hook):
        out.append("asyncio.sslproto.SSLProtocol._on_handshake_complete")
    else:
        try:
            source = inspect.getsource(ssl_cls)
        except (OSError, TypeError):  # no source shipped: trust the hook's presence
            source = "self._outgoing self._transport"
        for attr in ("_outgoing", "_transport"):
            if f"self.{attr}" not in source:
                out.append(f"asyncio.sslproto.SSLProtocol.{attr}")
    return out


def check() -> None:
    """CompatError naming the Python version and every missing internal."""
    missing = _missing()
    if missing:
        version = ".".join(map(str, sys.version_info[:3]))
        raise CompatError(
            f"Python {version} lacks internals blindfold relies on ({', '.join(missing)}); "
            "use a Python version its requires-python lists"
        )


def raw_accept(lsock: socket.socket) -> Callable[[], tuple[int, Any]]:
    """`lsock`'s accept(2): () -> (fd, address), no socket object made."""
    accept: Callable[[], tuple[int, Any]] = lsock._accept  # type: ignore[attr-defined]
    return accept


def socket_transport(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: asyncio.BaseProtocol
) -> asyncio.Transport:
    """An asyncio transport on the accepted, non-blocking `sock` for `protocol`, made now;
    `connection_made` follows on the loop's next turn."""
    make = loop._make_socket_transport  # type: ignore[attr-defined]
    transport: asyncio.Transport = make(sock, protocol)
    return transport


def release_transport(transport: asyncio.BaseTransport) -> None:
    """After the transport's `connection_lost`: drop its reference to its own read callback.
    CPython's `_SelectorSocketTransport` keeps `_read_ready_cb`, a bound method of itself: a
    reference cycle, so every closed transport (and its socket wrapper and extra dict) would
    wait for the cyclic collector instead of being freed at once. Transports without it
    (uvloop's) are left alone."""
    if getattr(transport, "_read_ready_cb", None) is not None:
        transport._read_ready_cb = None  # type: ignore[attr-defined]


_SSL_ALERTS_INSTALLED = False


def install_ssl_alerts() -> None:
    """Send the TLS alert when a handshake fails on an asyncio `ssl=` transport.

    CPython 3.11's `asyncio.sslproto.SSLProtocol` aborts the connection when OpenSSL fails a
    handshake (no shared cipher, no shared group, a bad ClientHello...) without sending what
    OpenSSL wrote to the outgoing memory BIO: the fatal alert that tells the client why.
    Clients then see a reset instead of `handshake_failure` (tlsfuzzer counted ~380 such cases
    against the origin agent). This wraps `_on_handshake_complete` so that, on failure, those
    bytes are written to the socket first. It touches nothing else. (`check()` has made sure
    the internals exist.)"""
    global _SSL_ALERTS_INSTALLED
    if _SSL_ALERTS_INSTALLED:
        return
    cls: Any = asyncio.sslproto.SSLProtocol
    original = cls._on_handshake_complete

    def _on_handshake_complete(self: Any, handshake_exc: BaseException | None) -> None:
        if handshake_exc is not None:
            outgoing = getattr(self, "_outgoing", None)
            transport = getattr(self, "_transport", None)
            try:
                data = outgoing.read() if outgoing is not None else b""
                if data and transport is not None and not transport.is_closing():
                    transport.write(data)  # an empty send buffer: it goes out at once
            except Exception:  # never let the workaround break the failure path
                pass
        original(self, handshake_exc)

    cls._on_handshake_complete = _on_handshake_complete
    _SSL_ALERTS_INSTALLED = True
