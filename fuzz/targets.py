"""Fuzz targets: one function per parser that reads bytes from the network or from a file a
user edits. Each takes the fuzzer's bytes and must either return or raise one of the errors its
parser documents (STYLE §4: ProtocolError for peer data, ConfigError for the config,
VerificationError where a signature or a seal is checked). Anything else escaping is a bug:
`check()` lets it through, and the fuzzer (fuzz/fuzz.py, atheris) records the input.

Targets do not import atheris, so tests/unit/test_fuzz_targets.py runs every seed of
fuzz/corpus/ and every recorded crash through them without it.

Where random bytes would never get past a MAC or a signature (TLS records, RFC 8188 records, the
signed manifest), a target reads a mode byte and can also seal the fuzzer's bytes with a key it
holds, so the code behind the check (padding, delimiters, inner types, the payload's shape) is
fuzzed too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from blindfold.errors import ConfigError, ProtocolError, VerificationError

NOW = 1_800_000_000.0
HOST = "example.test"


@dataclass(frozen=True)
class Target:
    run: Callable[[bytes], None]
    allowed: tuple[type[Exception], ...]
    about: str


def _chunks(data: bytes) -> list[bytes]:
    """Split at 0xFF 0x00 0xFF (a marker the fuzzer learns) so one input can be several
    reads; the reads are then fed one by one (any chunking must parse the same)."""
    return data.split(b"\xff\x00\xff")


# --------------------------------------------------------------------------- ClientHello
def clienthello(data: bytes) -> None:
    from blindfold.core.clienthello import peek_client_hello

    whole = b"".join(_chunks(data))
    hello = peek_client_hello(whole, 65536)
    if hello is None:
        return
    # what the edge does with a parsed hello: route by SNI, ALPN, JA4, key shares
    assert isinstance(hello.alpn_text, tuple) and isinstance(hello.max_version, int)
    assert isinstance(hello.supported_groups, tuple) and isinstance(hello.key_share_groups, tuple)
    assert len(hello.ja4) == 36, hello.ja4
    # the same bytes fed as a growing buffer give the same hello (or need more bytes)
    buf = b""
    for part in _chunks(data)[:-1]:
        buf += part
        try:
            early = peek_client_hello(buf, 65536)
        except ProtocolError as exc:
            raise AssertionError(f"a prefix of a good hello was refused: {exc}") from None
        if early is not None:
            assert early == hello
            return


# --------------------------------------------------------------------------- PROXY v1/v2
def proxyproto(data: bytes) -> None:
    from blindfold.core.proxyproto import parse_proxy_header

    parsed = parse_proxy_header(data, 4096)
    if parsed is None:
        return
    header, used = parsed
    assert 0 < used <= len(data)
    header.tlv(0x01)
    # a prefix that ends before the header does either waits or fails, never parses
    if used > 1:
        try:
            assert parse_proxy_header(data[: used - 1], 4096) is None
        except ProtocolError:
            pass


# --------------------------------------------------------------------------- key-server wire
def keyless_wire(data: bytes) -> None:
    from blindfold.core import keyless_wire as w

    decoder = w.FrameDecoder()
    for part in _chunks(data):
        for frame in decoder.feed(part):
            if frame.type == w.SIGN_REQUEST:
                w.decode_sign_request(frame.body)
            elif frame.type == w.SIGN_RESPONSE:
                w.decode_sign_response(frame.body)
            elif frame.type == w.ERROR:
                w.decode_error(frame.body)


# --------------------------------------------------------------------------- key-server checks
def keyless_handshake(data: bytes) -> None:
    """What the key server does with a sign request's messages: parse ClientHello ..
    Certificate, hash them, authorise (SNI, certificate, scheme), check replays."""
    from blindfold.core import keyless_handshake as kh

    if len(data) < 2:
        return
    scheme = int.from_bytes(data[:2], "big")
    hs = kh.parse_handshake(data[2:])
    assert len(hs.client_random) == 32 and len(hs.transcript_hash) in (32, 48)
    assert hs.sni and hs.cipher_suite in kh.SUITE_HASHES
    _identity, key, _cafile = _server_site()
    leaf = {hs.certificate_sha256: key}  # any leaf: reach the name and scheme checks too
    kh.authorise(hs, scheme, lambda name: name == HOST, leaf, {})
    guard = kh.ReplayGuard(60.0, 4)
    assert guard.check(hs, "edge1", NOW) is False
    guard.remember(hs, "edge1", NOW)
    assert guard.check(hs, "edge1", NOW) is True  # the identical request: a retry


# --------------------------------------------------------------------------- TLS 1.3 records
SUITES = (0x1301, 0x1302, 0x1303)


def tls13_record(data: bytes) -> None:
    """Mode 0: raw bytes into the record reader and the AEAD. Mode 1: the fuzzer's chunks are
    the inner plaintexts (content, content type, padding: §5.2 TLSInnerPlaintext), sealed with
    the reader's key, so what follows a good tag is fuzzed."""
    from blindfold.core import tls13_record as rl

    if not data:
        return
    mode, suite, rest = data[0] & 1, SUITES[data[0] % 3], data[1:]
    reader = rl.RecordReader()
    opener = rl.RecordProtection(suite, bytes(48 if suite == 0x1302 else 32))
    if mode == 0:
        for part in _chunks(rest):
            for record in reader.feed(part):
                opener.open(record)
        return
    sealer = rl.RecordProtection(suite, opener.secret)
    wire = b""
    for inner in _chunks(rest):
        inner = inner[: rl.MAX_PLAINTEXT + 256]
        header = rl.HEADER.pack(rl.APPLICATION_DATA, 0x0303, len(inner) + rl.TAG_LEN)
        nonce = (int.from_bytes(sealer._iv, "big") ^ sealer.seq).to_bytes(12, "big")
        wire += header + sealer._aead.encrypt(nonce, inner, header)  # raw inner: not seal()
        sealer.seq += 1
    for record in reader.feed(wire):
        opener.open(record)


