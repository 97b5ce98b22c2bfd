"""The edge's QUIC flow table (sans-IO): which datagram belongs to which visitor flow, and what
to do with it. Time comes in as `now`; nothing here touches a socket.

A flow starts with a client Initial (RFC 9000 §17.2.2) in a datagram of at least 1200 bytes
(§14.1). Its datagrams are held (bounded) while `core.quic_initial.InitialReader` reassembles
the ClientHello; then the table reports `HelloReceived` and the caller (the edge's QUIC mode)
applies routing, lists, bans, limits and JA4 rules, and calls `accept` (the held datagrams
come back as a `Forward`) or `reject` (a short-lived tombstone drops the client's
retransmissions without decrypting them again).

Keys: the client's original Destination Connection ID, then every Source Connection ID the
origin announces in its long-header packets (Initial, Handshake; a Retry's too), which the
client uses as Destination Connection ID from then on, in long and short headers. Short
headers do not carry the ID's length: the table tries the lengths of the IDs it has learnt.

Paths and migration: each client address a flow is seen from is a `Path`; the caller gives
each path its own upstream socket, so the origin sees a change of visitor address as a change
of peer address and runs QUIC's own path validation (RFC 9000 §8.2, §9) through the edge: a
spoofed source address never gets more than the origin's 3x anti-amplification budget, and
only a client that receives at the new address can validate it. What survives: NAT rebinding
and any address change where the client keeps a Destination Connection ID the edge has seen
(the origin's handshake IDs). What does not: a client moving to a connection ID issued in a
NEW_CONNECTION_ID frame (encrypted, so the edge never learns it): such datagrams are dropped
as `unknown_connection` (blindfold's origin therefore issues no spare IDs to flows from an
edge, so clients keep the ID the edge knows; docs/quic.md).
QUIC's preferred_address (RFC 9000 §9.6) is not supported either.

Address validation (RFC 9000 §8.1): an accepted flow is forwarded, but its client has not
shown it receives at its source address (a forged source never does). Such a flow is
`unvalidated`: it sits in a pool bounded like the pending flows (`max_pending` in total,
`max_pending_per_address`) and ends (`unvalidated`) after `validation_timeout_s`. It becomes
validated when its client sends a Handshake packet to a connection ID the origin chose: the
origin put that ID in its Initial, sent to the client's address only, so the client got it
there. The caller takes its shared resources (the guards' connection slot) only then
(`Forward.validated`).

The edge itself sends only Version Negotiation packets (RFC 9000 §6, §17.2.1): in answer to a
datagram of at least 1200 bytes naming a version it does not read, never to a Version
Negotiation packet, never larger than what it answers, and within a global rate.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from blindfold.core.quic_initial import (
    HANDSHAKE,
    INITIAL,
    MIN_CLIENT_DCID,
    MIN_INITIAL_DATAGRAM,
    RETRY,
    SUPPORTED_VERSIONS,
    InitialReader,
    LongHeader,
    QuicHello,
    parse_datagram,
)
from blindfold.core.ratelimit import TokenBucket
from blindfold.errors import ProtocolError

Address = tuple[str, int]

PENDING = "pending"  # ClientHello not complete yet
DECIDING = "deciding"  # HelloReceived reported; waiting for accept() or reject()
OPEN = "open"
REJECTED = "rejected"  # a tombstone until hello_timeout_s: retransmissions dropped cheaply
CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class FlowLimits:
    max_flows: int = 100_000  # flows of every state, tombstones included
    max_pending: int = 10_000  # flows whose ClientHello is not complete or not decided
    max_pending_per_address: int = 8  # by client IP
    hello_timeout_s: float = 5.0  # from the first Initial to a decided ClientHello
    # from accept to the client's address validated (None: only idle_timeout_s ends it)
    validation_timeout_s: float | None = None
    idle_timeout_s: float = 60.0  # keep above the origin's QUIC idle timeout
    max_held_bytes: int = 16384  # datagrams held per flow while its hello is read
    max_datagram_bytes: int = 1500  # anything larger from a client is dropped
    max_paths: int = 4  # client addresses per flow (NAT rebinding, migration)
    # new client addresses per flow: a token bucket (NAT rebinding is rare; a client that
    # replays its own datagrams from ever new ports makes the edge open and announce a
    # socket each time, churning the origin's bindings: attack review atk4)
    new_paths_per_s: float = 0.5
    new_paths_burst: int = 4
    max_cids: int = 8  # origin connection IDs learnt per flow
    max_hello_bytes: int = 16384
    max_crypto_ranges: int = 64
    max_initial_packets: int = 32
    versions: tuple[int, ...] = SUPPORTED_VERSIONS
    vn_rate_per_s: float = 50.0  # Version Negotiation packets, all addresses together
    vn_burst: int = 50


@dataclass(eq=False, slots=True)
class Path:
    """One client address of a flow. `handle` is the caller's (its upstream socket)."""

    flow: Flow
    client: Address
    created: float
    last_seen: float
    confirmed: bool = False  # the origin has answered on this path
    handle: Any = None


