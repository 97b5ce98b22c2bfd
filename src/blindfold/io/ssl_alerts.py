"""Send the TLS alert when a handshake fails on an asyncio `ssl=` transport.

CPython 3.11's `asyncio.sslproto.SSLProtocol` aborts the connection when OpenSSL fails a
handshake (no shared cipher, no shared group, a bad ClientHello...) without sending what
OpenSSL wrote to the outgoing memory BIO: the fatal alert that tells the client why. Clients
then see a reset instead of `handshake_failure` (tlsfuzzer counts ~380 such cases against the
origin agent). `install()` wraps `_on_handshake_complete` so that, on failure, those bytes are
written to the socket first. It touches nothing else and does nothing if the internals it
relies on are absent (another Python version)."""

from __future__ import annotations

import asyncio.sslproto
from typing import Any

_INSTALLED = False


def install() -> None:
    global _INSTALLED
    cls: Any = asyncio.sslproto.SSLProtocol
    if _INSTALLED or not hasattr(cls, "_on_handshake_complete"):
        return
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
    _INSTALLED = True
