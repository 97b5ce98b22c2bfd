"""Write the seed corpora in fuzz/corpus/<target>/ from real messages: ClientHellos that
openssl s_client, curl and Python's ssl send, curl's PROXY v1 line, frames our key-server client
sends, records of a real TLS 1.3 handshake, sealed files, a signed manifest, a decision stream,
the configuration examples of the docs.

    .venv/bin/python fuzz/make_seeds.py          # rewrites fuzz/corpus/ (loopback only)

Seeds are named by their content's hash, so rerunning adds what changed and keeps the rest.
"""

from __future__ import annotations

import hashlib
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blindfold import pki  # noqa: E402
from fuzz import targets  # noqa: E402

CORPUS = ROOT / "fuzz" / "corpus"
SEP = b"\xff\x00\xff"


def save(target: str, data: bytes) -> None:
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / hashlib.sha256(data).hexdigest()[:16]).write_bytes(data)


def _tls_record_complete(data: bytes) -> bool:
    return len(data) >= 5 and len(data) >= 5 + int.from_bytes(data[3:5], "big")


def _handshake_messages() -> bytes:
    """ClientHello .. Certificate of a real handshake (Python ssl visiting our TlsServer): what
    an honest edge sends the key server."""
    from blindfold.core import tls13_server as ts

    identity, _key, cafile = targets._server_site()
    ctx = ssl.create_default_context(cafile=cafile)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(inc, out, server_hostname=targets.HOST)
    try:
        client.do_handshake()
    except ssl.SSLWantReadError:
        pass
    server = ts.TlsServer(identity, ts.TlsSettings(), ts.SessionStore(60, 10), targets.HOST)
    event = server.receive(out.read(), targets.NOW)[-1]
    assert isinstance(event, ts.SignatureRequested), event
    return event.messages


