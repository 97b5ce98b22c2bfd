"""Signatures per CPU-second with keys in a SoftHSM2 token against the same kinds of keys in
memory, through the key server's own signer (keyserver.signer.sign_certificate_verify: the
CertificateVerify content built, hashed, signed, converted to DER for ECDSA), measured side by
side in one run. Also: the same token key used from two threads with two sessions.

    .venv/bin/python bench/hsm/hsmbench.py [--seconds 3] [--max 200000]

Needs Debian's softhsm2 (scripts/bootstrap). The token lives in a temporary directory that is
removed at the end; nothing else is written."""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "bench-1234"


def make_token(base: Path) -> None:
    (base / "tokens").mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {base / 'tokens'}\nobjectstore.backend = file\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)  # before the library is loaded
    subprocess.run(
        [
            *("softhsm2-util", "--init-token", "--free", "--label", "bench"),
            *("--pin", PIN, "--so-pin", "so" + PIN),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    (base / "pin").write_text(PIN)
    (base / "pin").chmod(0o600)


def cert_for(public: Any, name: str) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")]))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def run(sign: Any, seconds: float, max_n: int) -> tuple[int, float, float]:
    """Signatures done, CPU seconds, wall seconds; bounded by count and time."""
    n = 0
    c0, w0 = time.process_time(), time.perf_counter()
    deadline = w0 + seconds
    while n < max_n and time.perf_counter() < deadline:
        for _ in range(20):
            sign()
        n += 20
    return n, time.process_time() - c0, time.perf_counter() - w0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement (default 3)")
    ap.add_argument("--max", type=int, default=200_000, help="signatures per measurement at most")
    args = ap.parse_args()
    if not os.path.exists(MODULE):
        print(f"{MODULE} missing: run scripts/bootstrap (Debian softhsm2)", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="blindfold-hsm-bench."))
    try:
        make_token(base)
        return measure(base, args.seconds, args.max)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def measure(base: Path, seconds: float, max_n: int) -> int:
    import pkcs11
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from pkcs11 import Attribute, KeyType
    from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters
    from pkcs11.util.rsa import encode_rsa_public_key

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    from blindfold.config.keyserver import KeyConfig, Pkcs11Config
    from blindfold.core import keyless_wire as w
    from blindfold.keyserver.signer import load_key, sign_certificate_verify

    token = pkcs11.lib(MODULE).get_token(token_label="bench")
    secret = {Attribute.EXTRACTABLE: False, Attribute.SENSITIVE: True}
    publics: dict[str, Any] = {}
    with token.open(rw=True, user_pin=PIN) as s:
        for label, curve in (("p256", "secp256r1"), ("p384", "secp384r1")):
            params = s.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(curve)}, local=True
            )
            pub, _ = params.generate_keypair(store=True, label=label, private_template=secret)
            publics[label] = serialization.load_der_public_key(encode_ec_public_key(pub))
        pub, _ = s.generate_keypair(
            KeyType.RSA, 2048, store=True, label="rsa", private_template=secret
        )
        publics["rsa"] = serialization.load_der_public_key(encode_rsa_public_key(pub))
    memory = {
        "p256": ec.generate_private_key(ec.SECP256R1()),
        "p384": ec.generate_private_key(ec.SECP384R1()),
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }
    schemes = {
        "p256": w.ECDSA_SECP256R1_SHA256,
        "p384": w.ECDSA_SECP384R1_SHA384,
        "rsa": w.RSA_PSS_RSAE_SHA256,
    }
    transcript = os.urandom(32)
    rows = []
    print(f"signatures per CPU-second through keyserver.signer ({seconds:g} s each, 1 thread)")
    print(f"{'key':6} {'in memory':>12} {'softhsm2':>12} {'ratio':>8}  (softhsm/memory)")
    for label in ("p256", "p384", "rsa"):
        sites = {}
        for kind in ("memory", "hsm"):
            if kind == "memory":
                key = memory[label]
                cert = base / f"{label}-mem.pem"
                cert.write_bytes(cert_for(key.public_key(), f"{label}.bench"))
                keyfile = base / f"{label}-mem.key"
                keyfile.write_bytes(
                    key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    )
                )
                cfg = KeyConfig(str(cert), key=str(keyfile), name=label)
            else:
                cert = base / f"{label}-hsm.pem"
                cert.write_bytes(cert_for(publics[label], f"{label}.bench"))
                cfg = KeyConfig(
                    str(cert),
                    name=label,
                    pkcs11=Pkcs11Config(MODULE, "bench", label, str(base / "pin")),
                )
            sites[kind] = load_key(0, cfg)
        rates = {}
        for kind, site in sites.items():
            n, cpu, wall = run(
                lambda site=site, scheme=schemes[label]: sign_certificate_verify(
                    site, scheme, transcript
                ),
                seconds,
                max_n,
            )
            rates[kind] = (n / cpu if cpu > 0 else 0.0, n / wall)
        ratio = rates["hsm"][0] / rates["memory"][0]
        rows.append((label, rates, ratio))
        print(f"{label:6} {rates['memory'][0]:12.0f} {rates['hsm'][0]:12.0f} {ratio:8.3f}")
    # two threads, two sessions on one token key: does the binding let them run side by side?
    print("\nsoftHSM p256, two threads with a session each (sessions = 2):")
    cfg = KeyConfig(
        str(base / "p256-hsm.pem"),
        name="p256x2",
        pkcs11=Pkcs11Config(MODULE, "bench", "p256", str(base / "pin"), sessions=2),
    )
    site = load_key(0, cfg)
    counts = [0, 0]
    errors: list[str] = []

    def worker(i: int) -> None:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline and counts[i] < max_n:
            try:
                sign_certificate_verify(site, w.ECDSA_SECP256R1_SHA256, transcript)
            except Exception as exc:
                errors.append(type(exc).__name__ + " " + str(exc)[:80])
                return
            counts[i] += 1

    c0, w0 = time.process_time(), time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    total = sum(counts)
    print(
        f"  {total} signatures in {wall:.2f} s wall, {cpu:.2f} CPU-s: {total / wall:.0f}/s wall, "
        f"{total / cpu if cpu else 0:.0f} per CPU-second "
        f"(1 thread: {rows[0][1]['hsm'][1]:.0f}/s wall)"
    )
    if errors:
        print(f"  errors: {len(errors)}, first: {errors[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