# --------------------------------------------------------------------------- TLS 1.3 server
@cache
def _server_site() -> tuple[Any, Any, str]:
    from blindfold import pki
    from blindfold.core import tls13_server as ts
    from blindfold.core.routing import SniRouter
    from blindfold.keyserver.signer import SiteKey, schemes_for

    ca = pki.make_ca("blindfold fuzz CA")
    leaf = pki.issue(ca, [HOST])
    key = SiteKey("ec256", leaf.key, bytes(32), SniRouter([(HOST, True)]), schemes_for(leaf.key))
    import tempfile

    cafile = tempfile.NamedTemporaryFile("wb", suffix=".pem", delete=False)  # noqa: SIM115
    cafile.write(ca.cert_pem())
    cafile.close()
    return ts.ServerIdentity.from_pem(leaf.cert_pem()), key, cafile.name


def _drive(server: Any, data: bytes, key: Any) -> list[Any]:
    """Feed the server; answer its signature requests as the key server would."""
    from blindfold.core import tls13_server as ts
    from blindfold.keyserver.signer import sign_certificate_verify

    events = server.receive(data, NOW)
    while events and isinstance(events[-1], ts.SignatureRequested):
        request = events.pop()
        sig = sign_certificate_verify(key, request.scheme, request.transcript_hash)
        events += server.signature_received(sig, NOW)
    return list(events)


def tls13_server(data: bytes) -> None:
    """Mode 0: the fuzzer's bytes are what a visitor sends from the first byte (ClientHello,
    then anything). Mode 1: a real handshake with Python's ssl first, then each chunk is one
    record the client sends (first byte: inner content type), protected with the client's
    key as the server holds it: KeyUpdate, alerts, post-handshake messages, data."""
    from blindfold.core import tls13_record as rl
    from blindfold.core import tls13_server as ts

    if not data:
        return
    identity, key, cafile = _server_site()
    server = ts.TlsServer(identity, ts.TlsSettings(), ts.SessionStore(60, 10), HOST)
    if data[0] & 1 == 0:
        for part in _chunks(data[1:]):
            _drive(server, part, key)
            server.data_to_send()
        return
    ctx = ssl.create_default_context(cafile=cafile)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(inc, out, server_hostname=HOST)
    for _ in range(6):
        try:
            client.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        _drive(server, out.read(), key)
        inc.write(server.data_to_send())
        if done and server.state == "open":
            break
    assert server.state == "open", server.reason
    read = server._read  # the client's write key, as the server holds it (harness only)
    assert read is not None
    sealer = rl.RecordProtection(read.cipher_suite, read.secret)
    sealer.seq = read.seq
    for part in _chunks(data[1:]):
        if not part:
            continue
        inner = part[1:] + bytes((part[0],))
        header = rl.HEADER.pack(rl.APPLICATION_DATA, 0x0303, len(inner) + rl.TAG_LEN)
        nonce = (int.from_bytes(sealer._iv, "big") ^ sealer.seq).to_bytes(12, "big")
        record = header + sealer._aead.encrypt(nonce, inner, header)
        sealer.seq += 1
        _drive(server, record, key)
        server.data_to_send()
        if server.state == "closed":
            return
        if server._read is not None and server._read is not read:  # KeyUpdate: follow it
            read = server._read
            sealer = rl.RecordProtection(read.cipher_suite, read.secret)
            sealer.seq = read.seq