def capture_first_flight(
    client: list[str] | None,
    python_ctx: ssl.SSLContext | None,
    complete: Callable[[bytes], bool] = _tls_record_complete,
) -> bytes:
    """What a real client sends first on a TCP connection to us (we never answer)."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        srv.settimeout(10)
        port = srv.getsockname()[1]
        proc = None
        thread = None
        if client is not None:
            cmd = [c.replace("PORT", str(port)) for c in client]
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        else:
            assert python_ctx is not None

            def connect() -> None:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                        python_ctx.wrap_socket(s, server_hostname=targets.HOST)
                except OSError:
                    pass

            thread = threading.Thread(target=connect, daemon=True)
            thread.start()
        conn, _ = srv.accept()
        conn.settimeout(5)
        data = b""
        try:
            while not complete(data):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
        finally:
            conn.close()
            if proc is not None:
                proc.kill()  # the client we started, by its handle
                proc.wait(5)
            if thread is not None:
                thread.join(5)
        return data


def client_hellos() -> list[bytes]:
    hellos = []
    h = targets.HOST
    for cmd in (
        ["openssl", "s_client", "-connect", "127.0.0.1:PORT", "-servername", h],
        ["openssl", "s_client", "-connect", "127.0.0.1:PORT", "-servername", h, "-tls1_2"],
        [
            "openssl",
            "s_client",
            "-connect",
            "127.0.0.1:PORT",
            "-alpn",
            "h2,http/1.1",
            "-servername",
            h,
            "-groups",
            "P-256:X25519",
        ],
        [
            "curl",
            "-sk",
            "--max-time",
            "5",
            "--resolve",
            f"{h}:PORT:127.0.0.1",
            f"https://{h}:PORT/",
        ],
        [
            "curl",
            "-sk",
            "--max-time",
            "5",
            "--http1.1",
            "--tlsv1.3",
            "--resolve",
            f"{h}:PORT:127.0.0.1",
            f"https://{h}:PORT/",
        ],
    ):
        hellos.append(capture_first_flight(cmd, None))
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    hellos.append(capture_first_flight(None, ctx))
    return [x for x in hellos if x]


def quic_seeds() -> None:
    """Real clients' first datagrams (tests/data/quic), and a real ClientHello as CRYPTO
    frames in two orders (the target protects them itself)."""
    import json

    from blindfold.core.quic_flows import HelloReceived, QuicFlowTable

    for path in sorted((ROOT / "tests" / "data" / "quic").glob("*.json")):
        grams = [bytes.fromhex(x) for x in json.loads(path.read_text())["datagrams"]]
        save("quic_initial", b"\x00" + SEP.join(grams))
    table = QuicFlowTable()
    grams = [
        bytes.fromhex(x)
        for x in json.loads((ROOT / "tests/data/quic/chromium_v1.json").read_text())["datagrams"]
    ]
    message = b""
    for g in grams:
        found = table.from_client(g, ("203.0.113.7", 1), 0.0)
        if isinstance(found, HelloReceived):
            message = found.hello.hello.message
            break

    def crypto(offset: int, data: bytes) -> bytes:
        return (
            b"\x06"
            + (0x4000 | offset).to_bytes(2, "big")
            + (0x4000 | len(data)).to_bytes(2, "big")
            + data
        )

    first, second = crypto(0, message[:1000]), crypto(1000, message[1000:])
    save("quic_initial", b"\x01" + first + SEP + second)
    save("quic_initial", b"\x01" + b"\x01" + second + SEP + b"\x00\x00" + first)


def http2_seeds() -> None:
    """HTTP/2 client flights: what h2's client connection sends (requests with and without
    bodies, trailers, a settings change, a window update, a ping, a reset), and hand-made
    frames h2 will not send (a CONTINUATION, a padded DATA, a reset flood, an HPACK size
    update, a frame on stream 0), some cut into several reads (SEP)."""
    import struct

    import h2.config
    import h2.connection
    import h2.settings

    def client() -> h2.connection.H2Connection:
        c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        c.initiate_connection()
        return c

    def req(path: str = "/", method: str = "GET") -> list[tuple[str, str]]:
        return [(":method", method), (":scheme", "https"), (":path", path), (":authority", "a")]

    def frame(kind: int, flags: int, sid: int, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload))[1:]
            + bytes((kind, flags))
            + struct.pack(">I", sid)
            + payload
        )

    c = client()
    c.send_headers(1, req(), end_stream=True)
    save("http2_client_view", c.data_to_send())
    c = client()
    c.send_headers(1, req("/echo", "POST"))
    c.send_data(1, b"hello")
    c.send_headers(1, [("x-trailer", "t")], end_stream=True)
    c.send_headers(3, req("/big"), end_stream=True)
    save("http2_client_view", c.data_to_send())
    c = client()
    preface = c.data_to_send()
    c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    c.send_headers(1, req("/big"), end_stream=True)
    first = c.data_to_send()
    c.increment_flow_control_window(100_000)
    c.increment_flow_control_window(100_000, stream_id=1)
    c.ping(b"12345678")
    save("http2_client_view", preface + SEP + first + SEP + c.data_to_send())
    c = client()
    for sid in range(1, 11, 2):
        c.send_headers(sid, req(f"/{sid}", "POST"))
        c.send_data(sid, b"x" * 100, end_stream=sid % 4 == 1)
    c.reset_stream(3)
    save("http2_client_view", c.data_to_send())
    start = client().data_to_send()
    lit = b"\x00\x07:method\x03GET\x00\x07:scheme\x05https\x00\x05:path\x01/"
    save("http2_client_view", start + frame(1, 0x1, 1, lit[:12]) + frame(9, 0x4, 1, lit[12:]))
    save("http2_client_view", start + frame(1, 0x5, 1, b"\x20" + lit))  # a table size update
    save(
        "http2_client_view", start + frame(1, 0x4, 1, lit) + frame(0, 0x9, 1, b"\x03ab\x00\x00\x00")
    )
    save(
        "http2_client_view",
        start
        + b"".join(frame(1, 0x5, s, lit) + frame(3, 0, s, b"\0\0\0\x08") for s in range(1, 41, 2)),
    )
    save("http2_client_view", start + frame(0, 0, 0, b"x") + SEP + frame(6, 0, 0, b"12345678"))
    save("http2_client_view", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")


def main() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from blindfold.core import ece, manifest, proxyproto
    from blindfold.core import keyless_wire as w
    from blindfold.decisions.core import DecisionStore

    quic_seeds()
    http2_seeds()
    # the shared cache: fields as the public cache test suite sends them
    for response, request, nm in (
        (b"cache-control: max-age=3600\ndate: Sun, 06 Nov 1994 08:49:37 GMT", b"", b""),
        (b"expires: Thursday, 18-Aug-50 02:01:18 GMT\nexpires: 0", b"if-modified-since: 0", b""),
        (
            b'cdn-cache-control: max-age=10, foo\ncache-control: no-store, no-cache="a, b"',
            b"cache-control: max-stale, min-fresh=1",
            b"cache-control: max-age=5\nage: 7200, 0",
        ),
        (
            b"cache-control: max-age=1, stale-while-revalidate=10, stale-if-error=60\n"
            b'etag: "x"\nvary: accept, *\nconnection: x-a\nx-a: 1',
            b'if-none-match: W/"x"\naccept: a',
            b"cache-control: private",
        ),
    ):
        save("http_cache", response + SEP + request + SEP + nm)
    hellos = client_hellos()
    for hello in hellos:
        save("clienthello", hello)
        save("clienthello", hello[:40] + SEP + hello[40:])
        save("tls13_server", b"\x00" + hello)
    # PROXY: curl's v1 line, and v1/v2 headers as HAProxy writes them (spec examples)
    line = capture_first_flight(
        ["curl", "-s", "--max-time", "5", "--haproxy-protocol", "http://127.0.0.1:PORT/"],
        None,
        lambda data: b"\r\n\r\n" in data,
    )
    save("proxyproto", line)
    save("proxyproto", proxyproto.encode_v1(("203.0.113.7", 51234), ("192.0.2.1", 443)))
    save("proxyproto", proxyproto.encode_v1(("2001:db8::7", 51234), ("2001:db8::1", 443)))
    save("proxyproto", proxyproto.encode_v1(None, None))
    save("proxyproto", proxyproto.encode_v2(("203.0.113.7", 51234), ("192.0.2.1", 443)))
    save(
        "proxyproto",
        proxyproto.encode_v2(
            ("2001:db8::7", 51234), ("2001:db8::1", 443), ((0x02, b"example.test"),), crc=True
        ),
    )
    save("proxyproto", proxyproto.encode_v2(None, None))
    # key-server frames as our client sends them, and the server's answers
    messages = _handshake_messages()
    req = w.SignRequest(w.ECDSA_SECP256R1_SHA256, "203.0.113.7", messages)
    req6 = w.SignRequest(w.RSA_PSS_RSAE_SHA256, "2001:db8::7", messages[:200])
    save("keyless_handshake", w.ECDSA_SECP256R1_SHA256.to_bytes(2, "big") + messages)
    save("keyless_handshake", w.RSA_PSS_RSAE_SHA256.to_bytes(2, "big") + messages)
    save("keyless_wire", w.encode_sign_request(1, req))
    answer = w.encode_sign_response(7, b"s" * 71)
    save("keyless_wire", w.encode_sign_request(7, req6) + SEP + answer)
    save("keyless_wire", w.encode_error(3, w.E_UNAUTHORIZED, "edge may not sign for this host"))
    save("keyless_wire", w.encode_frame(w.PING, 9, b"") + w.encode_frame(w.PONG, 9, b""))
    # TLS records: a real first flight (plaintext records), and inner plaintexts to seal
    for hello in hellos[:2]:
        save("tls13_record", b"\x00" + hello)
    save("tls13_record", b"\x01" + b"GET / HTTP/1.1\r\n\r\n\x17" + SEP + b"\x01\x00\x15")
    save("tls13_record", b"\x03" + b"\x18\x00\x00\x01\x01\x16" + SEP + b"data\x17\x00\x00\x00")
    # TLS server, after a real handshake: KeyUpdate, data, close_notify, a bad alert
    key_update = b"\x16\x18\x00\x00\x01\x01"
    save("tls13_server", b"\x01" + key_update + SEP + b"\x17GET / HTTP/1.1\r\n\r\n")
    save("tls13_server", b"\x01" + b"\x15\x01\x00")
    save("tls13_server", b"\x01" + b"\x16\x04\x00\x00\x04\x00\x00\x00\x00")
    # RFC 8188: sealed blobs under the target's key, and record plaintexts to seal
    for size, rs in ((0, 18), (100, 64), (5000, 4096)):
        save(
            "ece",
            b"\x00"
            + ece.seal(
                bytes(range(256)) * (size // 256) + b"x" * (size % 256),
                targets.ECE_KEY,
                rs=rs,
                salt=bytes(16),
            ),
        )
    save("ece", b"\x01\x00\x40" + b"hello\x01" + SEP + b"world\x02\x00\x00")
    save("ece", b"\x01\x00\x12" + b"\x02")
    # the manifest: a real one signed with the target's key, and its payload
    key: Ed25519PrivateKey = targets._manifest_key()
    entry = manifest.Entry(
        path="/app.js",
        id="0" * 32,
        blob_sha256="a" * 64,
        sha256="b" * 64,
        type="text/javascript",
        size=100,
        sealed_size=ece.sealed_size(100, 4096),
        rs=4096,
        key=bytes(16),
    )
    doc = manifest.build([entry], key, int(targets.NOW) - 10, int(targets.NOW) + 3600)
    save("manifest", b"\x00" + doc)
    import json

    save("manifest", b"\x01" + json.loads(doc)["payload"].encode())
    # decisions: the origin's stream (CrowdSec's shape) and Redis messages
    store = DecisionStore()
    now = targets.NOW
    store.add("ip", "203.0.113.7", 3600, "crs:942100", now)
    store.add("range", "198.51.100.0/24", 60.5, "rate", now)
    d6 = store.add("ip", "2001:db8::7", 4 * 3600, "manual", now)
    save("decisions", json.dumps(store.stream("edge1", True, now)).encode())
    store.remove("ip", "2001:db8::7")
    save("decisions", json.dumps(store.stream("edge1", False, now)).encode())
    save("decisions", b'{"new": null, "deleted": null}')
    from blindfold.decisions.signed import DecisionSigner

    signer = DecisionSigner(targets._decision_key())
    for d in [d6, *store.active(now)]:
        until = targets.NOW + 3600
        save(
            "redis_message", b"\x00" + signer.sign(d.scope, d.value, until, now, d.reason).encode()
        )
        payload = {"scope": d.scope, "value": d.value, "until": until, "issued": now, "reason": "x"}
        save("redis_message", b"\x01" + json.dumps(payload).encode())
    # the configuration: every TOML example of the docs
    for doc_path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```toml\n(.*?)```", doc_path.read_text(), re.S):
            save("config", block.encode())
    http2_server_seeds()
    write_dicts()
    for target in targets.TARGETS:
        print(f"{target}: {len(list((CORPUS / target).iterdir()))} seeds")


def http2_server_seeds() -> None:
    """What the `h2` library sends as a client: requests with and without bodies, trailers,
    CONTINUATION, a reset, pings and window updates (the target sends the preface itself)."""
    import h2.config
    import h2.connection

    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    first = c.data_to_send()[len(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") :]
    head = [(":method", "GET"), (":scheme", "https"), (":authority", "a.test"), (":path", "/")]
    c.send_headers(1, head, end_stream=True)
    c.send_headers(3, [*head[:3], (":path", "/now")], end_stream=True)
    save("http2_server", first + SEP + c.data_to_send())
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    c.data_to_send()
    post = [(":method", "POST"), *head[1:], ("content-length", "5")]
    c.send_headers(5, post)
    c.send_data(5, b"hello")
    c.send_headers(5, [("x-trailer", "1")], end_stream=True)
    c.send_headers(7, [*head, ("x-long", "v" * 20000)], end_stream=True)
    c.ping(b"12345678")
    c.increment_flow_control_window(1000)
    c.send_headers(9, head)
    c.reset_stream(9)
    save("http2_server", first + SEP + c.data_to_send())


JSON_TOKENS = ["{", "}", "[", "]", ":", ",", '"', "null", "true", "false", "NaN", "Infinity"]
JSON_TOKENS += ["-Infinity", "1e999", "-0", "0.5", "[[[[[[[[", '{"a":{"a":']
TOML_TOKENS = ["[", "]", "[[", "]]", "{", "}", "=", ",", '"', "'", "nan", "inf", "-inf", "+nan"]
TOML_TOKENS += ["true", "false", "1e400", "0x7fffffffffffffff", "1979-05-27", "[[[[[[[["]
FIELDS = {
    "decisions": ["new", "deleted", "scope", "value", "type", "ban", "duration", "Ip", "Range"],
    "redis_message": ["scope", "value", "until", "reason", "ip", "range", "203.0.113.7"],
    "manifest": ["format", "alg", "ed25519", "key_id", "payload", "signature", "files", "rs"],
}
FIELDS["decisions"] += ["scenario", "origin", "4h", "1.5s", "-1s", "203.0.113.7"]
FIELDS["manifest"] += ["issued_at", "expires_at", "id", "blob_sha256", "sha256", "size", "key"]
FIELDS["manifest"] += ["sealed_size", "/app.js"]


def _dict_line(token: str) -> str:
    return '"' + token.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_dicts() -> None:
    """libFuzzer dictionaries (fuzz/dict/TARGET.dict): the formats' tokens and the names the
    parsers look for, so that mutations produce them."""
    from blindfold.config import Config
    from blindfold.config.schema import iter_documented

    d = ROOT / "fuzz" / "dict"
    d.mkdir(exist_ok=True)
    keys = sorted({p for key, *_ in iter_documented(Config) for p in key.split(".")})
    (d / "config.dict").write_text("\n".join(_dict_line(t) for t in TOML_TOKENS + keys) + "\n")
    for target, names in FIELDS.items():
        lines = [_dict_line(t) for t in JSON_TOKENS + names]
        (d / f"{target}.dict").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        pki  # noqa: B018 -- imported for the tls13_server target's throwaway CA
        main()