@dataclass(eq=False, slots=True)
class Flow:
    id: int
    version: int  # the client's first
    odcid: bytes  # the client's original Destination Connection ID
    created: float
    last_seen: float
    client_ip: str = ""  # the address the flow began from (per-address pending counts)
    state: str = PENDING
    reader: InitialReader | None = None
    hello: QuicHello | None = None
    paths: dict[Address, Path] = field(default_factory=dict)
    cids: list[bytes] = field(default_factory=list)  # keys of this flow in the table
    held: list[bytes] = field(default_factory=list)
    held_bytes: int = 0
    datagrams_in: int = 0
    bytes_in: int = 0
    datagrams_out: int = 0
    bytes_out: int = 0
    dropped: int = 0
    reject_reason: str = ""
    initials_done: bool = False  # the client sent a Handshake packet: no more Initials
    validated: bool = False  # the client proved its address (RFC 9000 §8.1): see the module
    path_tokens: float = -1.0  # new paths it may still open (FlowLimits.new_paths_*); -1: full
    path_stamp: float = 0.0
    accepted: float = 0.0
    negotiated: int = 0  # a compatible version the origin switched to (RFC 9368)
    route: Any = None  # the caller's routing decision, kept for its logs

    @property
    def client(self) -> Address:
        """The address the flow was first seen from."""
        return next(iter(self.paths))

    def log_fields(self) -> dict[str, Any]:
        """What the edge's one JSON line per flow carries."""
        h = self.hello
        return {
            "flow": self.id,
            "client": self.client_ip,
            "version": f"0x{self.version:08x}",
            "sni": h.sni if h else None,
            "alpn": list(h.hello.alpn_text) if h else [],
            "ja4": h.ja4 if h else None,
            "datagrams_in": self.datagrams_in,
            "bytes_in": self.bytes_in,
            "datagrams_out": self.datagrams_out,
            "bytes_out": self.bytes_out,
            "dropped": self.dropped,
            "paths": len(self.paths),
        }


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Forward:
    """Command: send `datagrams` to the origin on `path`. `new_path`: the path is new (open
    its upstream socket; check the guards for `path.client` first, and `drop_path` it if they
    refuse). `announce`: send the visitor announcement first (the origin has not answered on
    this path yet). `evicted`: a path this one replaced (close its socket). `validated`: this
    datagram proves the client's address (the flow left the unvalidated pool): take the
    flow's shared resources now, or `refuse` it before forwarding."""

    path: Path
    datagrams: tuple[bytes, ...]
    new_path: bool = False
    announce: bool = False
    evicted: Path | None = None
    validated: bool = False


@dataclass(frozen=True, slots=True)
class HelloReceived:
    """Event: the flow's ClientHello is complete; call `accept` or `reject`."""

    flow: Flow
    hello: QuicHello


@dataclass(frozen=True, slots=True)
class Held:
    """Event: the datagram is held until the flow's ClientHello is complete."""

    flow: Flow


@dataclass(frozen=True, slots=True)
class Dropped:
    """Event: the datagram is dropped; `reason` is the metric label."""

    reason: str
    flow: Flow | None = None


@dataclass(frozen=True, slots=True)
class SendToClient:
    """Command: send `datagram` to `address` from the listening socket."""

    address: Address
    datagram: bytes


@dataclass(frozen=True, slots=True)
class FlowEnded:
    """Event: the flow is gone (`reason`: idle, hello_timeout, rejected, ...); close its
    paths' sockets and write its log line."""

    flow: Flow
    reason: str


ClientResult = Forward | HelloReceived | Held | Dropped | SendToClient


