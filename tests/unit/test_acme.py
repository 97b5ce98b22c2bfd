"""ACME pieces pebble 2.4 cannot exercise, checked against the RFCs' examples: renewal
information (RFC 9773: the certificate identifier of §4.1, the RenewalInfo object of §4.2),
certificate profiles (draft-ietf-acme-profiles: the directory's meta.profiles, newOrder's
profile), the tls-alpn-01 certificate (RFC 8737 §3), the dns-01 value (RFC 8555 §8.4), the
backoff, the checks before a chain replaces the one in service, and the config."""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import random
import socket
import ssl
import sys
from pathlib import Path

import pytest
from acme import messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from josepy.jwk import JWKRSA

from blindfold.acme import certfiles
from blindfold.acme.challenge import (
    ID_PE_ACME_IDENTIFIER,
    ChallengeDir,
    dns01_name,
    dns01_value,
    key_authorization,
    tls_alpn01_certificate,
)
from blindfold.acme.dnshook import run_dns_hook
from blindfold.acme.renewal import (
    Backoff,
    RenewalWindow,
    lifetime_renewal_time,
    parse_renewal_info,
    renewal_info_id,
    renewal_time,
    select_profile,
)
from blindfold.config import loads
from blindfold.errors import ConfigError, ProtocolError, UpstreamError, VerificationError

DAY = 86400.0


def _cert(
    key: ec.EllipticCurvePrivateKey,
    names: list[str],
    *,
    issuer_key: ec.EllipticCurvePrivateKey | None = None,
    issuer: str = "Test CA",
    serial: int = 1234,
    aki: bytes | None = None,
    days: float = 90,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
    )
    if aki is not None:
        b = b.add_extension(x509.AuthorityKeyIdentifier(aki, None, None), False)
    return b.sign(issuer_key or key, hashes.SHA256())


# ---------------------------------------------------------------- RFC 9773 (ARI)
def test_renewal_info_id_is_the_rfc_9773_example() -> None:
    # RFC 9773 §4.1: keyIdentifier 69:88:5B:6B:87:46:40:41:E1:B3:7B:84:7B:A0:AE:2C:DE:01:C8:D4,
    # serial 00:87:65:43:21 -> "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"
    key = ec.generate_private_key(ec.SECP256R1())
    aki = bytes.fromhex("69885B6B87464041E1B37B847BA0AE2CDE01C8D4")
    cert = _cert(key, ["example.com"], serial=0x87654321, aki=aki)
    assert renewal_info_id(cert) == "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"


def test_renewal_info_id_needs_an_aki() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ProtocolError) as e:
        renewal_info_id(_cert(key, ["example.com"]))
    assert e.value.reason == "no_aki"


RFC9773_RENEWAL_INFO = b"""{
  "suggestedWindow": {
    "start": "2025-01-02T04:00:00Z",
    "end": "2025-01-03T04:00:00Z"
  },
  "explanationURL": "https://acme.example.com/docs/ari"
}"""


def test_renewal_info_parses_the_rfc_9773_example() -> None:
    w = parse_renewal_info(RFC9773_RENEWAL_INFO)
    start = datetime.datetime(2025, 1, 2, 4, tzinfo=datetime.UTC).timestamp()
    assert w == RenewalWindow(start, start + DAY, "https://acme.example.com/docs/ari")


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b"{}",
        b'{"suggestedWindow": {"start": "2025-01-02T04:00:00Z"}}',
        b'{"suggestedWindow": {"start": "2025-01-03T04:00:00Z", "end": "2025-01-02T04:00:00Z"}}',
        b'{"suggestedWindow": {"start": "2025-01-02T04:00:00", "end": "2025-01-03T04:00:00"}}',
        b'{"suggestedWindow": {"start": 1, "end": 2}}',
        b"{" + b" " * 20000 + b"}",
    ],
)
def test_bad_renewal_info_is_refused(body: bytes) -> None:
    with pytest.raises(ProtocolError) as e:
        parse_renewal_info(body)
    assert e.value.reason == "bad_renewal_info"


