"""Readiness notification for systemd (`Type=notify` units): the sd_notify protocol, in a few
lines instead of a dependency.

sd_notify(3): the service manager passes the address of an AF_UNIX datagram socket in
$NOTIFY_SOCKET (a path, or an abstract name written with a leading '@'); the service sends one
datagram of newline-separated KEY=VALUE assignments, e.g. "READY=1\\nSTATUS=...". Without
$NOTIFY_SOCKET (not started by systemd) nothing is sent. A failure to notify never stops the
service: systemd then reports the start as timed out, which names the problem well enough.
"""

from __future__ import annotations

import os
import socket

SEND_TIMEOUT_S = 2.0  # a datagram to a full receive queue blocks: never wait longer than this


def notify(*assignments: str) -> bool:
    """Send 'KEY=VALUE' assignments (e.g. "READY=1") to systemd; True if a datagram was sent."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]  # sd_notify(3): '@' stands for the abstract namespace
    elif not address.startswith("/"):
        return False  # unset, or a transport we do not speak (vsock: VMs only)
    message = "\n".join(assignments).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT_S)
            sock.connect(address)
            sock.sendall(message)
    except OSError:
        return False
    return True


def ready(status: str) -> bool:
    """The service is up: its listeners accept (sd_notify(3) READY=1, with a status line)."""
    return notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")


def stopping() -> bool:
    """The service is shutting down (sd_notify(3) STOPPING=1): systemd shows it as deactivating
    while it drains."""
    return notify("STOPPING=1")
