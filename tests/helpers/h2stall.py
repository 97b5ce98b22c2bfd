"""An HTTP/2 client that never reads: streams opened on a connection whose receive window is 0,
so the server can send response heads but no body byte (a visitor holding the edge's work)."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import h2.config
import h2.connection
import h2.settings

Header = tuple[bytes, bytes]


def h2_stall_streams(
    port: int, sni: str, ca: Path, requests: list[list[Header]], source: str = "127.0.0.1"
) -> ssl.SSLSocket:
    """Open one stream per header list in `requests`; returns the socket (keep it open)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    tls = ctx.wrap_socket(raw, server_hostname=sni)
    assert tls.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    conn.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}
    )
    conn.initiate_connection()
    for headers in requests:
        conn.send_headers(conn.get_next_available_stream_id(), headers, end_stream=True)
    tls.sendall(conn.data_to_send())
    return tls