# --------------------------------------------------------------------------- RFC 8188
ECE_KEY = bytes(range(16))


def ece(data: bytes) -> None:
    """Mode 0: raw bytes into the streaming opener. Mode 1: the fuzzer writes the records'
    plaintext (content, delimiter, padding: RFC 8188 §2) and we encrypt them, so what the
    opener does after a good tag is fuzzed."""
    from blindfold.core import ece as e

    if not data:
        return
    mode, rest = data[0] & 1, data[1:]
    if mode == 0:
        opener = e.Opener(ECE_KEY, max_rs=1 << 16)
        for part in _chunks(rest):
            opener.feed(part)
        opener.finish()
        e.open_all(rest, ECE_KEY, max_rs=1 << 16)
        return
    if len(rest) < 2:
        return
    rs = max(e.MIN_RS, int.from_bytes(rest[:2], "big") % 512)
    salt = bytes(16)
    aead, base = e._derive(ECE_KEY, salt)
    blob = salt + struct.pack("!IB", rs, 0)
    records = _chunks(rest[2:])
    for seq, plain in enumerate(records):
        blob += aead.encrypt(e._nonce(base, seq), plain[: rs - e.TAG_BYTES], None)
    opener = e.Opener(ECE_KEY, max_rs=1 << 16)
    for i in range(0, len(blob), 97):
        opener.feed(blob[i : i + 97])
    opener.finish()


# --------------------------------------------------------------------------- the manifest
@cache
def _manifest_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def manifest(data: bytes) -> None:
    """Mode 0: the bytes are the manifest file. Mode 1: they are its payload, signed with the
    site's key (the service worker and `blindfold fetch` never trust the payload's shape)."""
    from blindfold.core import manifest as m

    if not data:
        return
    key = _manifest_key()
    if data[0] & 1 == 0:
        m.verify(data[1:], key.public_key(), NOW)
        return
    payload = data[1:].decode("utf-8", "replace")
    doc = {
        "format": m.FORMAT,
        "alg": "ed25519",
        "key_id": m.key_id(key.public_key()),
        "payload": payload,
        "signature": m.b64u(key.sign(payload.encode())),
    }
    m.verify(json.dumps(doc).encode(), key.public_key(), None)


# --------------------------------------------------------------------------- decisions
def decisions(data: bytes) -> None:
    """A decision stream response body, as the edge's feed reads it (ours or CrowdSec's)."""
    from blindfold.decisions.core import parse_stream
    from blindfold.decisions.feed import decode_stream

    new, _deleted, problems = parse_stream(decode_stream(data))
    for _scope, _value, duration, _reason in new:
        assert math.isfinite(duration), f"duration {duration}"
    assert len(problems) <= len(data)


def _decision_key() -> Ed25519PrivateKey:
    """A fixed key (seeds signed with it stay valid across runs): a test key, nothing else."""
    return Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def seal_decision(payload: bytes) -> bytes:
    """A `bfd1` message carrying `payload`, signed with the harness's origin key."""
    from blindfold.decisions import signed as sd

    key = _decision_key()
    signer = sd.key_id(key.public_key())
    encoded = sd._b64(payload)
    sig = key.sign(sd.PURPOSE + f"{signer}.{encoded}".encode("ascii"))
    return f"{sd.MAGIC}.{signer}.{encoded}.{sd._b64(sig)}".encode()


