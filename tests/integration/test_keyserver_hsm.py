"""The key server's keys in a PKCS#11 token (issue 12): Debian's SoftHSM2, a token made in a
temporary directory by the test, the keys generated inside it as non-extractable. The key
server signs a real handshake (curl through a keyless edge) with a token key, and no file
holds that key."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from blindfold import pki
from blindfold.cli.main import main as cli
from blindfold.config.keyserver import KeyConfig, Pkcs11Config
from blindfold.core import keyless_wire as w
from blindfold.errors import ConfigError
from tests.conftest import need
from tests.helpers.clients import curl
from tests.helpers.edgeproc import EdgeProcess, OriginProcess, edge_config
from tests.helpers.keyless import KeylessPki, KeyServerProcess, keyserver_config, make_pki
from tests.helpers.topology import origin_config
from tests.integration.test_keyless import keyless_route
from tests.integration.test_keyless_chains import leaf_for, pem

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "4711-blindfold"


class Token:
    def __init__(self, base: Path) -> None:
        self.dir = base
        self.pin_file = base / "pin"
        self.pin_file.write_text(PIN + "\n")
        self.pin_file.chmod(0o600)
        self.publics: dict[str, Any] = {}

    def config(self, label: str, sessions: int = 1) -> Pkcs11Config:
        return Pkcs11Config(MODULE, "site", label, str(self.pin_file), sessions)

    def toml(self, label: str) -> str:
        return (
            f'pkcs11 = {{ module = "{MODULE}", token_label = "site", key_label = "{label}", '
            f'pin_file = "{self.pin_file}" }}'
        )


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Token]:
    """A SoftHSM2 token in a temporary directory, with keys generated inside it."""
    if not os.path.exists(MODULE):
        pytest.fail(f"{MODULE} is missing: run scripts/bootstrap (Debian package softhsm2)")
    import pkcs11
    from pkcs11 import Attribute, KeyType
    from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters
    from pkcs11.util.rsa import encode_rsa_public_key

    base = tmp_path_factory.mktemp("softhsm")
    (base / "tokens").mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {base / 'tokens'}\nobjectstore.backend = file\n")
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)  # this process and the key servers it starts
    subprocess.run(
        [
            need("softhsm2-util"),
            *("--init-token", "--free", "--label", "site"),
            *("--pin", PIN, "--so-pin", f"so-{PIN}"),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    tok = Token(base)
    lib = pkcs11.lib(MODULE)
    t = lib.get_token(token_label="site")
    secret = {Attribute.EXTRACTABLE: False, Attribute.SENSITIVE: True}
    with t.open(rw=True, user_pin=PIN) as s:
        for label, curve in (("p256", "secp256r1"), ("p384", "secp384r1")):
            params = s.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(curve)}, local=True
            )
            pub, _ = params.generate_keypair(store=True, label=label, private_template=secret)
            tok.publics[label] = serialization.load_der_public_key(encode_ec_public_key(pub))
        pub, _ = s.generate_keypair(
            KeyType.RSA, 2048, store=True, label="rsa", private_template=secret
        )
        tok.publics["rsa"] = serialization.load_der_public_key(encode_rsa_public_key(pub))
        # a key the token would hand out: the key server must refuse it
        p256 = {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}
        params = s.create_domain_parameters(KeyType.EC, p256, local=True)
        pub, _ = params.generate_keypair(
            store=True,
            label="loose",
            private_template={Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: False},
        )
        tok.publics["loose"] = serialization.load_der_public_key(encode_ec_public_key(pub))
        # a key that was readable once (made sensitive afterwards): CKA_ALWAYS_SENSITIVE false,
        # as for a key imported from a file (attack review certs #7)
        params = s.create_domain_parameters(KeyType.EC, p256, local=True)
        pub, priv = params.generate_keypair(
            store=True,
            label="once-readable",
            private_template={Attribute.EXTRACTABLE: False, Attribute.SENSITIVE: False},
        )
        priv[Attribute.SENSITIVE] = True
        tok.publics["once-readable"] = serialization.load_der_public_key(encode_ec_public_key(pub))
    yield tok
    if old is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = old


def test_token_keys_sign_what_in_memory_keys_sign(
    token: Token, ca: pki.Issued, tmp_path: Path
) -> None:
    """ECDSA P-256/P-384 (DER, converted from PKCS#11's r || s) and RSA-PSS: each signature
    verifies as TLS 1.3 CertificateVerify (RFC 8446 §4.4.3) with the certificate's key."""
    from blindfold.keyserver.signer import load_key, sign_certificate_verify

    for label, scheme, algorithm in (
        ("p256", w.ECDSA_SECP256R1_SHA256, hashes.SHA256()),
        ("p384", w.ECDSA_SECP384R1_SHA384, hashes.SHA384()),
        ("rsa", w.RSA_PSS_RSAE_SHA256, hashes.SHA256()),
        ("rsa", w.RSA_PSS_RSAE_SHA512, hashes.SHA512()),
    ):
        cert = tmp_path / f"{label}.pem"
        cert.write_bytes(pem(leaf_for(ca, token.publics[label], [f"{label}.test"])))
        site = load_key(0, KeyConfig(str(cert), name=label, pkcs11=token.config(label)))
        assert scheme in site.schemes
        transcript = os.urandom(algorithm.digest_size if label != "rsa" else 32)
        sig = sign_certificate_verify(site, scheme, transcript)
        content = w.certificate_verify_content(transcript)
        public = token.publics[label]
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(sig, content, ec.ECDSA(algorithm))
        else:
            public.verify(
                sig,
                content,
                padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size),
                algorithm,
            )


