"""`blindfold pki`: the site's own small CA for key-server mutual TLS (and demo certificates).

    blindfold pki ca DIR                         # DIR/ca.pem, DIR/ca.key
    blindfold pki edge NAME DIR                  # DIR/NAME.pem, DIR/NAME.key: an edge's client cert
    blindfold pki server NAME DIR --host H ...   # a server certificate (the key server's)
    blindfold pki api-key NAME DIR               # DIR/NAME.api-key + a line in DIR/api-keys.txt
The fingerprint printed for an edge goes into [[keyserver.edges]] cert_sha256. Keys are
written 0600; an existing key is never replaced without --force.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from blindfold import pki


def _load_ca(directory: Path) -> pki.Issued:
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    return pki.Issued(key, cert)  # type: ignore[arg-type]


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "pki",
        help="make the site's CA, certificates and edge API keys",
        description="Make the site's own small CA and what it signs: edge identities for the "
        "key server, server certificates (key server, decision stream, a test site), and the "
        "API keys edges show the decision stream. Keys are written 0600; an existing key is "
        "never replaced without --force.",
    )
    cmds = p.add_subparsers(dest="pki_command", required=True, metavar="WHAT")
    ca = cmds.add_parser("ca", help="a new CA in DIR (DIR/ca.pem, DIR/ca.key)")
    ca.add_argument("dir", help="directory (created 0700 if missing)")
    ca.add_argument("--force", action="store_true", help="replace an existing CA")
    ca.add_argument(
        "--name", default="blindfold site CA", help="the CA's common name (default: %(default)s)"
    )
    ca.add_argument(
        "--days", type=int, default=3650, help="validity in days (default: %(default)s)"
    )
    edge = cmds.add_parser(
        "edge",
        help="a client certificate for an edge, signed by DIR's CA (DIR/NAME.pem, DIR/NAME.key); "
        "prints its cert_sha256 for [[keyserver.edges]]",
    )
    edge.add_argument("name", help="the edge's name (the certificate's common name)")
    edge.add_argument("dir", help="the CA's directory; the files are written there")
    edge.add_argument(
        "--days", type=int, default=365, help="validity in days (default: %(default)s)"
    )
    edge.add_argument("--force", action="store_true", help="replace an existing NAME.key")
    server = cmds.add_parser(
        "server", help="a server certificate, signed by DIR's CA (DIR/NAME.pem, DIR/NAME.key)"
    )
    server.add_argument("name", help="file name stem")
    server.add_argument("dir", help="the CA's directory; the files are written there")
    server.add_argument(
        "--host",
        action="append",
        required=True,
        metavar="NAME",
        help="a DNS name or IP address the certificate is for; repeat it for several "
        "(--host a.example --host b.example)",
    )
    server.add_argument(
        "--key-type",
        default="ec256",
        choices=["ec256", "ec384", "rsa2048", "ed25519"],
        help="the key's algorithm (default: %(default)s)",
    )
    server.add_argument(
        "--days", type=int, default=365, help="validity in days (default: %(default)s)"
    )
    server.add_argument("--force", action="store_true", help="replace an existing NAME.key")
    api = cmds.add_parser(
        "api-key",
        help="a new API key for edge NAME: DIR/NAME.api-key (the edge's "
        "edge.decisions.api_key_file) and a NAME:KEY line added to DIR/api-keys.txt (the "
        "origin's origin.decisions.api_keys_file), both 0600",
    )
    api.add_argument("name", help="the edge's name (letters, digits, '-', '_', '.')")
    api.add_argument("dir", help="directory (created 0700 if missing)")
    api.add_argument("--force", action="store_true", help="replace an existing key for NAME")


def _api_key(args: argparse.Namespace, directory: Path) -> int:
    """A random key in NAME.api-key and as `NAME:KEY` in api-keys.txt (a line for NAME there
    already is replaced with --force, else refused); both files 0600 from the start."""
    name = args.name
    if not name or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in name):
        print(f"blindfold pki api-key: bad name {name!r}", file=sys.stderr)
        return 2
    keys_file = directory / "api-keys.txt"
    lines = keys_file.read_text().splitlines() if keys_file.exists() else []
    mine = [ln for ln in lines if ln.split(":", 1)[0].strip() == name]
    if _refuse_overwrite(args, directory / f"{name}.api-key") or (mine and not args.force):
        if mine and not args.force:
            print(
                f"blindfold pki: {keys_file} has a key for {name}; not replacing it (--force)",
                file=sys.stderr,
            )
        return 2
    key = secrets.token_hex(24)
    kept = [ln for ln in lines if ln not in mine]
    pki.write_private(keys_file, "\n".join([*kept, f"{name}:{key}"]).encode() + b"\n")
    pki.write_private(directory / f"{name}.api-key", key.encode() + b"\n")
    print(f"api-key {name}: {directory / f'{name}.api-key'} (and a line in {keys_file})")
    return 0


def _refuse_overwrite(args: argparse.Namespace, *paths: Path) -> bool:
    """A key (or its certificate) already there is never replaced without --force: a
    re-run must not silently change a deployed identity."""
    if args.force:
        return False
    for path in paths:
        if path.exists():
            print(
                f"blindfold pki: {path} exists; not overwriting (--force replaces it)",
                file=sys.stderr,
            )
            return True
    return False


def run(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if args.pki_command == "api-key":
        return _api_key(args, directory)
    if args.pki_command == "ca":
        if _refuse_overwrite(args, directory / "ca.key", directory / "ca.pem"):
            return 2
        ca = pki.make_ca(args.name, days=args.days)
        ca.write(directory / "ca.pem", directory / "ca.key")
        print(f"CA: {directory / 'ca.pem'} (key {directory / 'ca.key'}, keep it offline)")
        return 0
    if _refuse_overwrite(args, directory / f"{args.name}.key", directory / f"{args.name}.pem"):
        return 2
    ca = _load_ca(directory)
    if args.pki_command == "edge":
        leaf = pki.issue(ca, [], client=True, server=False, common_name=args.name, days=args.days)
    else:
        leaf = pki.issue(ca, args.host, kind=args.key_type, days=args.days)
    leaf.write(directory / f"{args.name}.pem", directory / f"{args.name}.key")
    print(
        f"{args.pki_command} {args.name}: {directory / f'{args.name}.pem'} "
        f"(key {directory / f'{args.name}.key'})"
    )
    print(f'cert_sha256 = "{pki.fingerprint_sha256(leaf.cert)}"')
    return 0