def redis_message(data: bytes) -> None:
    """A decision as the edge reads it from Redis (a key's value or a channel message). Mode 0:
    the bytes as they are; mode 1: the bytes are the payload, signed by the origin key the
    verifier trusts, so what follows a good signature (the decision's JSON) is fuzzed too.
    Either a decision or ProtocolError (dropped and counted by the feed)."""
    from blindfold.decisions import signed as sd

    if not data:
        return
    verifier = sd.DecisionVerifier([_decision_key().public_key()])
    message = seal_decision(data[1:]) if data[0] & 1 else data[1:]
    d = verifier.admit(message, NOW)
    assert d is not None  # a first sighting is never a repeat
    assert d.scope in ("ip", "range") and len(d.reason) <= 200
    assert math.isfinite(d.until) and d.until > NOW, f"until {d.until}"
    assert verifier.admit(message, NOW) is None  # the same message again: already held


# --------------------------------------------------------------------------- the config
def config(data: bytes) -> None:
    """A configuration file, read the way `load_file` reads it (UTF-8, then TOML, then the
    schema): loads or raises ConfigError naming the key."""
    from blindfold.config import loads

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return  # load_file refuses non-UTF-8 with ConfigError before parsing
    cfg = loads(text, "fuzz.toml")
    _check_finite(cfg, "")


def _check_finite(value: object, where: str) -> None:
    """No setting may hold NaN or an infinity (TOML allows nan and inf): a deadline or a
    rate of NaN compares false with everything and silently disables its check."""
    if isinstance(value, float):
        assert math.isfinite(value), f"{where} = {value}"
    elif isinstance(value, tuple):
        for i, item in enumerate(value):
            _check_finite(item, f"{where}[{i}]")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _check_finite(getattr(value, f.name), f"{where}.{f.name}".lstrip("."))


# --------------------------------------------------------------------------- QUIC Initials
_QUIC_DCID = bytes.fromhex("8394c8f03e515708")


def _quic_initial(frames: bytes, pn: int) -> bytes:
    """A client Initial carrying `frames`, protected with the public v1 keys (so the frame
    parser and the CRYPTO reassembly behind the AEAD are fuzzed too)."""
    from aioquic.quic.crypto import CryptoPair

    frames = frames.ljust(1100, b"\x00")[:1400]
    pair = CryptoPair()
    pair.setup_initial(cid=_QUIC_DCID, is_client=True, version=1)
    length = 2 + len(frames) + 16
    header = (
        b"\xc1\x00\x00\x00\x01\x08"
        + _QUIC_DCID
        + b"\x00\x00"
        + (0x4000 | length).to_bytes(2, "big")
        + (pn & 0xFFFF).to_bytes(2, "big")
    )
    return pair.encrypt_packet(header, frames, pn)


def quic_initial(data: bytes) -> None:
    """The edge's QUIC flow table: mode byte 0 feeds the chunks as raw client datagrams, 1 as
    the frames of valid Initial packets; then the origin answers and the flow is expired."""
    from blindfold.core.quic_flows import (
        Dropped,
        Forward,
        Held,
        HelloReceived,
        QuicFlowTable,
        SendToClient,
    )

    if not data:
        return
    mode, chunks = data[0], _chunks(data[1:])
    table = QuicFlowTable(random=lambda n: b"\x00" * n)
    for i, chunk in enumerate(chunks[:40]):
        datagram = _quic_initial(chunk, i) if mode & 1 else chunk
        source = ("203.0.113.7", 40000 + (i & 1 if mode & 2 else 0))
        result = table.from_client(datagram, source, NOW + i)
        assert isinstance(result, (Forward, HelloReceived, Held, Dropped, SendToClient))
        if isinstance(result, SendToClient):
            assert len(result.datagram) <= len(datagram)  # never amplifies
        if isinstance(result, HelloReceived):
            assert result.hello.ja4.startswith("q") and len(result.hello.ja4) == 36
            fwd = table.accept(result.flow, NOW + i)
            table.from_origin(fwd.path, chunk, NOW + i)
    table.expire(NOW + 1000)
    assert len(table) == 0


