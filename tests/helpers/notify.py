"""A real sd_notify receiver: the AF_UNIX datagram socket systemd would pass in $NOTIFY_SOCKET,
reporting each message with the sender's PID (SO_PASSCRED), as systemd checks NotifyAccess."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

SCM_CREDENTIALS = 0x02  # linux/socket.h; struct ucred {pid, uid, gid}


class NotifySocket:
    def __init__(self, path: Path | None = None, abstract: str = "") -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if abstract:
            self.sock.bind("\0" + abstract)
            self.address = "@" + abstract
        else:
            assert path is not None
            self.sock.bind(str(path))
            self.address = str(path)

    def receive(self, timeout_s: float) -> tuple[dict[str, str], int] | None:
        """The next message as {KEY: VALUE} and the sender's PID; None at the deadline."""
        self.sock.settimeout(timeout_s)
        try:
            data, ancillary, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            return None
        pid = -1
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[:12])[0]
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        return fields, pid

    def close(self) -> None:
        self.sock.close()