def test_renewal_time_inside_the_window_or_at_two_thirds() -> None:
    rng = random.Random(7)
    nb, na = 1_000_000.0, 1_000_000.0 + 90 * DAY
    assert lifetime_renewal_time(nb, na, 2 / 3) == pytest.approx(nb + 60 * DAY)
    assert renewal_time(nb, na, 2 / 3, None, rng) == pytest.approx(nb + 60 * DAY)
    # 6-day certificates: two days of margin
    assert lifetime_renewal_time(0, 6 * DAY, 2 / 3) == pytest.approx(4 * DAY)
    w = RenewalWindow(nb + 10 * DAY, nb + 11 * DAY)
    times = [renewal_time(nb, na, 2 / 3, w, rng) for _ in range(200)]
    assert all(w.start <= t <= w.end for t in times)
    assert max(times) - min(times) > 0.5 * DAY  # spread over the window (RFC 9773 §4.2)
    # a window in the past (the CA revokes soon): due at once
    past = RenewalWindow(nb - 2 * DAY, nb - DAY)
    assert renewal_time(nb, na, 2 / 3, past, rng) < nb


# ---------------------------------------------------------------- profiles
PROFILES_META = {
    "termsOfService": "https://example.com/acme/terms",
    "profiles": {
        "classic": "The same profile you're accustomed to",
        "custom": "A made-up profile for this example",
    },
}


def test_profile_selection_from_the_directory_meta() -> None:
    assert select_profile(PROFILES_META, "") is None
    assert select_profile(PROFILES_META, "custom") == "custom"
    for meta, wanted in ((PROFILES_META, "shortlived"), ({}, "custom"), (None, "custom")):
        with pytest.raises(ProtocolError) as e:
            select_profile(meta, wanted)
        assert e.value.reason == "profile_unavailable"
    # the directory object as the acme package parses it keeps meta.profiles
    directory = messages.Directory.from_json(
        {"newOrder": "https://example.com/acme/new-order", "meta": PROFILES_META}
    )
    assert directory.meta is not None
    assert select_profile(directory.meta.to_partial_json(), "classic") == "classic"


def test_new_order_names_the_profile() -> None:
    order = messages.NewOrder(
        identifiers=[messages.Identifier(typ=messages.IDENTIFIER_FQDN, value="example.com")],
        profile="custom",
    )
    assert order.to_partial_json()["profile"] == "custom"