def test_refused_token_keys(token: Token, ca: pki.Issued, tmp_path: Path) -> None:
    from blindfold.keyserver.signer import load_key

    # extractable / not sensitive: refused, naming the key
    cert = tmp_path / "loose.pem"
    cert.write_bytes(pem(leaf_for(ca, token.publics["loose"], ["loose.test"])))
    with pytest.raises(ConfigError, match=r"key_label.*let this key out"):
        load_key(3, KeyConfig(str(cert), pkcs11=token.config("loose")))
    # non-extractable and sensitive now, but not since the token made it: refused, unless the
    # configuration says so
    once = tmp_path / "once.pem"
    once.write_bytes(pem(leaf_for(ca, token.publics["once-readable"], ["once.test"])))
    with pytest.raises(ConfigError, match=r"pkcs11.key_label.*allow_imported_key"):
        load_key(4, KeyConfig(str(once), pkcs11=token.config("once-readable")))
    allowed = dataclasses.replace(token.config("once-readable"), allow_imported_key=True)
    assert load_key(4, KeyConfig(str(once), pkcs11=allowed)).public is not None
    # the token's key does not belong to the certificate
    wrong = tmp_path / "wrong.pem"
    wrong.write_bytes(pem(leaf_for(ca, token.publics["p384"], ["p256.test"])))
    with pytest.raises(ConfigError, match="does not belong to the certificate"):
        load_key(0, KeyConfig(str(wrong), pkcs11=token.config("p256")))
    # no such key
    with pytest.raises(ConfigError, match=r"keyserver.keys\[0\].pkcs11.key_label"):
        load_key(0, KeyConfig(str(cert), pkcs11=token.config("missing")))
    # a PIN file others may read
    loose_pin = tmp_path / "pin"
    loose_pin.write_text(PIN)
    loose_pin.chmod(0o644)
    cfg = Pkcs11Config(MODULE, "site", "p256-other", str(loose_pin))
    with pytest.raises(ConfigError, match=r"pin_file.*chmod 600"):
        load_key(0, KeyConfig(str(cert), pkcs11=cfg))


@pytest.fixture
def kpki(tmp_path: Path, ca: pki.Issued) -> KeylessPki:
    return make_pki(tmp_path, ca)


def test_curl_handshake_signed_by_a_token_key_and_no_key_file(
    token: Token,
    kpki: KeylessPki,
    ca: pki.Issued,
    tmp_path: Path,
    start_edge: Callable[..., EdgeProcess],
    start_origin: Callable[..., OriginProcess],
    app: Any,
    site: dict[str, Path],
) -> None:
    names = ["example.test", "*.example.test"]
    cert_path = kpki.dir / "site-hsm.pem"
    cert_path.write_bytes(pem(leaf_for(ca, token.publics["p256"], names)))
    # the key server holds only the token key for example.test (no PEM key for it anywhere)
    kpki.sites = {}
    text = keyserver_config(kpki, {"edge1": names})
    text += f'\n[[keyserver.keys]]\nname = "hsm"\ncertificate = "{cert_path}"\n'
    text += token.toml("p256") + "\n"
    cfg_file = tmp_path / "ks-check.toml"
    cfg_file.write_text(text)
    assert cli(["check-config", str(cfg_file)]) == 0
    ks = KeyServerProcess(text, tmp_path, name="ks")
    try:
        origin = start_origin(origin_config(site, app.port, tmp_path))
        kpki.sites["hsm"] = (cert_path, Path("/nonexistent"), "")
        route_text = keyless_route(kpki, site, [ks.port], origin.port, cert="hsm")
        edge = start_edge(edge_config(route_text, per_ip_rate_per_s=0))
        out = curl(edge.port, "example.test", kpki.site_ca, "-w", "\n%{http_code}", path="/echo")
        assert out.stdout.rstrip().endswith("200"), out.stdout + out.stderr
        audit = kpki.dir / "audit.log"
        ks.stop()
        entries = audit.read_text().splitlines()
        assert any('"event":"signed"' in e and '"key":"hsm"' in e for e in entries), entries
    finally:
        ks.stop()
    assert not ks.tracebacks(), "".join(ks.stderr_lines)
    # no file under the test's directories holds the token key
    public = token.publics["p256"].public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key_files = 0
    for root in (tmp_path, token.dir):
        for path in root.rglob("*"):
            if not path.is_file() or b"PRIVATE KEY" not in path.read_bytes()[:200_000]:
                continue
            key_files += 1
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), None)
            except (ValueError, TypeError):
                continue
            assert (
                key.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
                != public
            ), f"{path} holds the token's key"
    assert key_files > 0  # the search saw the other keys (edge, key server TLS, site CA)
    # and the token will not hand it out
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    t = pkcs11.lib(MODULE).get_token(token_label="site")
    try:
        s = t.open(user_pin=PIN)
    except pkcs11.UserAlreadyLoggedIn:  # the signer's sessions in this process logged in
        s = t.open()
    in_token = s.get_key(object_class=ObjectClass.PRIVATE_KEY, label="p256")
    assert in_token[Attribute.EXTRACTABLE] is False
    assert in_token[Attribute.SENSITIVE] is True
    with pytest.raises(pkcs11.PKCS11Error):
        in_token[Attribute.VALUE]
