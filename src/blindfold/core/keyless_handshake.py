"""What the key server checks before it signs, sans-IO: the handshake messages a keyless edge
sends (ClientHello || ServerHello || EncryptedExtensions || Certificate, RFC 8446 §4), parsed,
checked for consistency and hashed here, so that nothing the signature depends on is taken
from the edge's word.

`parse_handshake(messages)` -> `Handshake` (the SNI and random of the visitor's ClientHello,
the cipher suite, the leaf certificate, the transcript hash computed here) or ProtocolError
with a stable reason; `authorise(...)` then decides whether this edge may have it signed with
which key. `ReplayGuard` remembers the ClientHello randoms recently signed.

The ClientHello goes through the edge's own parser (core.clienthello); the other three
messages are the server's, short and fixed in shape, and are read with slices here. No
library parses server-side TLS 1.3 messages from bytes (aioquic's pull_* functions assume a
well-formed peer and raise anything on bad input).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple, Protocol, TypeVar

from blindfold.core.clienthello import ClientHello, parse_hello_message
from blindfold.errors import ProtocolError

# RFC 8446 §4 handshake types
HS_CLIENT_HELLO = 1
HS_SERVER_HELLO = 2
HS_ENCRYPTED_EXTENSIONS = 8
HS_CERTIFICATE = 11
# RFC 8446 §4.2 extensions
EXT_ALPN = 16
EXT_PRE_SHARED_KEY = 41
EXT_EARLY_DATA = 42
EXT_SUPPORTED_VERSIONS = 43
EXT_KEY_SHARE = 51
TLS12 = 0x0303
TLS13 = 0x0304
# RFC 8446 §4.1.3: a HelloRetryRequest is a ServerHello with this random (SHA-256 of
# "HelloRetryRequest")
HELLO_RETRY_RANDOM = bytes.fromhex(
    "CF21AD74E59A6111BE1D8C021E65B891C2A211167ABB8C5E079E09E2C8A8339C"
)
# RFC 8446 §B.4: the transcript hash is the cipher suite's hash
SUITE_HASHES: dict[int, Callable[[bytes], hashlib._Hash]] = {
    0x1301: hashlib.sha256,  # TLS_AES_128_GCM_SHA256
    0x1302: hashlib.sha384,  # TLS_AES_256_GCM_SHA384
    0x1303: hashlib.sha256,  # TLS_CHACHA20_POLY1305_SHA256
}
# Hard caps on what the key server reads (atk-trust finding 6: a 64 KiB ClientHello of 16,000
# empty extensions cost ~5 ms of parsing, so one edge under its rate limit starved every other).
# Real clients stay far below: Chromium's post-quantum ClientHello is ~1.8 KB with ~18
# extensions (GREASE included), Firefox's and OpenSSL's are alike. The extensions are counted
# before anything is parsed, so a refused request costs the key server a few microseconds.
MAX_CLIENT_HELLO = 16384  # bytes of the ClientHello message, header included (one full record)
MAX_HELLO_EXTENSIONS = 64
MAX_SERVER_EXTENSIONS = 32  # EncryptedExtensions (the edge's own: ALPN and a few more)
MAX_CERTIFICATES = 16  # entries of the Certificate message (real chains have 2 to 4)


class Handshake(NamedTuple):
    """A full TLS 1.3 handshake up to the server's Certificate, as the key server read it. (A
    NamedTuple: built once per request on the key server's hot path, several times cheaper
    than a frozen dataclass.)"""

    sni: str
    client_random: bytes
    cipher_suite: int
    group: int
    alpn: str | None
    signature_algorithms: tuple[int, ...]  # what the client offered
    certificate_sha256: bytes  # the leaf of the Certificate message
    transcript_hash: bytes  # Hash(ClientHello .. Certificate), computed here


def _refuse(reason: str, detail: str) -> ProtocolError:
    return ProtocolError(reason, detail)


def _message(data: bytes, pos: int, mtype: int, name: str, reason: str) -> tuple[int, int]:
    """(body start, end) of the handshake message of type `mtype` at `pos`."""
    if pos + 4 > len(data):
        raise _refuse(reason, f"no {name} (the messages end at byte {pos})")
    if data[pos] != mtype:
        raise _refuse(reason, f"handshake type {data[pos]} where the {name} ({mtype}) belongs")
    end = pos + 4 + int.from_bytes(data[pos + 1 : pos + 4], "big")
    if end > len(data):
        raise _refuse(reason, f"the {name} runs past the end of the messages")
    return pos + 4, end


def parse_handshake(messages: bytes) -> Handshake:
    """Parse and cross-check ClientHello .. Certificate; hash them as the transcript."""
    # ClientHello (RFC 8446 §4.1.2), through the edge's parser
    _body, end = _message(messages, 0, HS_CLIENT_HELLO, "ClientHello", "bad_client_hello")
    if end > MAX_CLIENT_HELLO:
        raise _refuse(
            "hello_too_large", f"a ClientHello of {end} bytes (at most {MAX_CLIENT_HELLO})"
        )
    _count_extensions(messages, end)
    try:
        hello = parse_hello_message(messages[:end])
        key_share_groups = hello.key_share_groups
    except ProtocolError as exc:
        raise _refuse("bad_client_hello", f"{exc.reason}: {exc.detail}") from None
    if TLS13 not in hello.supported_versions:
        raise _refuse("not_tls13", "the ClientHello does not offer TLS 1.3")
    if hello.sni is None:
        raise _refuse("no_sni", "the ClientHello names no server (no server_name extension)")
    sid_len = messages[38]
    session_id = messages[39 : 39 + sid_len]
    cipher_suite, group, ee_start = _server_hello(
        messages, end, hello, session_id, key_share_groups
    )
    alpn, cert_start = _encrypted_extensions(messages, ee_start, hello)
    leaf_sha256, stop = _certificate(messages, cert_start)
    if stop != len(messages):
        raise _refuse(
            "unexpected_message",
            f"{len(messages) - stop} bytes after the Certificate (a signature covers exactly "
            "ClientHello .. Certificate)",
        )
    return Handshake(
        hello.sni,
        messages[6:38],
        cipher_suite,
        group,
        alpn,
        hello.signature_algorithms,
        leaf_sha256,
        SUITE_HASHES[cipher_suite](messages).digest(),
    )


def _count_extensions(data: bytes, end: int) -> None:
    """Refuse a ClientHello (data[:end]) with more than MAX_HELLO_EXTENSIONS extensions, reading
    only the extension headers (RFC 8446 §4.1.2 layout). Anything malformed is left to the
    parser, which names it."""
    if end < 39:
        return
    pos = 39 + data[38]  # header, legacy_version, random, then legacy_session_id
    if pos + 2 > end:
        return
    pos += 2 + ((data[pos] << 8) | data[pos + 1])  # cipher_suites
    if pos >= end:
        return
    pos += 1 + data[pos] + 2  # legacy_compression_methods, the extensions' length
    count = 0
    while pos + 4 <= end:
        count += 1
        if count > MAX_HELLO_EXTENSIONS:
            raise _refuse(
                "too_many_extensions",
                f"the ClientHello has more than {MAX_HELLO_EXTENSIONS} extensions",
            )
        pos += 4 + ((data[pos + 2] << 8) | data[pos + 3])


def _server_hello(
    data: bytes, pos: int, hello: ClientHello, session_id: bytes, key_share_groups: tuple[int, ...]
) -> tuple[int, int, int]:
    """(cipher suite, key share group, end) of the ServerHello at `pos`."""
    # RFC 8446 §4.1.3
    bad = "bad_server_hello"
    body, end = _message(data, pos, HS_SERVER_HELLO, "ServerHello", bad)
    if end - body < 2 + 32 + 1:
        raise _refuse(bad, "ServerHello too short")
    if int.from_bytes(data[body : body + 2], "big") != TLS12:
        raise _refuse(bad, "legacy_version is not 0x0303")
    if data[body + 2 : body + 34] == HELLO_RETRY_RANDOM:
        raise _refuse("hello_retry", "a HelloRetryRequest (this engine never sends one)")
    p = body + 34
    sid_len = data[p]
    if p + 1 + sid_len + 5 > end:
        raise _refuse(bad, "ServerHello truncated after the session id")
    if data[p + 1 : p + 1 + sid_len] != session_id:
        raise _refuse("session_id_mismatch", "legacy_session_id_echo is not the client's")
    p += 1 + sid_len
    suite = int.from_bytes(data[p : p + 2], "big")
    if data[p + 2] != 0:
        raise _refuse(bad, "legacy_compression_method is not 0")
    ext_end = p + 5 + int.from_bytes(data[p + 3 : p + 5], "big")
    if ext_end != end:
        raise _refuse(bad, "the extensions' length does not match the ServerHello")
    p += 5
    version = group = 0
    seen = set()
    while p < end:
        if p + 4 > end:
            raise _refuse(bad, "truncated extension header")
        etype = int.from_bytes(data[p : p + 2], "big")
        stop = p + 4 + int.from_bytes(data[p + 2 : p + 4], "big")
        if stop > end:
            raise _refuse(bad, f"extension {etype} overruns the ServerHello")
        if etype in seen:
            raise _refuse(bad, f"duplicate extension {etype}")
        seen.add(etype)
        p += 4
        if etype == EXT_SUPPORTED_VERSIONS:  # §4.2.1: the selected version
            if stop - p != 2:
                raise _refuse(bad, "supported_versions is not one version")
            version = int.from_bytes(data[p:stop], "big")
        elif etype == EXT_KEY_SHARE:  # §4.2.8: one KeyShareEntry
            if stop - p < 5 or int.from_bytes(data[p + 2 : p + 4], "big") != stop - p - 4:
                raise _refuse(bad, "malformed key_share")
            group = int.from_bytes(data[p : p + 2], "big")
        elif etype == EXT_PRE_SHARED_KEY:
            # a resumed handshake needs no CertificateVerify: a signing handshake is a full one
            raise _refuse("psk_handshake", "the ServerHello selects a pre-shared key")
        else:  # §4.2: nothing else may appear in a ServerHello
            raise _refuse(bad, f"extension {etype} does not belong in a ServerHello")
        p = stop
    if version != TLS13:
        raise _refuse("not_tls13", f"the ServerHello selects version 0x{version:04x}")
    if suite not in SUITE_HASHES:
        raise _refuse(bad, f"cipher suite 0x{suite:04x} is not one this key server signs for")
    if suite not in hello.cipher_suites:
        raise _refuse("cipher_not_offered", f"cipher suite 0x{suite:04x} was not offered")
    if not group:
        raise _refuse(bad, "no key_share: a full handshake needs one")
    if group not in key_share_groups:
        raise _refuse("key_share_mismatch", f"the client sent no key share for group 0x{group:04x}")
    return suite, group, end


def _encrypted_extensions(data: bytes, pos: int, hello: ClientHello) -> tuple[str | None, int]:
    # RFC 8446 §4.3.1
    bad = "bad_encrypted_extensions"
    body, end = _message(data, pos, HS_ENCRYPTED_EXTENSIONS, "EncryptedExtensions", bad)
    if end - body < 2 or int.from_bytes(data[body : body + 2], "big") != end - body - 2:
        raise _refuse(bad, "the extensions' length does not match the message")
    p = body + 2
    alpn: str | None = None
    seen = set()
    while p < end:
        if p + 4 > end:
            raise _refuse(bad, "truncated extension header")
        etype = int.from_bytes(data[p : p + 2], "big")
        stop = p + 4 + int.from_bytes(data[p + 2 : p + 4], "big")
        if stop > end:
            raise _refuse(bad, f"extension {etype} overruns the message")
        if etype in seen:
            raise _refuse(bad, f"duplicate extension {etype}")
        seen.add(etype)
        if len(seen) > MAX_SERVER_EXTENSIONS:
            raise _refuse(
                "too_many_extensions",
                f"the EncryptedExtensions has more than {MAX_SERVER_EXTENSIONS} extensions",
            )
        p += 4
        if etype == EXT_ALPN:  # RFC 7301 §3.1: the server selects exactly one name
            n = data[p + 2] if stop - p >= 3 else 0
            if (
                int.from_bytes(data[p : p + 2], "big") != stop - p - 2
                or n == 0
                or 3 + n != stop - p
            ):
                raise _refuse(bad, "the ALPN extension is not one protocol name")
            name = data[p + 3 : stop]
            if name not in hello.alpn:
                raise _refuse("alpn_not_offered", "the server selects a protocol not offered")
            alpn = name.decode("latin-1")
        elif etype == EXT_EARLY_DATA:  # only a resumed handshake can accept early data
            raise _refuse(bad, "early data accepted in a full handshake")
        p = stop
    return alpn, end


def _certificate(data: bytes, pos: int) -> tuple[bytes, int]:
    # RFC 8446 §4.4.2
    bad = "bad_certificate"
    body, end = _message(data, pos, HS_CERTIFICATE, "Certificate", bad)
    if end - body < 4:
        raise _refuse(bad, "Certificate too short")
    if data[body] != 0:
        raise _refuse(bad, "a server's certificate_request_context must be empty")
    if int.from_bytes(data[body + 1 : body + 4], "big") != end - body - 4:
        raise _refuse(bad, "the certificate_list length does not match the message")
    p = body + 4
    leaf = b""
    count = 0
    while p < end:
        count += 1
        if count > MAX_CERTIFICATES:
            raise _refuse(
                "too_many_certificates", f"more than {MAX_CERTIFICATES} certificates in the chain"
            )
        if p + 3 > end:
            raise _refuse(bad, "truncated certificate entry")
        stop = p + 3 + int.from_bytes(data[p : p + 3], "big")
        if stop == p + 3 or stop + 2 > end:
            raise _refuse(bad, "bad cert_data length")
        if not leaf:
            leaf = hashlib.sha256(data[p + 3 : stop]).digest()
        p = stop + 2 + int.from_bytes(data[stop : stop + 2], "big")
        if p > end:
            raise _refuse(bad, "certificate entry extensions overrun the message")
    if not leaf:
        raise _refuse(bad, "the certificate_list is empty")
    return leaf, end


# ------------------------------------------------------------------------------ authorisation
class SigningKey(Protocol):
    """What authorisation needs of a key: its certificate, its schemes, the names it covers."""

    @property
    def cert_sha256(self) -> bytes: ...

    @property
    def schemes(self) -> frozenset[int]: ...

    def covers(self, hostname: str) -> bool: ...


K = TypeVar("K", bound=SigningKey)


def authorise(
    hs: Handshake,
    scheme: int,
    allowed: Callable[[str], object],
    keys: Mapping[bytes, K],
    too_broad: Mapping[bytes, tuple[str, ...]],
) -> K:
    """The key to sign with, if this edge (`allowed`: its hostnames) may have this handshake
    signed with `scheme`; ProtocolError (unauthorized_sni, certificate_mismatch,
    certificate_too_broad, scheme_not_offered, bad_scheme) otherwise. `too_broad` maps the
    certificates (SHA-256) that cover names this edge is not authorised for to those names
    (`uncovered_names`, computed once per edge and key when the configuration is loaded)."""
    if not allowed(hs.sni):
        raise _refuse("unauthorized_sni", f"this edge may not sign for {hs.sni}")
    key = keys.get(hs.certificate_sha256)
    if key is None:
        raise _refuse(
            "certificate_mismatch",
            "the Certificate message's leaf is not the certificate of a key held here",
        )
    if not key.covers(hs.sni):
        raise _refuse("certificate_mismatch", f"the certificate does not cover {hs.sni}")
    extra = too_broad.get(key.cert_sha256)
    if extra is not None:
        # RFC 9113 §9.1.1: a browser sends requests for every name the certificate covers
        # over this connection once the handshake completes, whatever name it was opened for
        raise _refuse(
            "certificate_too_broad",
            f"the certificate also covers {', '.join(extra[:4])}"
            f"{' and more' if len(extra) > 4 else ''}, which this edge is not authorised for "
            "(a browser may send their requests over this connection): give this edge's names "
            "a certificate of their own",
        )
    if scheme not in hs.signature_algorithms:
        raise _refuse("scheme_not_offered", f"the client did not offer scheme 0x{scheme:04x}")
    if scheme not in key.schemes:
        raise _refuse("bad_scheme", f"scheme 0x{scheme:04x} does not fit the key")
    return key


def uncovered_names(names: Iterable[str], patterns: Iterable[str]) -> tuple[str, ...]:
    """The certificate names (DNS names, '*.' wildcards among them, and IP addresses) that an
    edge authorised for `patterns` (exact names and '*.suffix', as core.routing matches them) is
    not authorised for. A wildcard name needs a wildcard pattern at or above it: '*.a.example'
    is covered by '*.a.example' or '*.example', not by 'www.a.example'."""
    exact = set()
    wild = []
    for p in patterns:
        if p.startswith("*."):
            wild.append(p[2:])
        else:
            exact.add(p)

    def below(name: str) -> bool:  # a wildcard pattern covers `name` ('.a.example': all below)
        return any(name.endswith("." + w) for w in wild)

    out = []
    for name in names:
        if name.startswith("*."):  # '*.a.example': every name ending in '.a.example'
            if not below(name[1:]):
                out.append(name)
        elif name not in exact and not below(name):
            out.append(name)
    return tuple(out)


def names_overlap(names: Iterable[str], patterns: Iterable[str]) -> bool:
    """Whether an edge authorised for `patterns` may sign for any name the certificate covers
    (an SNI both match), even if not for all of them."""

    def meet(a: str, b: str) -> bool:
        if a.startswith("*.") and b.startswith("*."):
            sa, sb = a[1:], b[1:]  # ".suffix"
            return sa.endswith(sb) or sb.endswith(sa)
        if a.startswith("*."):
            return b.endswith(a[1:])
        if b.startswith("*."):
            return a.endswith(b[1:])
        return a == b

    pats = list(patterns)
    return any(meet(n, p) for n in names for p in pats)


# ------------------------------------------------------------------------------ replays
class ReplayGuard:
    """The ClientHello randoms signed within the last `window_s` seconds (at most `max_entries`,
    oldest forgotten first). A visitor's random is signed once: the same random in a different
    transcript, or from another edge, is refused. The identical request from the same edge is a
    retry (the edge's client resends a request whose connection broke before the answer came)
    and is signed again: it yields a signature over content already signed, nothing new."""

    def __init__(self, window_s: float, max_entries: int) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._seen: OrderedDict[bytes, tuple[float, str, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, hs: Handshake, edge: str, now: float) -> bool:
        """True for a retry, False for a new random; ProtocolError `replayed_client_random`."""
        if self.window_s <= 0:
            return False
        seen = self._seen
        while seen:
            expires = next(iter(seen.values()))[0]
            if expires > now:
                break
            seen.popitem(last=False)
        entry = seen.get(hs.client_random)
        if entry is None:
            return False
        if entry[1] == edge and entry[2] == hs.transcript_hash:
            return True
        raise _refuse(
            "replayed_client_random",
            "this ClientHello random was signed for another handshake "
            f"{'by another edge ' if entry[1] != edge else ''}within {self.window_s:g} s",
        )

    def remember(self, hs: Handshake, edge: str, now: float) -> None:
        if self.window_s <= 0 or hs.client_random in self._seen:
            return
        self._seen[hs.client_random] = (now + self.window_s, edge, hs.transcript_hash)
        while len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)