# ---------------------------------------------------------------- challenges
def test_key_authorization_uses_the_rfc_7638_thumbprint() -> None:
    # RFC 7638 §3.1: the example RSA key's SHA-256 thumbprint
    jwk: JWKRSA = JWKRSA.from_json(  # type: ignore[assignment]
        {
            "kty": "RSA",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L"
            "6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-"
            "65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNL"
            "yrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJ"
            "zKnqDKgw",
            "e": "AQAB",
        }
    )
    thumb = jwk.thumbprint()
    assert base64.urlsafe_b64encode(thumb).rstrip(b"=") == (
        b"NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    )
    assert key_authorization("tok", thumb) == "tok.NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_dns01_record() -> None:
    ka = "tok.NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    digest = hashlib.sha256(ka.encode()).digest()
    assert dns01_value(ka) == base64.urlsafe_b64encode(digest).decode().rstrip("=")
    assert dns01_name("www.example.org") == "_acme-challenge.www.example.org"
    assert dns01_name("*.example.org") == "_acme-challenge.example.org"  # RFC 8555 §8.4


def test_tls_alpn01_certificate_follows_rfc_8737() -> None:
    ka = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA.NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    cert_pem, _key_pem = tls_alpn01_certificate("www.example.org", ka)
    cert = x509.load_pem_x509_certificate(cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["www.example.org"]  # §3: only this one
    ext = cert.extensions.get_extension_for_oid(ID_PE_ACME_IDENTIFIER)
    assert ext.critical  # §3: MUST be critical
    # extnValue: DER OCTET STRING (SIZE (32)) holding SHA-256 of the key authorization
    value = ext.value.value  # type: ignore[attr-defined]
    assert value == b"\x04\x20" + hashlib.sha256(ka.encode()).digest()
    cert.verify_directly_issued_by(cert)  # self-signed


def test_challenge_dir_serves_acme_tls_1_only_for_safe_names(tmp_path: Path) -> None:
    d = ChallengeDir(str(tmp_path / "ch"))
    assert d.context("www.example.org") is None
    d.put("www.example.org", *tls_alpn01_certificate("www.example.org", "a.b"))
    f = tmp_path / "ch" / "www.example.org.pem"
    assert f.stat().st_mode & 0o777 == 0o600
    ctx = d.context("WWW.example.org")
    assert isinstance(ctx, ssl.SSLContext)
    for evil in ("../ch/www.example.org", "a/b", "", "..", "x" * 300):
        assert d.context(evil) is None
    with pytest.raises(ValueError):
        d.put("../evil", b"", b"")
    d.remove("www.example.org")
    assert d.context("www.example.org") is None


# ---------------------------------------------------------------- dns hook
def test_dns_hook_arguments_exit_code_and_deadline(tmp_path: Path) -> None:
    out = tmp_path / "args"
    script = f"import sys; open({str(out)!r}, 'w').write(' '.join(sys.argv[1:]))"
    asyncio.run(run_dns_hook([sys.executable, "-c", script], "set", "_acme-challenge.a", "V", 10))
    assert out.read_text() == "set _acme-challenge.a V"
    with pytest.raises(UpstreamError) as e:
        asyncio.run(
            run_dns_hook(["/bin/sh", "-c", "echo nope; exit 4", "h"], "clear", "n", "v", 10)
        )
    assert e.value.reason == "dns_hook_failed" and "exit code 4: nope" in str(e.value)
    with pytest.raises(UpstreamError) as e:
        asyncio.run(run_dns_hook(["/bin/sh", "-c", "sleep 30", "h"], "set", "n", "v", 0.3))
    assert e.value.reason == "dns_hook_timeout"
    with pytest.raises(UpstreamError) as e:
        asyncio.run(run_dns_hook([str(tmp_path / "missing")], "set", "n", "v", 5))
    assert e.value.reason == "dns_hook_unavailable"


# ---------------------------------------------------------------- backoff
def test_backoff_grows_with_jitter_is_capped_and_honours_retry_after() -> None:
    b = Backoff(initial_s=10, max_s=300)
    rng = random.Random(1)
    for attempt, base in ((1, 10), (2, 20), (3, 40), (6, 300), (60, 300), (10_000, 300)):
        delays = [b.delay(attempt, rng) for _ in range(100)]
        assert all(base / 2 <= d <= base for d in delays)
        assert len(set(delays)) > 50  # jittered: a fleet does not retry in step
    assert b.delay(1, rng, retry_after_s=120) == 120


# ---------------------------------------------------------------- before the swap
def test_check_chain_refuses_what_must_not_replace_a_working_certificate(tmp_path: Path) -> None:
    import time

    from cryptography.hazmat.primitives.serialization import Encoding

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(ca_key, ["ca.test"], issuer="ca.test")
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _cert(key, ["a.test", "*.b.test"], issuer_key=ca_key, issuer="ca.test")

    def pem(*certs: x509.Certificate) -> bytes:
        return b"".join(c.public_bytes(Encoding.PEM) for c in certs)

    now = time.time()
    assert certfiles.check_chain(pem(leaf, ca), key, ["a.test", "x.b.test"], now)
    other = ec.generate_private_key(ec.SECP256R1())
    stranger = _cert(other, ["ca.test"], issuer="ca.test")
    bad = [
        (pem(leaf, ca), other, ["a.test"], "not for this key"),
        (pem(leaf, ca), key, ["c.test"], "does not name c.test"),
        (pem(leaf, ca), key, ["x.y.b.test"], "does not name"),  # one label only
        (pem(leaf, stranger), key, ["a.test"], "not signed by the next"),
        (b"garbage", key, ["a.test"], "PEM"),
    ]
    for chain, k, names, why in bad:
        with pytest.raises(VerificationError, match=why):
            certfiles.check_chain(chain, k, names, now)
    with pytest.raises(VerificationError, match="not valid now"):
        certfiles.check_chain(pem(leaf, ca), key, ["a.test"], now + 100 * DAY)


def test_keys_are_made_where_used_with_mode_0600_and_kept(tmp_path: Path) -> None:
    cert, keyfile = tmp_path / "c.pem", tmp_path / "k.pem"
    assert certfiles.ensure_placeholder(str(cert), str(keyfile), ["a.test"], "ec-p256")
    assert keyfile.stat().st_mode & 0o777 == 0o600
    first = keyfile.read_bytes()
    assert not certfiles.ensure_placeholder(str(cert), str(keyfile), ["a.test"], "ec-p256")
    assert certfiles.load_or_create_key(str(keyfile), "ec-p256")
    assert keyfile.read_bytes() == first  # a renewal keeps the key
    placeholder = x509.load_pem_x509_certificate(cert.read_bytes())
    assert certfiles.is_placeholder(placeholder)
    csr = x509.load_pem_x509_csr(
        certfiles.make_csr(
            certfiles.load_or_create_key(str(keyfile), "ec-p256"), ["a.test", "b.test"]
        )
    )
    assert csr.is_signature_valid
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a.test", "b.test"]


# ---------------------------------------------------------------- config
BASE = """
[keyserver]
listen = "127.0.0.1:0"
cert = "c"
key = "k"
client_ca = "ca"
audit_log = "a"
audit_key = "ak"
[[keyserver.keys]]
key = "k"
certificate = "c"
[keyserver.acme]
directory = "https://ca.test/dir"
account_key = "acct.key"
"""


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ('challenge_dir = "/x"\n', "keyserver.acme.orders"),
        (
            '[[keyserver.acme.orders]]\nhostnames = ["a.test"]\ncert = "c"\nkey = "k"\n',
            "keyserver.acme.challenge_dir",
        ),
        (
            'challenge = "dns-01"\n[[keyserver.acme.orders]]\nhostnames = ["a.test"]\ncert = "c"\n'
            'key = "k"\n',
            "keyserver.acme.dns_hook",
        ),
        (
            'challenge_dir = "/x"\n[[keyserver.acme.orders]]\nhostnames = ["*.a.test"]\n'
            'cert = "c"\n'
            'key = "k"\n',
            "keyserver.acme.orders[0].hostnames",
        ),
        (
            'challenge_dir = "/x"\n[[keyserver.acme.orders]]\nhostnames = ["../a"]\ncert = "c"\n'
            'key = "k"\n',
            "keyserver.acme.orders[0].hostnames[0]",
        ),
        (
            'challenge_dir = "/x"\ncontact = ["ops@a.test"]\n[[keyserver.acme.orders]]\n'
            'hostnames = ["a.test"]\ncert = "c"\nkey = "k"\n',
            "keyserver.acme.contact[0]",
        ),
    ],
)
def test_config_errors_name_the_key(extra: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        loads(BASE + extra)
    assert e.value.key == key, str(e.value)


def test_config_refuses_a_plain_http_directory() -> None:
    text = BASE.replace("https://ca.test/dir", "http://ca.test/dir") + 'challenge_dir = "/x"\n'
    with pytest.raises(ConfigError) as e:
        loads(text)
    assert e.value.key == "keyserver.acme.directory"


def test_check_config_accepts_keys_acme_will_make(tmp_path: Path) -> None:
    """check-config before the first start: the ACME-made key and certificate do not exist
    yet; the other keys still load, a missing hook command is named."""
    from blindfold import pki
    from blindfold.cli.main import main

    ca = pki.make_ca("t")
    ca.write(tmp_path / "ca.pem")
    pki.issue(ca, ["keyserver.test"]).write(tmp_path / "ks.pem", tmp_path / "ks.key")
    text = f"""
[keyserver]
listen = "127.0.0.1:0"
cert = "{tmp_path / "ks.pem"}"
key = "{tmp_path / "ks.key"}"
client_ca = "{tmp_path / "ca.pem"}"
audit_log = "{tmp_path / "audit.log"}"
audit_key = "{tmp_path / "audit.key"}"
[[keyserver.keys]]
key = "{tmp_path / "kl.key"}"
certificate = "{tmp_path / "kl.pem"}"
[keyserver.acme]
directory = "https://ca.test/dir"
account_key = "{tmp_path / "acct.key"}"
challenge = "dns-01"
dns_hook = ["{tmp_path / "hook"}"]
[[keyserver.acme.orders]]
hostnames = ["kl.test"]
cert = "{tmp_path / "kl.pem"}"
key = "{tmp_path / "kl.key"}"
"""
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    assert main(["check-config", str(cfg)]) == 2  # the hook does not exist
    hook = tmp_path / "hook"
    hook.write_text("#!/bin/sh\nexit 0\n")
    hook.chmod(0o755)
    assert main(["check-config", str(cfg)]) == 0
    assert not (tmp_path / "kl.key").exists()  # check-config writes nothing


def test_forced_renewals_are_rate_limited(tmp_path: Path) -> None:
    """POST /acme/renew must not let whoever reaches the admin listener spend the CA's rate
    limits: at most one forced renewal per retry_initial_s."""
    from blindfold.acme.client import AcmeManager
    from blindfold.config.acme import AcmeConfig
    from blindfold.config.schema import build

    cfg = build(
        AcmeConfig,
        {
            "directory": "https://ca.test/dir",
            "account_key": str(tmp_path / "a.key"),
            "challenge_dir": str(tmp_path / "ch"),
            "retry_initial_s": 60,
            "orders": [{"hostnames": ["a.test"], "cert": "c", "key": "k"}],
        },
    )
    m = AcmeManager(cfg, lambda *a, **k: None, lambda o: None)
    m.states[0].next_at = 1e12
    assert m.force(now=1000.0) and m.states[0].next_at == 0.0
    m.states[0].next_at = 1e12
    assert not m.force(now=1059.0) and m.states[0].next_at == 1e12
    assert m.force(now=1060.0)
    # attack review H: at most forced_renewals_per_week (3) in any 7 days (before: a 4th here)
    assert m.force(now=1200.0)
    assert not m.force(now=1300.0) and not m.force(now=1000.0 + 7 * 86400 - 1)
    assert m.force(now=1000.0 + 7 * 86400)  # the first one has left the week


def test_the_origin_peeks_a_split_hello_without_consuming_it() -> None:
    """The origin agent reads the ClientHello with MSG_PEEK (the bytes stay for the site's
    TLS), also when it arrives in pieces; acme-tls/1 is recognised, other hellos are not."""
    from blindfold.origin.acme_tls import peek_hello, wants_challenge
    from tests.helpers.tlsbuild import simple_hello

    async def run(data: bytes, split: int) -> tuple[object, bytes]:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        listener.close()
        server.setblocking(False)
        try:
            client.sendall(data[:split])

            async def rest() -> None:
                await asyncio.sleep(0.05)
                client.sendall(data[split:])

            task = asyncio.ensure_future(rest())
            hello = await peek_hello(server, 5.0)
            await task
            await asyncio.sleep(0.05)
            left = server.recv(65536)  # still all there
            return hello, left
        finally:
            client.close()
            server.close()

    acme = simple_hello(sni=b"a.test", alpn=(b"acme-tls/1",))
    for split in (3, 40, len(acme)):
        hello, left = asyncio.run(run(acme, split))
        assert wants_challenge(hello) and left == acme  # type: ignore[arg-type]
    plain = simple_hello(sni=b"a.test", alpn=(b"h2", b"http/1.1"))
    hello, left = asyncio.run(run(plain, len(plain)))
    assert hello is not None and not wants_challenge(hello)  # type: ignore[arg-type]
    hello, _ = asyncio.run(run(b"GET / HTTP/1.1\r\n\r\n", 18))
    assert hello is None


@pytest.mark.parametrize(
    ("value", "wildcard"),
    [
        ("victim-other-zone.example\nupdate delete example.com. A\nsend", False),
        ("other-zone.example", False),  # a valid hostname, not the order's
        ("www.example.com", True),  # '*.www.example.com' was not ordered
    ],
)
def test_a_lying_ca_cannot_choose_the_name_the_dns_hook_writes(
    tmp_path: Path, value: str, wildcard: bool
) -> None:
    """Attack review certs #6: the authorisation's identifier comes from the CA; one that is
    not a hostname of the order fails the order before the hook runs."""
    import json
    from types import SimpleNamespace
    from typing import Any

    from acme import challenges

    from blindfold.acme.client import AcmeError, AcmeManager
    from blindfold.config.acme import AcmeConfig
    from blindfold.config.schema import build

    seen = tmp_path / "argv.jsonl"
    hook = tmp_path / "hook.py"
    hook.write_text(
        f"import sys, json\nopen({str(seen)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    cfg = build(
        AcmeConfig,
        {
            "directory": "https://acme.invalid/dir",
            "account_key": str(tmp_path / "acct.key"),
            "challenge": "dns-01",
            "dns_hook": [sys.executable, str(hook)],
            "orders": [
                {
                    "hostnames": ["www.example.com", "*.example.com"],
                    "cert": str(tmp_path / "c.pem"),
                    "key": str(tmp_path / "c.key"),
                }
            ],
        },
    )
    manager = AcmeManager(cfg, lambda e, **f: None, lambda o: None)
    manager.prepare()

    def authz(value: str, wildcard: bool) -> Any:
        challb = messages.ChallengeBody(
            chall=challenges.DNS01(token=b"x" * 32), status=messages.STATUS_PENDING
        )
        return SimpleNamespace(
            body=SimpleNamespace(
                status=messages.STATUS_PENDING,
                wildcard=wildcard,
                identifier=SimpleNamespace(value=value),
                challenges=[challb],
            )
        )

    class LyingCA:  # answers as a compromised CA (or a directory URL an attacker runs) would
        directory = SimpleNamespace(meta=None)

        def new_order(self, csr: bytes, profile: Any = None) -> Any:
            # the order's own first (its hook runs), then the lie
            return SimpleNamespace(
                authorizations=[authz("example.com", True), authz(value, wildcard)]
            )

        def poll_and_finalize(self, orderr: Any, deadline: Any) -> Any:
            raise RuntimeError("not reached")

    async def lying_acme() -> Any:
        return LyingCA()

    async def call(fn: Any, *a: Any, **k: Any) -> Any:
        return None if getattr(fn, "__name__", "") == "_answer" else fn(*a, **k)

    manager._acme = lying_acme  # type: ignore[method-assign]
    manager._call = call  # type: ignore[method-assign]
    with pytest.raises(AcmeError) as err:
        asyncio.run(manager._issue(manager.states[0].order))
    assert err.value.reason == "unexpected_identifier"
    calls = [json.loads(line) for line in seen.read_text().splitlines()]
    # the order's own name was set (and cleaned up); the CA's was never passed to the hook
    assert [c[1] for c in calls] == ["_acme-challenge.example.com"] * 2, calls