def version_negotiation(
    received: LongHeader, versions: tuple[int, ...], unused: int, *, grease: bool = True
) -> bytes:
    """A Version Negotiation packet answering `received` (RFC 9000 §17.2.1): its DCID is the
    client's SCID and its SCID the client's DCID; the 7 unused bits are `unused`, with 0x40
    set so it looks like it has a fixed bit (§17.2.1, RFC 7983 multiplexing). With `grease`, a
    reserved version 0x?a?a?a?a (RFC 9000 §15) is listed too, so clients keep ignoring
    versions they do not know."""
    listed = list(versions)
    if grease:
        nibble = (unused >> 4) & 0x0F
        listed.append(int.from_bytes(bytes([(nibble << 4) | 0x0A] * 4), "big"))
    return (
        bytes([0x80 | 0x40 | (unused & 0x3F)])
        + b"\x00\x00\x00\x00"
        + bytes([len(received.scid)])
        + received.scid
        + bytes([len(received.dcid)])
        + received.dcid
        + b"".join(v.to_bytes(4, "big") for v in listed)
    )


class QuicFlowTable:
    def __init__(
        self,
        limits: FlowLimits | None = None,
        now: float = 0.0,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.limits = limits or FlowLimits()
        self.random = random
        self._by_cid: dict[bytes, Flow] = {}
        self._cid_lengths: dict[int, int] = {}  # length -> how many learnt IDs have it
        self._pending: OrderedDict[int, Flow] = OrderedDict()  # by creation
        self._open: OrderedDict[int, Flow] = OrderedDict()  # least recently used first
        self._pending_by_ip: dict[str, int] = {}
        self._unvalidated: OrderedDict[int, Flow] = OrderedDict()  # by accept; also in _open
        self._unvalidated_by_ip: dict[str, int] = {}
        self._next_id = 1
        self._vn = TokenBucket(self.limits.vn_rate_per_s, self.limits.vn_burst, now)
        self.stats: dict[str, int] = {}  # "drop:<reason>", "flows:<result>", "vn_sent"

    def __len__(self) -> int:
        return len(self._pending) + len(self._open)

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def unvalidated(self) -> int:
        return len(self._unvalidated)

    def flows(self) -> Iterator[Flow]:
        yield from list(self._pending.values())
        yield from list(self._open.values())

    def _count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    def _drop(self, reason: str, flow: Flow | None = None) -> Dropped:
        self._count(f"drop:{reason}")
        if flow is not None:
            flow.dropped += 1
        return Dropped(reason, flow)

    # ------------------------------------------------------------------ client side
    def from_client(self, data: bytes, client: Address, now: float) -> ClientResult:
        """A datagram from a visitor to the listening socket."""
        lim = self.limits
        if len(data) > lim.max_datagram_bytes:
            return self._drop("oversized")
        try:
            dgram = parse_datagram(data)
        except ProtocolError as exc:
            return self._drop(exc.reason)
        flow = None
        if dgram.packets:
            first = dgram.packets[0]
            flow = self._by_cid.get(first.dcid)
        else:
            for length in self._cid_lengths:
                flow = self._by_cid.get(data[1 : 1 + length])
                if flow is not None:
                    break
            if flow is None:
                return self._drop("unknown_connection")
        if flow is not None:
            return self._known(flow, data, dgram.packets, client, now)
        return self._new(data, dgram.packets[0], dgram.packets, client, now)

    def _new(
        self,
        data: bytes,
        first: LongHeader,
        packets: tuple[LongHeader, ...],
        client: Address,
        now: float,
    ) -> ClientResult:
        lim = self.limits
        if first.kind is None or first.version not in lim.versions:
            if first.version == 0:
                return self._drop("version_negotiation")  # RFC 9000 §6.1: never answered
            if len(data) < MIN_INITIAL_DATAGRAM:
                return self._drop("unsupported_version")  # RFC 9000 §5.2.2: too small
            if not self._vn.allow(now):
                return self._drop("vn_rate")
            vn = version_negotiation(first, lim.versions, self.random(1)[0])
            if len(vn) > len(data):  # never more than received to an unvalidated address
                return self._drop("vn_too_large")
            self._count("vn_sent")
            return SendToClient(client, vn)
        if first.kind != INITIAL:
            return self._drop("unknown_connection")
        if len(data) < MIN_INITIAL_DATAGRAM:
            return self._drop("initial_too_small")  # RFC 9000 §14.1
        if len(first.dcid) < MIN_CLIENT_DCID:
            return self._drop("dcid_too_short")  # RFC 9000 §7.2
        if len(self) >= lim.max_flows or len(self._pending) >= lim.max_pending:
            return self._drop("table_full")
        ip = client[0]
        if self._pending_by_ip.get(ip, 0) >= lim.max_pending_per_address:
            return self._drop("pending_per_address")
        reader = InitialReader(
            first.version,
            first.dcid,
            max_hello_bytes=lim.max_hello_bytes,
            max_ranges=lim.max_crypto_ranges,
            max_packets=lim.max_initial_packets,
        )
        found = None
        try:
            for p in packets:
                if p.kind == INITIAL:
                    found = reader.feed(data, p) or found
        except ProtocolError as exc:
            return self._drop(exc.reason)  # nothing kept for a flow that never began
        flow = Flow(self._next_id, first.version, first.dcid, now, now, ip, reader=reader)
        self._next_id += 1
        flow.paths[client] = Path(flow, client, now, now)
        self._index(flow, first.dcid)
        self._pending[flow.id] = flow
        self._pending_by_ip[ip] = self._pending_by_ip.get(ip, 0) + 1
        flow.datagrams_in = 1
        flow.bytes_in = len(data)
        flow.held.append(data)
        flow.held_bytes = len(data)
        self._count("flows:new")
        if found is not None:
            full = self._pool_full(flow)
            if full is not None:
                self.reject(flow, full, now)
                return Dropped(full, flow)
            flow.state = DECIDING
            flow.hello = found
            return HelloReceived(flow, found)
        return Held(flow)

    def _known(
        self,
        flow: Flow,
        data: bytes,
        packets: tuple[LongHeader, ...],
        client: Address,
        now: float,
    ) -> ClientResult:
        if flow.state == REJECTED:
            return self._drop(f"rejected:{flow.reject_reason}", flow)
        path = flow.paths.get(client)
        new_path = path is None
        evicted = None
        if path is None:
            if flow.state != OPEN:
                return self._drop("address_changed_during_hello", flow)
            limits = self.limits
            burst = float(limits.new_paths_burst)
            tokens = burst if flow.path_tokens < 0 else flow.path_tokens
            tokens = min(burst, tokens + (now - flow.path_stamp) * limits.new_paths_per_s)
            flow.path_stamp = now
            if tokens < 1.0:
                flow.path_tokens = tokens
                return self._drop("new_path_rate", flow)
            flow.path_tokens = tokens - 1.0
            if len(flow.paths) >= self.limits.max_paths:
                oldest = min(flow.paths.values(), key=lambda p: p.last_seen)
                evicted = flow.paths.pop(oldest.client)
            path = flow.paths[client] = Path(flow, client, now, now)
        # every client Initial is read, also once the flow is open: its CRYPTO bytes must
        # repeat what the edge decided on (RFC 9000 §19.6 retransmissions)
        found = None
        reader = flow.reader
        if flow.initials_done and any(p.kind == INITIAL for p in packets):
            if new_path:
                flow.paths.pop(client, None)
                if evicted is not None:
                    flow.paths[evicted.client] = evicted
            return self._drop("initial_after_handshake", flow)
        if reader is not None:
            try:
                for p in packets:
                    if p.kind != INITIAL:
                        continue
                    try:
                        found = reader.feed(data, p) or found
                    except ProtocolError as exc:
                        if exc.reason != "undecryptable" or flow.state != OPEN:
                            raise
                        # The origin derives the same public keys: it cannot read this packet
                        # either and drops it, so no CRYPTO byte of it can differ from what the
                        # edge decided on. The datagram may carry Handshake and 1-RTT packets
                        # after it (aioquic's client labels Initials v2 but keeps v1 keys
                        # after a compatible version change): those must go through.
                        self._count("initial_undecryptable")
            except ProtocolError as exc:
                if new_path:
                    flow.paths.pop(client, None)
                    if evicted is not None:
                        flow.paths[evicted.client] = evicted
                return self._drop(exc.reason, flow)
        if flow.state == OPEN and any(p.kind == HANDSHAKE for p in packets):
            # RFC 9001 §4.9.1: a client discards its Initial keys when it first sends a
            # Handshake packet (Initials coalesced before it in that datagram still count);
            # the reader and its buffers can go
            flow.reader = None
            flow.initials_done = True
        # RFC 9000 §8.1: the client got the origin's Initial at its address if it sends a
        # Handshake packet to the connection ID the origin chose there (never the client's own
        # first ID, which a forger knows); the edge cannot open the packet, the ID is the
        # proof it can check
        validated = (
            flow.state == OPEN
            and not flow.validated
            and any(
                p.kind == HANDSHAKE and p.dcid != flow.odcid and p.dcid in flow.cids
                for p in packets
            )
        )
        if validated:
            flow.validated = True
            self._leave_pool(flow)
            self._count("flows:validated")
        flow.datagrams_in += 1
        flow.bytes_in += len(data)
        flow.last_seen = path.last_seen = now
        if flow.state == OPEN:
            self._open.move_to_end(flow.id)
            return Forward(path, (data,), new_path, not path.confirmed, evicted, validated)
        if flow.held_bytes + len(data) > self.limits.max_held_bytes:
            return self._drop("held_full", flow)
        flow.held.append(data)
        flow.held_bytes += len(data)
        if found is not None and flow.state == PENDING:
            full = self._pool_full(flow)
            if full is not None:
                self.reject(flow, full, now)
                return Dropped(full, flow)
            flow.state = DECIDING
            flow.hello = found
            return HelloReceived(flow, found)
        return Held(flow)

    def _pool_full(self, flow: Flow) -> str | None:
        """Whether an accepted flow would find no room in the unvalidated pool (checked
        before the hello is reported, so accept() always has room)."""
        if len(self._unvalidated) >= self.limits.max_pending:
            return "unvalidated_full"
        if self._unvalidated_by_ip.get(flow.client_ip, 0) >= self.limits.max_pending_per_address:
            return "unvalidated_per_address"
        return None

    def accept(self, flow: Flow, now: float, route: Any = None) -> Forward:
        """The caller's checks let the flow through: its held datagrams, in arrival order.
        The flow is unvalidated until its client proves its address (`Forward.validated`)."""
        if flow.state != DECIDING:
            raise ValueError(f"flow {flow.id} is {flow.state}, not deciding")
        self._unpend(flow)
        flow.state = OPEN
        flow.route = route
        flow.last_seen = flow.accepted = now
        self._open[flow.id] = flow
        self._unvalidated[flow.id] = flow
        ip = flow.client_ip
        self._unvalidated_by_ip[ip] = self._unvalidated_by_ip.get(ip, 0) + 1
        held, flow.held, flow.held_bytes = tuple(flow.held), [], 0
        self._count("flows:accepted")
        path = next(iter(flow.paths.values()))
        return Forward(path, held, new_path=True, announce=True)

    def reject(self, flow: Flow, reason: str, now: float) -> FlowEnded:
        """The caller's guards refused the flow (`reason`: unknown_sni, banned, ja4, ...).
        Its retransmissions are dropped as `rejected:<reason>` until hello_timeout_s."""
        if flow.state not in (PENDING, DECIDING):
            raise ValueError(f"flow {flow.id} is {flow.state}")
        flow.state = REJECTED
        flow.reject_reason = reason
        flow.held, flow.held_bytes, flow.reader = [], 0, None
        self._count(f"flows:rejected:{reason}")
        self._drop(reason, flow)
        return FlowEnded(flow, f"rejected:{reason}")

    def refuse(self, flow: Flow, reason: str) -> FlowEnded:
        """The caller's guards refused a flow that just proved its address (no slot left,
        per-address limits): it ends, counted as `rejected:<reason>`; nothing more of it is
        forwarded (its later datagrams are `unknown_connection`)."""
        if flow.state != OPEN:
            raise ValueError(f"flow {flow.id} is {flow.state}")
        flow.state = REJECTED
        flow.reject_reason = reason
        self._count(f"flows:rejected:{reason}")
        self._drop(reason, flow)
        self.end(flow, reason)
        return FlowEnded(flow, f"rejected:{reason}")

    def drop_path(self, path: Path) -> None:
        """The guards refused a new path's address: forget it (the flow stays)."""
        path.flow.paths.pop(path.client, None)
        if not path.flow.paths:
            self.end(path.flow, "no_path")

    # ------------------------------------------------------------------ origin side
    def from_origin(self, path: Path, data: bytes, now: float) -> SendToClient | Dropped:
        """A datagram from the origin on `path`'s upstream socket."""
        flow = path.flow
        if flow.state != OPEN or flow.paths.get(path.client) is not path:
            return self._drop("origin_after_close", flow)
        path.confirmed = True
        if data and data[0] & 0x80:
            try:
                packets = parse_datagram(data).packets
            except ProtocolError:
                packets = ()
            for p in packets:
                if p.kind not in (INITIAL, HANDSHAKE, RETRY):
                    continue
                if p.version != flow.version and p.version in self.limits.versions:
                    # RFC 9368 §2.3: the origin chose a compatible version (v1 <-> v2); the
                    # client's next Initials use its keys
                    flow.negotiated = p.version
                    if flow.reader is not None:
                        flow.reader.negotiated(p.version)
                if p.version in (flow.version, flow.negotiated):
                    self._learn(flow, p.scid)
                    if p.kind == RETRY and flow.reader is not None:
                        flow.reader.retried(p.scid)  # RFC 9001 §5.2: new Initial keys
        flow.datagrams_out += 1
        flow.bytes_out += len(data)
        flow.last_seen = path.last_seen = now
        self._open.move_to_end(flow.id)
        return SendToClient(path.client, data)

    def _learn(self, flow: Flow, cid: bytes) -> None:
        if not cid or cid in flow.cids or len(flow.cids) >= self.limits.max_cids:
            return
        other = self._by_cid.get(cid)
        if other is not None and other is not flow:
            self._count("cid_collision")
            return
        self._index(flow, cid)

    def _index(self, flow: Flow, cid: bytes) -> None:
        flow.cids.append(cid)
        self._by_cid[cid] = flow
        if cid != flow.odcid:
            self._cid_lengths[len(cid)] = self._cid_lengths.get(len(cid), 0) + 1

    # ------------------------------------------------------------------ ending
    def _unpend(self, flow: Flow) -> None:
        if self._pending.pop(flow.id, None) is not None:
            ip = flow.client_ip
            left = self._pending_by_ip.get(ip, 1) - 1
            if left > 0:
                self._pending_by_ip[ip] = left
            else:
                self._pending_by_ip.pop(ip, None)

    def _leave_pool(self, flow: Flow) -> None:
        if self._unvalidated.pop(flow.id, None) is not None:
            ip = flow.client_ip
            left = self._unvalidated_by_ip.get(ip, 1) - 1
            if left > 0:
                self._unvalidated_by_ip[ip] = left
            else:
                self._unvalidated_by_ip.pop(ip, None)

    def end(self, flow: Flow, reason: str) -> FlowEnded:
        """Remove a flow (a ban arrived for its address, shutdown, ...)."""
        self._unpend(flow)
        self._leave_pool(flow)
        self._open.pop(flow.id, None)
        for cid in flow.cids:
            if self._by_cid.get(cid) is flow:
                del self._by_cid[cid]
                if cid != flow.odcid:
                    n = self._cid_lengths.get(len(cid), 1) - 1
                    if n > 0:
                        self._cid_lengths[len(cid)] = n
                    else:
                        self._cid_lengths.pop(len(cid), None)
        flow.cids = []
        if flow.state != REJECTED:
            self._count(f"flows:ended:{reason}")
        if flow.state != REJECTED:
            flow.state = CLOSED
        return FlowEnded(flow, reason)

    def expire(self, now: float) -> list[FlowEnded]:
        """Flows whose hello did not complete in time and idle flows (call about once a
        second). Tombstones of rejected flows go silently (they were reported at reject)."""
        lim = self.limits
        ended = []
        while self._pending:
            flow = next(iter(self._pending.values()))
            if flow.created + lim.hello_timeout_s > now:
                break
            was_rejected = flow.state == REJECTED
            gone = self.end(flow, "hello_timeout")
            if not was_rejected:
                ended.append(gone)
        if lim.validation_timeout_s is not None:
            while self._unvalidated:
                flow = next(iter(self._unvalidated.values()))
                if flow.accepted + lim.validation_timeout_s > now:
                    break
                ended.append(self.end(flow, "unvalidated"))
        while self._open:
            flow = next(iter(self._open.values()))
            if flow.last_seen + lim.idle_timeout_s > now:
                break
            ended.append(self.end(flow, "idle"))
        return ended
