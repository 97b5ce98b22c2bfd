"""Listening sockets shared by worker processes, with connections steered by client address.

For each listen address the edge binds one SO_REUSEPORT socket per worker, in worker order, and
attaches a classic BPF program to the group (SO_ATTACH_REUSEPORT_CBPF) that picks socket
`hash(source address) % workers`. Every connection from one client address (or IPv6 prefix)
therefore reaches the same worker, which makes per-address limits exact without shared memory.
The program reads the source address from the IP header at SKF_NET_OFF (the kernel runs it with
the packet positioned after the TCP header). `steer_index` is the same hash in Python, for tests.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket

from blindfold.config.common import parse_hostport

SO_ATTACH_REUSEPORT_CBPF = 51
SKF_NET_OFF = -0x100000

# classic BPF opcodes (linux/filter.h)
BPF_LD_W_ABS = 0x00 | 0x00 | 0x20
BPF_ALU_XOR_X = 0x04 | 0xA0 | 0x08
BPF_ALU_MUL_K = 0x04 | 0x20 | 0x00
BPF_ALU_RSH_K = 0x04 | 0x70 | 0x00
BPF_ALU_MOD_K = 0x04 | 0x90 | 0x00
BPF_ALU_AND_K = 0x04 | 0x50 | 0x00
BPF_MISC_TAX = 0x07 | 0x00
BPF_MISC_TXA = 0x07 | 0x80
BPF_ST = 0x02
BPF_LDX_MEM = 0x01 | 0x60
BPF_RET_A = 0x06 | 0x10

_MIX1 = 0x85EBCA6B
_MIX2 = 0xC2B2AE35
_M32 = 0xFFFFFFFF


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def _fmix(h: int) -> int:
    # murmur3's 32-bit finaliser, as the BPF program computes it
    h ^= h >> 16
    h = (h * _MIX1) & _M32
    h ^= h >> 13
    h = (h * _MIX2) & _M32
    h ^= h >> 16
    return h


def steer_index(address: str, workers: int, ipv6_prefix_len: int = 64) -> int:
    """Which worker the BPF program sends `address` to (mirror of `_program`)."""
    ip = ipaddress.ip_address(address)
    if ip.version == 4:
        word = int(ip)
    else:
        value = int(ip)
        word = (value >> 96) ^ (value >> 64 & _v6_second_word_mask(ipv6_prefix_len))
    return _fmix(word) % workers


def _v6_second_word_mask(prefix: int) -> int:
    """Mask of address bits 32..63 that belong to the per-client prefix (32 <= prefix)."""
    bits = min(max(prefix - 32, 0), 32)
    return (_M32 << (32 - bits)) & _M32


def _program(version: int, workers: int, ipv6_prefix_len: int) -> list[tuple[int, int]]:
    mix = [
        (BPF_MISC_TAX, 0),
        (BPF_ALU_RSH_K, 16),
        (BPF_ALU_XOR_X, 0),  # h ^= h >> 16
        (BPF_ALU_MUL_K, _MIX1),
        (BPF_MISC_TAX, 0),
        (BPF_ALU_RSH_K, 13),
        (BPF_ALU_XOR_X, 0),  # h ^= h >> 13
        (BPF_ALU_MUL_K, _MIX2),
        (BPF_MISC_TAX, 0),
        (BPF_ALU_RSH_K, 16),
        (BPF_ALU_XOR_X, 0),  # h ^= h >> 16
        (BPF_ALU_MOD_K, workers),
        (BPF_RET_A, 0),
    ]
    net = SKF_NET_OFF & _M32
    if version == 4:
        return [(BPF_LD_W_ABS, net + 12), *mix]  # IPv4 source address
    # IPv6 source address starts at byte 8; hash its first 64 bits, cut to the client prefix
    # (bits past /64 never matter: a finer prefix lies inside one /64)
    return [
        (BPF_LD_W_ABS, net + 8),
        (BPF_ST, 0),
        (BPF_LD_W_ABS, net + 12),
        (BPF_ALU_AND_K, _v6_second_word_mask(ipv6_prefix_len)),
        (BPF_LDX_MEM, 0),
        (BPF_ALU_XOR_X, 0),
        *mix,
    ]


def _attach_steering(sock: socket.socket, version: int, workers: int, prefix: int) -> None:
    prog = _program(version, workers, prefix)
    arr = (_SockFilter * len(prog))(*[_SockFilter(code, 0, 0, k) for code, k in prog])
    fprog = _SockFprog(len(prog), arr)
    sock.setsockopt(
        socket.SOL_SOCKET,
        SO_ATTACH_REUSEPORT_CBPF,
        ctypes.string_at(ctypes.addressof(fprog), ctypes.sizeof(fprog)),
    )


def bind_group(
    address: str,
    workers: int,
    *,
    backlog: int = 4096,
    defer_accept_s: int = 0,
    ipv6_prefix_len: int = 64,
    kind: socket.SocketKind = socket.SOCK_STREAM,
    steer: bool = True,
    v6only: bool = True,
) -> list[socket.socket]:
    """Bind `workers` SO_REUSEPORT listening sockets on `address` ('ip:port'), steered by
    client address. With port 0 the first socket's port is reused for the others.

    `kind=SOCK_DGRAM`: UDP sockets (QUIC) with the same steering. The program hashes the
    source address only, never the port, so every datagram of a QUIC flow reaches one worker
    while the visitor keeps its address (NAT rebinding changes only the port); a visitor
    whose address changes lands on another worker, which does not know the flow and drops
    its datagrams (docs/quic.md).

    `steer=False`: no program; the kernel's own hash of the connection's addresses and ports
    spreads connections (the origin's: most come from a few edges' addresses).
    `v6only=False`: an IPv6 address such as `[::]` takes IPv4 connections too."""
    stream = kind == socket.SOCK_STREAM
    host, port = parse_hostport(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port:
        # SO_REUSEPORT would let us join another process's listeners on this port (a second
        # edge started by mistake) and split its traffic silently: a plain bind tells.
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
            probe.bind((host, port))
    socks: list[socket.socket] = []
    try:
        for _ in range(workers):
            sock = socket.socket(family, kind)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
            if stream:  # inherited on accept
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if stream and defer_accept_s > 0:
                # wake us when the ClientHello's first bytes arrive, not at the bare handshake
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, defer_accept_s)
            sock.bind((host, port))
            port = sock.getsockname()[1]
            if stream:
                sock.listen(backlog)
            sock.setblocking(False)
        if workers > 1 and steer:
            _attach_steering(
                socks[0], 4 if family == socket.AF_INET else 6, workers, ipv6_prefix_len
            )
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks
