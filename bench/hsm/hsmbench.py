"""Signatures per CPU-second with keys in a SoftHSM2 token against the same kinds of keys in
memory, through the key server's own signer (keyserver.signer.sign_certificate_verify: the
CertificateVerify content built, hashed, signed, converted to DER for ECDSA), measured side by
side in one run. Also: the same token key used from two threads with two sessions; and
(part 2) the key server process itself, one with a P-256 key file and one with a P-256 token
key, each loaded by bench/keyless's `signload` (64 sign requests in flight on one mTLS
connection, real handshake messages) for --ks-seconds: signatures per CPU-second of the key
server process (/proc utime + stime), side by side.

    .venv/bin/python bench/hsm/hsmbench.py [--seconds 3] [--max 200000] [--ks-seconds 5]

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
    ap.add_argument(
        "--ks-seconds", type=float, default=5.0, help="key server load per key (0: skip part 2)"
    )
    args = ap.parse_args()
    if not os.path.exists(MODULE):
        print(f"{MODULE} missing: run scripts/bootstrap (Debian softhsm2)", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="blindfold-hsm-bench."))
    try:
        make_token(base)
        rc = measure(base, args.seconds, args.max)
        if rc == 0 and args.ks_seconds > 0:
            rc = keyserver_part(base, args.ks_seconds)
        return rc
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
            (base / f"{label}-hsm.pub").write_bytes(
                publics[label].public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
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


def keyserver_part(base: Path, seconds: float) -> int:
    """Two key servers in turn (file key, token key), each under the same pipelined load."""
    repo = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(repo))
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from bench.benchlib import Proc, cpu_s
    from blindfold import pki

    py = sys.executable
    d = base / "pki"
    d.mkdir()
    for args in (
        ["ca", str(d)],
        ["server", "keyserver", str(d), "--host", "keyserver.test", "--host", "127.0.0.1"],
        ["edge", "edge1", str(d)],
    ):
        subprocess.run(
            [py, "-m", "blindfold", "pki", *args], check=True, capture_output=True, timeout=60
        )
    edge_fp = pki.fingerprint_sha256(x509.load_pem_x509_certificate((d / "edge1.pem").read_bytes()))
    names = ["example.test", "*.example.test"]
    site_ca = pki.make_ca("hsm bench site CA")
    site_ca.write(d / "site-ca.pem")
    pki.issue(site_ca, names).write(d / "site-file.pem", d / "site-file.key")
    # the token's P-256 key (made in part 1), certified by the same CA
    token_public = serialization.load_pem_public_key((base / "p256-hsm.pub").read_bytes())
    (d / "site-token.pem").write_bytes(leaf_pem(site_ca, token_public, names))
    keys = {
        "file": f'key = "{d / "site-file.key"}"',
        "token": (
            f'pkcs11 = {{ module = "{MODULE}", token_label = "bench", key_label = "p256", '
            f'pin_file = "{base / "pin"}" }}'
        ),
    }
    results: dict[str, float] = {}
    print(f"\nkey server process, P-256, 64 requests in flight, {seconds:g} s each:")
    for kind, key_line in keys.items():
        out = base / kind
        out.mkdir()
        cfg = out / "keyserver.toml"
        hostnames = ", ".join(f'"{n}"' for n in names)
        cfg.write_text(
            f"""[keyserver]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
cert = "{d / "keyserver.pem"}"
key = "{d / "keyserver.key"}"
client_ca = "{d / "ca.pem"}"
audit_log = "{out / "audit.log"}"
audit_key = "{out / "audit.key"}"
log_path = "{out / "keyserver.log"}"
rate_per_s = 1000000.0
burst = 1000000

[[keyserver.keys]]
name = "site"
certificate = "{d / f"site-{kind}.pem"}"
{key_line}

[[keyserver.edges]]
name = "edge1"
cert_sha256 = "{edge_fp}"
hostnames = [{hostnames}]
"""
        )
        ks = Proc(f"ks-{kind}", [py, "-m", "blindfold", "keyserver", "--config", str(cfg)], out)
        try:
            ready = ks.wait_json(out / "keyserver.log", "keyserver_ready")
            port = ready["listen"][0].rpartition(":")[2]
            load_cmd = [
                py,
                str(repo / "bench" / "keyless" / "kbench.py"),
                "signload",
                *("--port", port, "--ca", str(d / "ca.pem")),
                *("--cert", str(d / "edge1.pem"), "--key", str(d / "edge1.key")),
                *("--site-cert", str(d / f"site-{kind}.pem")),
                *("--site-ca", str(d / "site-ca.pem")),
                *("--inflight", "64", "--seconds", str(seconds)),
            ]
            c0 = cpu_s(ks.pid)
            load = Proc(f"load-{kind}", load_cmd, out)
            load.wait(seconds + 60)
            c1 = cpu_s(ks.pid)
            r = load.last_json()
        finally:
            ks.stop()
        per_cpu = r["ok"] / (c1 - c0) if c1 > c0 else 0.0
        results[kind] = per_cpu
        print(
            f"  {kind:5}: {r['ok']} signed ({r['errors']} errors {r['error_kinds']}) in "
            f"{r['elapsed_s']:.2f} s: {r['ok'] / r['elapsed_s']:.0f}/s wall, "
            f"key server {c1 - c0:.2f} CPU-s: {per_cpu:.0f} signatures per CPU-second"
        )
    if results.get("file"):
        print(f"  ratio token / file: {results['token'] / results['file']:.3f}")
    return 0


def leaf_pem(ca: Any, public: Any, names: list[str]) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .sign(ca.key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


if __name__ == "__main__":
    sys.exit(main())