def _header_lines(block: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    for line in block.split(b"\n"):
        name, sep, value = line.partition(b":")
        if sep:
            out.append((name.strip().lower(), value.strip()))
    return out


def http_cache(data: bytes) -> None:
    """The shared cache's reading of response and request fields (Cache-Control and its
    targeted variants, HTTP-dates, Age, Vary, Connection): response lines, then SEP, request
    lines, then SEP, a later 304's lines. Nothing may escape: bad fields are ignored or make a
    response stale, never an exception."""
    from blindfold.core import httpcache as hc

    parts = [*data.split(SEP_BYTES, 2), b"", b""]
    response, request, revalidation = (_header_lines(p) for p in parts[:3])
    cache = hc.HttpCache(1 << 20, 1 << 16)
    key = cache.key(b"example.test", b"/")
    hc.http_date(parts[0][:64], NOW)
    hc.age_value(response)
    hc.response_directives(response)
    status = 200 + (len(data) % 400)
    if cache.storable(b"GET", request, status, response):
        cache.store(key, request, status, response, b"body", NOW, NOW)
    for at in (NOW, NOW + 5, NOW + 100000):
        found = cache.lookup(key, b"GET", request, at)
        if found is None:
            continue
        hc.not_modified(found.entry, request)
        cache.stale_on_error(found.entry, request, at)
        if not found.fresh:
            cache.freshen(key, found.entry, revalidation, request, at, at)
    assert cache.used >= 0


SEP_BYTES = b"\xff\x00\xff"


# --------------------------------------------------------------------------- HTTP/1.1 server
async def _serve_reads(conn: Any, transport: Any, pieces: list[bytes]) -> bytes:
    """Feed a server protocol the reads (a few loop turns after each so its tasks run), then
    EOF and the connection's end; what it wrote."""
    import asyncio

    for piece in pieces:
        conn.data_received(piece)
        for _ in range(4):
            await asyncio.sleep(0)
    conn.eof_received()
    for _ in range(8):
        await asyncio.sleep(0)
    conn.connection_lost(None)
    await asyncio.sleep(0)
    return bytes(transport.out)


class _MemoryTransport:
    """What H1Connection writes, kept; closing recorded, not performed."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.out += data

    def writelines(self, lines: list[bytes]) -> None:
        self.write(b"".join(lines))

    def close(self) -> None:
        self.closed = True

    abort = close

    def pause_reading(self) -> None:
        pass

    resume_reading = pause_reading

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def http1_server(data: bytes) -> None:
    """web.http1's H1Connection (llhttp + our checks and framing) fed the fuzzer's bytes as
    reads (SEP splits them), then EOF, with a handler that reads the body and answers. Nothing
    may escape a callback (the loop's exception handler would see it), no handler may fail, and
    what is written must be whole HTTP/1.1 responses, at most one per request plus one error."""
    import asyncio

    from blindfold.web.http1 import ConnInfo, H1Connection
    from blindfold.web.limits import HttpLimits
    from blindfold.web.messages import BodyStream, Request, Responder

    methods: list[bytes] = []
    errors: list[object] = []

    async def handler(request: Request, body: BodyStream, respond: Responder) -> None:
        methods.append(request.method)
        try:
            got = await body.read_all(1 << 16)
        except Exception:
            got = b""
        out = b"%d" % len(got)
        await respond.start(200, [(b"content-length", b"%d" % len(out))])
        await respond.send(out)
        await respond.end()

    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        limits = HttpLimits(max_header_bytes=1024, max_headers=16, max_body_bytes=4096)
        info = ConnInfo(("127.0.0.1", 1), ("127.0.0.1", 2), b"http", {})
        conn = H1Connection(
            handler, limits, info, lambda n, f: errors.append(f) if n == "handler_error" else None
        )
        transport = _MemoryTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        return await _serve_reads(conn, transport, _chunks(data))

    out = asyncio.run(main())
    assert not errors, errors
    answers = 0
    while out:
        assert out.startswith(b"HTTP/1.1 "), out[:40]
        head, sep, out = out.partition(b"\r\n\r\n")
        assert sep, head[:80]
        status = int(head[9:12])
        if status == 100:
            continue
        length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        if status == 200 and methods[answers] == b"HEAD":
            length = 0
        answers += 1
        out = out[length:]
    assert answers <= len(methods) + 1, (answers, methods)


# --------------------------------------------------------------------------- HTTP/2 server
def http2_client_view(data: bytes) -> None:
    """web.http2's H2Connection fed the fuzzer's bytes as reads (SEP splits them; seeds start
    with the client preface and SETTINGS), then EOF, with a handler that reads the body and
    answers, or streams a body past the flow-control window (`/big`). Nothing may escape a
    callback, no handler may fail; what is written must be whole frames that start with
    SETTINGS, with header blocks a client's HPACK decoder reads, and at most one final
    response per stream, on streams the client opened (odd ids)."""
    import asyncio

    import hpack

    from blindfold.web.http1 import ConnInfo
    from blindfold.web.http2 import H2Connection
    from blindfold.web.limits import HttpLimits
    from blindfold.web.messages import BodyStream, Request, Responder

    errors: list[object] = []

    class Transport(asyncio.Transport):
        def __init__(self) -> None:
            super().__init__()
            self.out = bytearray()
            self.closed = False

        def write(self, data: Any) -> None:
            assert not self.closed, "write after close"
            self.out += data

        def close(self) -> None:
            self.closed = True

        abort = close

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return default

    async def handler(request: Request, body: BodyStream, respond: Responder) -> None:
        if request.path == b"/big":
            await respond.start(200, [(b"content-length", b"100000")])
            await respond.send(b"b" * 100_000)
            await respond.end()
            return
        try:
            got = await body.read_all(1 << 16)
        except Exception:
            got = b""
        out = b"%d" % len(got)
        await respond.start(200, [(b"content-length", b"%d" % len(out))])
        await respond.send(out)
        await respond.end()

    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        limits = HttpLimits(
            max_headers=16,
            max_body_bytes=4096,
            h2_max_concurrent_streams=8,
            h2_max_header_list_size=2048,
            h2_max_streams_per_connection=16,
            h2_max_resets_per_window=8,
            h2_max_control_frames_per_window=32,
        )
        info = ConnInfo(("127.0.0.1", 1), ("127.0.0.1", 2), b"https", {})

        def on_event(name: str, fields: dict[str, Any]) -> None:
            # a response cut short by the connection's end (EOF, GOAWAY) is no handler error
            if name == "handler_error" and "ConnectionError" not in str(fields.get("error")):
                errors.append(fields)

        conn = H2Connection(handler, limits, info, on_event)
        transport = Transport()
        conn.connection_made(transport)
        return await _serve_reads(conn, transport, _chunks(data))

    out = asyncio.run(main())
    assert not errors, errors
    decoder = hpack.Decoder()
    decoder.max_header_list_size = 1 << 20
    # the client's SETTINGS_HEADER_TABLE_SIZE (up to 2**32 - 1) is the server encoder's limit
    decoder.max_allowed_table_size = 1 << 32
    finals: set[int] = set()
    pos, first, block, block_sid = 0, True, b"", 0
    while pos < len(out):
        assert len(out) - pos >= 9, "partial frame header"
        length = int.from_bytes(out[pos : pos + 3], "big")
        kind, flags = out[pos + 3], out[pos + 4]
        sid = int.from_bytes(out[pos + 5 : pos + 9], "big")
        payload = out[pos + 9 : pos + 9 + length]
        assert len(payload) == length, "partial frame"
        pos += 9 + length
        assert not first or (kind == 4 and not flags & 1), "SETTINGS first"
        first = False
        if kind in (0, 1, 9):  # DATA, HEADERS, CONTINUATION: on a stream the client opened
            assert sid % 2 == 1, sid
        if kind == 1:
            block, block_sid = payload, sid
        elif kind == 9:
            assert sid == block_sid, "CONTINUATION on another stream"
            block += payload
        if kind in (1, 9) and flags & 0x4:  # END_HEADERS
            fields = dict(decoder.decode(block, raw=True))
            status = fields.get(b":status", b"")
            assert status.isdigit(), fields
            if int(status) >= 200:
                assert block_sid not in finals, f"two responses on stream {block_sid}"
                finals.add(block_sid)


def h2_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """Whole HTTP/2 frames (RFC 9113 §4.1) and nothing else, or AssertionError."""
    out = []
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= 9, data[pos:]
        hi, lo, ftype, flags, sid = struct.unpack_from(">HBBBL", data, pos)
        n = hi << 8 | lo
        assert n <= 16384 and len(data) - pos - 9 >= n, (n, len(data) - pos)
        out.append((ftype, flags, sid, data[pos + 9 : pos + 9 + n]))
        pos += 9 + n
    return out


def http2_server(data: bytes) -> None:
    """web.http2's H2Connection on web.h2core, fed the fuzzer's bytes as reads (SEP splits
    them; the client preface is sent first unless the input starts with PRI), with a handler
    that reads the body and answers, and an `answer_now` that answers paths starting /now at
    once. Nothing may escape a callback, no handler may fail, and what is written must be whole
    frames."""
    import asyncio

    from blindfold.web.h2core import PREFACE
    from blindfold.web.http1 import ConnInfo
    from blindfold.web.http2 import H2Connection
    from blindfold.web.limits import HttpLimits
    from blindfold.web.messages import BodyStream, Request, Responder

    errors: list[object] = []

    class App:
        async def __call__(self, request: Request, body: BodyStream, respond: Responder) -> None:
            try:
                got = await body.read_all(1 << 16)
            except Exception:
                got = b""
            out = b"%d" % len(got)
            await respond.start(200, [(b"content-length", b"%d" % len(out))])
            await respond.send(out)
            await respond.end()

        def answer_now(self, request: Request, respond: Any) -> bool:
            if not request.path.startswith(b"/now") or not respond.can_answer_now:
                return False
            respond.start_now(200, [(b"content-length", b"2")])
            respond.send_now(b"ok")
            respond.end_now()
            return True

    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        limits = HttpLimits(max_headers=16, max_body_bytes=4096, h2_max_concurrent_streams=8)
        info = ConnInfo(("127.0.0.1", 1), ("127.0.0.1", 2), b"https", {})
        conn = H2Connection(
            App(), limits, info, lambda n, f: errors.append(f) if n == "handler_error" else None
        )

        class Transport(_MemoryTransport, asyncio.Transport):  # type: ignore[misc]
            def is_closing(self) -> bool:
                return self.closed

        transport = Transport()
        conn.connection_made(transport)
        pieces = _chunks(data)
        if not data.startswith(b"PRI"):
            pieces.insert(0, PREFACE)
        return await _serve_reads(conn, transport, pieces)

    out = asyncio.run(main())
    assert not errors, errors
    h2_frames(out)


TARGETS: dict[str, Target] = {
    "clienthello": Target(clienthello, (ProtocolError,), "ClientHello peek + JA4"),
    "proxyproto": Target(proxyproto, (ProtocolError,), "PROXY protocol v1/v2 header"),
    "keyless_wire": Target(keyless_wire, (ProtocolError,), "key-server frames and bodies"),
    "keyless_handshake": Target(
        keyless_handshake, (ProtocolError,), "the key server's handshake checks"
    ),
    "tls13_record": Target(tls13_record, (ProtocolError,), "TLS 1.3 record layer"),
    "tls13_server": Target(tls13_server, (ProtocolError,), "TLS 1.3 server core"),
    "ece": Target(ece, (VerificationError,), "RFC 8188 aes128gcm records"),
    "manifest": Target(manifest, (VerificationError,), "signed blind manifest"),
    "decisions": Target(decisions, (ProtocolError,), "decision stream JSON"),
    "redis_message": Target(redis_message, (ProtocolError,), "signed decisions from Redis"),
    "config": Target(config, (ConfigError,), "TOML configuration"),
    "quic_initial": Target(quic_initial, (ProtocolError,), "QUIC Initials, the edge's flows"),
    "http_cache": Target(http_cache, (), "the shared cache's fields: Cache-Control, dates"),
    "http1_server": Target(http1_server, (), "HTTP/1.1 server connection (llhttp + ours)"),
    "http2_client_view": Target(
        http2_client_view, (), "HTTP/2 server connection as a client sees it (web/http2.py)"
    ),
    "http2_server": Target(http2_server, (), "HTTP/2 server connection (web.h2core + ours)"),
}


def check(name: str, data: bytes) -> None:
    """Run one input; the target's documented errors are fine, anything else propagates."""
    target = TARGETS[name]
    try:
        target.run(data)
    except target.allowed:
        pass
